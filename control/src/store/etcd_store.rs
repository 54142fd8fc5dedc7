//! The etcd v3 backend. Revisions are etcd's; transactions are etcd `Txn`s with `mod_revision`
//! compares (0 = absent, checked as `version == 0`); watches are etcd watches from a start
//! revision, falling back to a snapshot (a ranged get and its header revision) when etcd has
//! compacted the history a watcher asked for.
//!
//! Plaintext (`http://` endpoints) or TLS (`https://`, [`EtcdTls`]: the CA of etcd's serving
//! certificate and, for an etcd started with `--client-cert-auth`, a client certificate and key,
//! as `etcdctl --cacert --cert --key` take them). [`EtcdStore::connect`] makes one request before
//! it returns, so a wrong endpoint, CA or missing client certificate stops the control plane at
//! start with a message naming the flag to fix, not on the first write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions,
    Identity, TlsOptions, TxnOp, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{
    Compare, KeyValue, Op, Revision, Store, StoreError, StoreEvent, Txn, WatchItem, WatchReceiver,
};

/// How long [`EtcdStore::connect`] keeps trying its first request (etcd may still be starting).
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// TLS towards etcd: the files etcd's own clients take as `--cacert`, `--cert` and `--key`
/// (`sluice-control --etcd-cacert --etcd-cert --etcd-key`; kube-apiserver's `--etcd-cafile`,
/// `--etcd-certfile`, `--etcd-keyfile`). All PEM. None set: plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's serving certificate (etcd's `--trusted-ca-file` side).
    pub ca: Option<PathBuf>,
    /// This client's certificate, for an etcd started with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// The key of [`EtcdTls::cert`].
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// Check the settings against the endpoints and read the files: `None` for plaintext.
    pub fn options(&self, endpoints: &[String]) -> Result<Option<TlsOptions>, StoreError> {
        let bad = |m: String| Err(StoreError::EtcdTls(m));
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https > 0 && https < endpoints.len() {
            return bad(format!(
                "the endpoints {} mix http:// and https://; etcd serves one or the other",
                endpoints.join(",")
            ));
        }
        if !self.is_set() {
            if https > 0 {
                return bad(format!(
                    "{} is https:// but no --etcd-cacert is given (the CA that signed etcd's \
                     serving certificate)",
                    endpoints[0]
                ));
            }
            return Ok(None);
        }
        if https == 0 {
            return bad(format!(
                "--etcd-cacert/--etcd-cert/--etcd-key are given but {} is not an https:// \
                 endpoint",
                endpoints.first().map_or("(none)", |e| e.as_str())
            ));
        }
        let Some(ca) = &self.ca else {
            return bad(
                "--etcd-cacert is required with https:// endpoints (the CA that signed \
                        etcd's serving certificate)"
                    .into(),
            );
        };
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(ca, "--etcd-cacert")?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read_pem(cert, "--etcd-cert")?,
                    read_pem(key, "--etcd-key")?,
                ));
            }
            (None, None) => {}
            _ => return bad("--etcd-cert and --etcd-key go together".into()),
        }
        Ok(Some(tls))
    }
}

/// The PEM file given as `flag`, or why it cannot be used.
fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| {
        StoreError::EtcdTls(format!("{flag} {}: cannot read it: {e}", path.display()))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(StoreError::EtcdTls(format!(
            "{flag} {}: not PEM (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// `e` and its sources, "outer: inner: ..." (tonic's transport error says only "transport
/// error"; the cause is underneath), repeated messages once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let m = err.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// What to check, from the error's text and the TLS settings used.
fn hint(message: &str, tls: &EtcdTls) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("certificaterequired") || m.contains("certificate required") {
        "; etcd asks for a client certificate (it runs with --client-cert-auth): give \
         --etcd-cert and --etcd-key"
    } else if m.contains("badcertificate")
        || m.contains("bad certificate")
        || m.contains("unknownca")
        || m.contains("unknown ca")
    {
        if tls.cert.is_some() {
            "; etcd does not accept the client certificate of --etcd-cert: is it signed by the CA \
             of etcd's --trusted-ca-file?"
        } else {
            "; etcd refused the TLS handshake: give --etcd-cert and --etcd-key"
        }
    } else if m.contains("unknownissuer") || m.contains("invalid peer certificate") {
        "; etcd's serving certificate does not verify: is it signed by --etcd-cacert and does it \
         name the endpoint's host?"
    } else if m.contains("tls") || m.contains("handshake") || m.contains("alert") {
        "; check --etcd-cacert, --etcd-cert and --etcd-key against etcd's TLS flags"
    } else {
        "; is etcd running at these endpoints, and do they say http:// or https:// as etcd \
         serves?"
    }
}

/// A connection to an etcd cluster. All keys are written as given (the server prefixes them).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl EtcdStore {
    /// Connect to the etcd endpoints, e.g. `["http://127.0.0.1:2379"]` (plaintext, `tls` unset)
    /// or `["https://10.0.0.5:2379"]` with `tls`, and make one request (retried for up to
    /// [`CONNECT_PATIENCE`]): the error says what etcd or the TLS layer answered and which flag
    /// to check.
    pub async fn connect(endpoints: &[String], tls: &EtcdTls) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
        if let Some(t) = tls.options(endpoints)? {
            options = options.with_tls(t);
        }
        let fail = |source: etcd_client::Error| {
            let message = chain(&source);
            StoreError::EtcdConnect {
                endpoints: endpoints.join(","),
                hint: hint(&message, tls),
                message,
                source,
            }
        };
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(fail)?;
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
        loop {
            let mut kv = client.kv_client();
            let probe = kv.get("/sluice/", Some(GetOptions::new().with_count_only()));
            let last = match tokio::time::timeout(Duration::from_secs(3), probe).await {
                Ok(Ok(_)) => return Ok(Self { client }),
                Ok(Err(e)) => e,
                Err(_) => etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer within 3 s",
                )),
            };
            // A TLS refusal will not change; an etcd still starting may.
            let m = chain(&last).to_ascii_lowercase();
            let tls_refusal = ["certificate", "alert", "handshake", "tls"]
                .iter()
                .any(|w| m.contains(w));
            if tls_refusal || tokio::time::Instant::now() >= deadline {
                return Err(fail(last));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn rev(r: i64) -> Revision {
    r.max(0) as Revision
}

fn kv_of(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: std::str::from_utf8(kv.key())
            .map_err(|source| StoreError::NotUtf8 {
                what: "etcd key",
                source,
            })?
            .to_string(),
        value: kv.value().to_vec(),
        mod_revision: rev(kv.mod_revision()),
    })
}

impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self.client.kv_client().get(key, None).await?;
        resp.kvs().first().map(kv_of).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = rev(resp.header().map(|h| h.revision()).unwrap_or(0));
        let kvs = resp
            .kvs()
            .iter()
            .map(kv_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((revision, kvs))
    }

    async fn commit(&self, txn: Txn) -> Result<Option<Revision>, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|Compare::ModRevision(key, r)| {
                if *r == 0 {
                    EtcdCompare::version(key.as_str(), CompareOp::Equal, 0)
                } else {
                    EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *r as i64)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(k, v, None),
                Op::Delete(k) => TxnOp::delete(k, None),
            })
            .collect();
        let resp = self
            .client
            .kv_client()
            .txn(etcd_client::Txn::new().when(compares).and_then(ops))
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        Ok(Some(rev(resp.header().map(|h| h.revision()).unwrap_or(0))))
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchReceiver, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut last = from;
            // A watcher ahead of etcd (e.g. of a store that was replaced) must start over too.
            let current = store
                .client
                .kv_client()
                .get(
                    prefix.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .ok()
                .and_then(|r| r.header().map(|h| rev(h.revision())))
                .unwrap_or(0);
            let mut need_snapshot = from == 0 || from > current;
            loop {
                if need_snapshot {
                    match store.list(&prefix).await {
                        Ok((revision, kvs)) => {
                            last = revision;
                            if tx
                                .send(Ok(WatchItem::Snapshot { revision, kvs }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(last as i64 + 1);
                let mut stream = match store
                    .client
                    .watch_client()
                    .watch(prefix.as_str(), Some(opts))
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                loop {
                    let msg = tokio::select! {
                        m = stream.next() => m,
                        _ = tx.closed() => return,
                    };
                    let resp = match msg {
                        Some(Ok(resp)) => resp,
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                        None => {
                            let _ = tx
                                .send(Err(StoreError::WatchEnded("etcd closed it".into())))
                                .await;
                            return;
                        }
                    };
                    if resp.compact_revision() > 0 {
                        // The history after `last` is gone: start over from a snapshot.
                        need_snapshot = true;
                        break;
                    }
                    if resp.canceled() {
                        let _ = tx
                            .send(Err(StoreError::WatchEnded(format!(
                                "cancelled: {}",
                                resp.cancel_reason()
                            ))))
                            .await;
                        return;
                    }
                    // Group the events by revision; etcd never splits a revision across responses.
                    let mut batch: Option<(Revision, Vec<StoreEvent>)> = None;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let r = rev(kv.mod_revision());
                        let key = match kv.key_str() {
                            Ok(k) => k.to_string(),
                            Err(_) => continue,
                        };
                        let value = match ev.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        };
                        match &mut batch {
                            Some((br, events)) if *br == r => {
                                events.push(StoreEvent { key, value })
                            }
                            _ => {
                                if let Some((revision, events)) = batch.take() {
                                    last = revision;
                                    if tx
                                        .send(Ok(WatchItem::Changes { revision, events }))
                                        .await
                                        .is_err()
                                    {
                                        return;
                                    }
                                }
                                batch = Some((r, vec![StoreEvent { key, value }]));
                            }
                        }
                    }
                    if let Some((revision, events)) = batch.take() {
                        last = revision;
                        if tx
                            .send(Ok(WatchItem::Changes { revision, events }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(e: &str) -> Vec<String> {
        vec![e.to_string()]
    }

    fn err(tls: &EtcdTls, endpoints: &[String]) -> String {
        match tls.options(endpoints) {
            Ok(_) => panic!("{tls:?} with {endpoints:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_settings_must_fit_the_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(
            &pem,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let none = EtcdTls::default();
        assert!(
            none.options(&eps("http://127.0.0.1:2379"))
                .unwrap()
                .is_none()
        );
        let m = err(&none, &eps("https://127.0.0.1:2379"));
        assert!(m.contains("no --etcd-cacert"), "{m}");

        let ca = EtcdTls {
            ca: Some(pem.clone()),
            ..Default::default()
        };
        assert!(
            ca.options(&eps("https://127.0.0.1:2379"))
                .unwrap()
                .is_some()
        );
        let m = err(&ca, &eps("http://127.0.0.1:2379"));
        assert!(m.contains("not an https:// endpoint"), "{m}");
        let mixed = vec!["https://a:2379".to_string(), "http://b:2379".to_string()];
        assert!(err(&ca, &mixed).contains("mix http:// and https://"));

        let half = EtcdTls {
            cert: Some(pem.clone()),
            ..ca.clone()
        };
        assert!(err(&half, &eps("https://a:2379")).contains("go together"));
        let no_ca = EtcdTls {
            ca: None,
            cert: Some(pem.clone()),
            key: Some(pem.clone()),
        };
        assert!(err(&no_ca, &eps("https://a:2379")).contains("--etcd-cacert is required"));
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let tls = EtcdTls {
            ca: Some(missing.clone()),
            ..Default::default()
        };
        let m = err(&tls, &eps("https://a:2379"));
        assert!(
            m.contains("--etcd-cacert") && m.contains("missing.pem"),
            "{m}"
        );
        let der = dir.path().join("ca.der");
        std::fs::write(&der, [0x30, 0x82, 0x01, 0x0a]).unwrap();
        let tls = EtcdTls {
            ca: Some(der),
            ..Default::default()
        };
        assert!(err(&tls, &eps("https://a:2379")).contains("not PEM"));
    }

    #[test]
    fn hints_name_the_flag() {
        let none = EtcdTls::default();
        let with_cert = EtcdTls {
            cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(hint("received fatal alert: CertificateRequired", &none).contains("--etcd-cert"));
        assert!(
            hint("received fatal alert: BadCertificate", &with_cert).contains("--trusted-ca-file")
        );
        assert!(hint("invalid peer certificate: UnknownIssuer", &none).contains("--etcd-cacert"));
        assert!(hint("connection refused", &none).contains("is etcd running"));
    }
}
