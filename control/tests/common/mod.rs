//! Test harness: certificates made at test time (openssl), a token file, the real
//! `sluice-control` binary in a child process, and a real etcd. Everything is removed or killed on
//! drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_control::client::ClientConfig;

pub const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";
pub const NODE_A_TOKEN: &str = "node-a-token-0123456789abcdef";
pub const NODE_B_TOKEN: &str = "node-b-token-0123456789abcdef";

/// Fail with the reason, or skip when SLUICE_ALLOW_SKIP=1.
pub fn require(cond: bool, why: &str) -> bool {
    if cond {
        return true;
    }
    if std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("skipping: {why}");
        return false;
    }
    panic!("{why} (set SLUICE_ALLOW_SKIP=1 to skip)");
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with openssl.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args([
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=sluice-test-ca",
            ])
            .current_dir(d));
        run(Command::new("openssl")
            .args(["req"])
            .args(ec)
            .args([
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ])
            .current_dir(d));
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        run(Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
            ])
            .args(["-out", "server.pem", "-days", "2", "-extfile", "ext.cnf"])
            .current_dir(d));
        // A second CA the server's certificate does not chain to.
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args([
                "-keyout",
                "other.key",
                "-out",
                "other-ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=other-ca",
            ])
            .current_dir(d));
        std::fs::write(
            d.join("tokens"),
            format!(
                "# test tokens\noperator admin {OPERATOR_TOKEN}\nnode node-a {NODE_A_TOKEN}\nnode node-b {NODE_B_TOKEN}\n"
            ),
        )
        .unwrap();
        Self { dir }
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.path("ca.pem")).unwrap()
    }

    /// A client certificate `<name>.pem` (key `<name>.key`, CN `name`) signed by `ca` ("ca" or
    /// "other", the second CA).
    pub fn client(&self, name: &str, ca: &str) -> &Self {
        let d = self.dir.path();
        let (ca_pem, ca_key) = match ca {
            "ca" => ("ca.pem", "ca.key"),
            _ => ("other-ca.pem", "other.key"),
        };
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-keyout", &format!("{name}.key")])
            .args([
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ])
            .current_dir(d));
        std::fs::write(d.join("client-ext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-in", &format!("{name}.csr")])
            .args(["-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial"])
            .args(["-out", &format!("{name}.pem"), "-days", "2"])
            .args(["-extfile", "client-ext.cnf"])
            .current_dir(d));
        self
    }

    /// The store's TLS settings: `ca.pem` and the client certificate `<name>` ("" for none).
    pub fn etcd_tls(&self, name: &str) -> sluice_control::store::EtcdTls {
        sluice_control::store::EtcdTls {
            ca: Some(self.path("ca.pem")),
            cert: (!name.is_empty()).then(|| self.path(&format!("{name}.pem"))),
            key: (!name.is_empty()).then(|| self.path(&format!("{name}.key"))),
        }
    }
}

/// How to run a server.
#[derive(Clone)]
pub enum Mode {
    /// TLS and tokens from these certificates.
    Tls(PathBuf),
    /// --insecure-plaintext, no tokens.
    Plaintext,
}

/// A running `sluice-control`, SIGKILLed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub args: Vec<String>,
}

impl Server {
    pub fn start(mode: &Mode, listen: &str, store_args: &[String]) -> Self {
        let mut args = vec!["--listen".to_string(), listen.to_string()];
        match mode {
            Mode::Tls(dir) => {
                for (flag, f) in [
                    ("--tls-cert", "server.pem"),
                    ("--tls-key", "server.key"),
                    ("--tokens", "tokens"),
                ] {
                    args.push(flag.into());
                    args.push(dir.join(f).display().to_string());
                }
            }
            Mode::Plaintext => args.push("--insecure-plaintext".into()),
        }
        args.extend(store_args.iter().cloned());
        Self::spawn(args)
    }

    fn spawn(args: Vec<String>) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-control"))
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawning sluice-control");
            let mut line = String::new();
            let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
            if let Some(addr) = line.trim().strip_prefix("sluice-control listening on ") {
                return Self {
                    child,
                    addr: addr.to_string(),
                    args,
                };
            }
            // The port may still be held by the previous process for a moment.
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "sluice-control did not start: {args:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again with the same arguments on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let mut args = self.args.clone();
        args[1] = self.addr.clone();
        *self = Self::spawn(args);
    }

    pub fn config(&self, mode: &Mode, token: Option<&str>) -> ClientConfig {
        match mode {
            Mode::Tls(dir) => {
                let mut c = ClientConfig::new(format!("https://{}", self.addr))
                    .with_ca_pem(std::fs::read(dir.join("ca.pem")).unwrap());
                if let Some(t) = token {
                    c = c.with_token(t);
                }
                c
            }
            Mode::Plaintext => ClientConfig::new(format!("http://{}", self.addr)),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd on loopback with a temporary data directory, killed on drop.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Etcd {
    /// None when etcd is missing and SLUICE_ALLOW_SKIP=1.
    pub async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// With `Some(certs)`: TLS with `server.pem`/`server.key` (127.0.0.1) and
    /// `--client-cert-auth` against `ca.pem`; ready once a client with `client.pem` gets an
    /// answer (see [`Certs::client`]).
    pub async fn start_with(tls: Option<&Certs>) -> Option<Self> {
        let found = Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !require(
            found,
            "the etcd binary (Debian package etcd-server) is not installed",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        if let Some(c) = tls {
            cmd.arg("--cert-file")
                .arg(c.path("server.pem"))
                .arg("--key-file")
                .arg(c.path("server.key"))
                .arg("--trusted-ca-file")
                .arg(c.path("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("t={peer_url}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning etcd");
        let etcd = Self {
            child,
            _dir: dir,
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = match tls {
                Some(c) => sluice_control::store::EtcdStore::connect(
                    std::slice::from_ref(&etcd.endpoint),
                    &c.etcd_tls("client"),
                )
                .await
                .is_ok(),
                None => match etcd_client::Client::connect([etcd.endpoint.as_str()], None).await {
                    Ok(mut c) => c.get("probe", None).await.is_ok(),
                    Err(_) => false,
                },
            };
            if up {
                return Some(etcd);
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up at {}",
                etcd.endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it returns Some, up to 30 s (a hang guard, not a timing assertion).
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn namespace_json(name: &str) -> String {
    format!(r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#)
}

pub fn service_json(ns: &str, name: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"{ns}"}},"spec":{{"type":"NodePort","ports":[{{"port":80}}]}}}}"#
    )
}

pub fn k8s(kind: sluice_control::api::Kind, json: String) -> sluice_control::api::Object {
    let obj = sluice_control::model::K8sObject::from_json(kind, &json).unwrap();
    sluice_control::api::Object {
        body: Some(sluice_control::api::object::Body::K8s(obj.to_proto())),
        revision: 0,
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
