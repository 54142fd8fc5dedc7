//! Who is calling: bearer tokens, one per node and one per operator, over TLS.
//!
//! The scheme. The server's TCP endpoint is TLS only (rustls, ring); clients verify the server
//! certificate against a CA they are given. Every call carries `authorization: Bearer <token>`.
//! The server reads its tokens from a file (`--tokens`), one per line:
//!
//! ```text
//! # role      name     token
//! operator    alice    3f6c0b...   # may do everything
//! node        node-a   91d2e4...   # may register node-a, report and remove node-a's pods,
//!                                  # report node-a's sync, and read (List, Watch, Status)
//! ```
//!
//! Unknown or missing tokens get UNAUTHENTICATED; a node token calling an operator RPC, or writing
//! another node's node or pod records, gets PERMISSION_DENIED. Tokens are compared in constant
//! time. `--insecure-plaintext` (loopback addresses only) drops TLS for development; without a
//! tokens file it also treats every caller as an operator named "anonymous".

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Status};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A person or tool: every RPC.
    Operator,
    /// A node's agent: its own node and pods, and reads.
    Node,
}

/// An authenticated caller, put in the request extensions by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// The operator's name or the node's name.
    pub name: String,
}

impl Identity {
    /// Operators may do anything; nodes only act as themselves.
    pub fn may_act_for_node(&self, node: &str) -> bool {
        self.role == Role::Operator || self.name == node
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tokens file line {line}: {message}")]
    Line { line: usize, message: String },
}

/// The tokens the server accepts.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    entries: Vec<(Vec<u8>, Identity)>,
}

impl TokenTable {
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, token] = fields[..] else {
                return Err(TokenFileError::Line {
                    line: i + 1,
                    message: "expected: <operator|node> <name> <token>".into(),
                });
            };
            let role = match role {
                "operator" => Role::Operator,
                "node" => Role::Node,
                other => {
                    return Err(TokenFileError::Line {
                        line: i + 1,
                        message: format!("role {other:?} is not operator or node"),
                    });
                }
            };
            if token.len() < 16 {
                return Err(TokenFileError::Line {
                    line: i + 1,
                    message: "tokens must be at least 16 characters".into(),
                });
            }
            entries.push((
                token.as_bytes().to_vec(),
                Identity {
                    role,
                    name: name.to_string(),
                },
            ));
        }
        Ok(Self { entries })
    }

    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The identity of `token`, comparing against every entry in constant time per entry.
    pub fn authenticate(&self, token: &[u8]) -> Option<Identity> {
        let mut found = None;
        for (t, id) in &self.entries {
            if constant_time_eq(t, token) && found.is_none() {
                found = Some(id.clone());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tonic interceptor that authenticates every call.
#[derive(Debug, Clone)]
pub struct Authenticator {
    /// `None`: development mode, everyone is the operator "anonymous".
    tokens: Option<Arc<TokenTable>>,
}

impl Authenticator {
    pub fn new(tokens: TokenTable) -> Self {
        Self {
            tokens: Some(Arc::new(tokens)),
        }
    }

    /// Every caller is an operator. Only for `--insecure-plaintext` on loopback.
    pub fn insecure_anonymous() -> Self {
        Self { tokens: None }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let id = match &self.tokens {
            None => Identity {
                role: Role::Operator,
                name: "anonymous".into(),
            },
            Some(table) => {
                let header = req.metadata().get("authorization").ok_or_else(|| {
                    Status::unauthenticated("missing authorization: Bearer <token>")
                })?;
                let token = header.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
                    Status::unauthenticated("authorization must be \"Bearer <token>\"")
                })?;
                table
                    .authenticate(token)
                    .ok_or_else(|| Status::unauthenticated("unknown token"))?
            }
        };
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// The caller of a request that went through [`Authenticator`].
pub fn identity<T>(req: &Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("not authenticated"))
}

/// Refuse anyone but operators.
pub fn require_operator(id: &Identity) -> Result<(), Status> {
    if id.role == Role::Operator {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "node {:?} may not do this: operator token required",
            id.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_authenticates() {
        let t = TokenTable::parse(
            "# c\noperator alice aaaaaaaaaaaaaaaa\nnode n1 bbbbbbbbbbbbbbbb # x\n",
        )
        .unwrap();
        assert_eq!(
            t.authenticate(b"aaaaaaaaaaaaaaaa").unwrap().role,
            Role::Operator
        );
        assert_eq!(t.authenticate(b"bbbbbbbbbbbbbbbb").unwrap().name, "n1");
        assert_eq!(t.authenticate(b"bbbbbbbbbbbbbbbc"), None);
        assert!(TokenTable::parse("admin x yyyyyyyyyyyyyyyyyy").is_err());
        assert!(TokenTable::parse("node x short").is_err());
    }
}
