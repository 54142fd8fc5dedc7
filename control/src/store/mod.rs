//! Durable state behind the control plane: one trait, two backends.
//!
//! [`Store`] is a small versioned key-value store: every committed transaction that changes
//! something gets the next revision; [`Store::watch`] streams the changes after a revision in order,
//! or a snapshot first when that history is gone. The server keeps its objects and its allocation
//! claims (pod CIDRs, ClusterIPs, NodePorts) in it and gets consistency across replicas from
//! compare-and-commit transactions ([`Txn`]), never from in-process locks.
//!
//! - [`RedbStore`]: the default, embedded and crash-safe (redb commits are durable and atomic; a
//!   SIGKILL at any point leaves the last committed transaction).
//! - [`EtcdStore`]: etcd v3, for several replicas; revisions and watches are etcd's own.

mod etcd_store;
mod redb_store;

use std::future::Future;
use std::path::PathBuf;

use tokio::sync::mpsc;

pub use etcd_store::{EtcdStore, EtcdTls};
pub use redb_store::RedbStore;

/// The embedded store's default history, in revisions.
pub fn redb_history_default() -> u64 {
    redb_store::DEFAULT_HISTORY
}

/// A store revision. 0 means "nothing yet".
pub type Revision = u64;

/// One stored key with its value and the revision of its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: Revision,
}

/// A condition of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's last change is at this revision; 0 means the key does not exist.
    ModRevision(String, Revision),
}

/// A write of a [`Txn`]. A key appears at most once among a transaction's ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

/// All ops are applied, atomically, only if all compares hold.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// One changed key in a watch. `value` is `None` for a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// What a watch yields.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// Every key under the prefix at `revision`; replaces whatever the watcher held.
    Snapshot {
        revision: Revision,
        kvs: Vec<KeyValue>,
    },
    /// The changes of one revision under the prefix, in order.
    Changes {
        revision: Revision,
        events: Vec<StoreEvent>,
    },
}

/// A watch: items in revision order; an `Err` ends it.
pub type WatchReceiver = mpsc::Receiver<Result<WatchItem, StoreError>>;

/// Why a store operation failed. Every variant keeps its cause as its `source`; the server turns
/// them into gRPC status where it answers (`server::service`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded store's directory cannot be created.
    #[error("embedded store: cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A redb operation failed: I/O (a full disk), the file held open by another process, ...
    #[error("embedded store: {0}")]
    Redb(#[source] redb::Error),
    /// An etcd request failed: unreachable, timed out, refused.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// The etcd TLS settings cannot be used (a file missing or not PEM, a certificate without
    /// its key, TLS flags with `http://` endpoints or the reverse).
    #[error("etcd TLS settings: {0}")]
    EtcdTls(String),
    /// The first request to etcd failed: nothing listening, a TLS handshake etcd or this side
    /// refused (no client certificate, an unknown CA). `message` is the whole cause chain,
    /// `hint` what to check.
    #[error("cannot use etcd at {endpoints}: {message}{hint}")]
    EtcdConnect {
        endpoints: String,
        message: String,
        hint: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// etcd closed or cancelled a watch.
    #[error("etcd ended the watch: {0}")]
    WatchEnded(String),
    /// Stored bytes do not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// A stored key is not UTF-8.
    #[error("stored data is corrupt: {what} is not UTF-8: {source}")]
    NotUtf8 {
        /// Which key: "log key", "etcd key".
        what: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    /// A blocking store task panicked or was cancelled (the runtime shutting down).
    #[error("store task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// A versioned key-value store with transactions and watches.
pub trait Store: Clone + Send + Sync + 'static {
    /// "redb" or "etcd".
    fn backend(&self) -> &'static str;

    /// One key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Every key under `prefix`, sorted, and the store revision they were read at.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Revision, Vec<KeyValue>), StoreError>> + Send;

    /// Commit `txn`. `Ok(None)` when a compare failed (nothing written); otherwise the revision
    /// of the change (the current revision when nothing changed).
    fn commit(&self, txn: Txn)
    -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send;

    /// Changes under `prefix` after `from` (a snapshot first when `from` is 0 or compacted away).
    fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> impl Future<Output = Result<WatchReceiver, StoreError>> + Send;
}

/// Either backend, chosen at startup.
#[derive(Clone)]
pub enum AnyStore {
    Redb(RedbStore),
    Etcd(Box<EtcdStore>),
}

impl Store for AnyStore {
    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Redb(s) => s.backend(),
            AnyStore::Etcd(s) => s.backend(),
        }
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self {
            AnyStore::Redb(s) => s.get(key).await,
            AnyStore::Etcd(s) => s.get(key).await,
        }
    }
    async fn list(&self, prefix: &str) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        match self {
            AnyStore::Redb(s) => s.list(prefix).await,
            AnyStore::Etcd(s) => s.list(prefix).await,
        }
    }
    async fn commit(&self, txn: Txn) -> Result<Option<Revision>, StoreError> {
        match self {
            AnyStore::Redb(s) => s.commit(txn).await,
            AnyStore::Etcd(s) => s.commit(txn).await,
        }
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchReceiver, StoreError> {
        match self {
            AnyStore::Redb(s) => s.watch(prefix, from).await,
            AnyStore::Etcd(s) => s.watch(prefix, from).await,
        }
    }
}

/// Shared behaviour tests, run against both backends (see `tests/store.rs`).
pub mod conformance {
    use super::*;

    async fn next(rx: &mut WatchReceiver) -> WatchItem {
        match tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok(item))) => item,
            other => panic!("watch yielded {other:?}"),
        }
    }

    /// Puts, compares, deletes, list, and a watch from 0 and from a revision.
    pub async fn basic<S: Store>(store: &S) {
        let p = "/conf/";
        let r1 = store
            .commit(Txn {
                compares: vec![Compare::ModRevision(format!("{p}a"), 0)],
                ops: vec![Op::Put(format!("{p}a"), b"1".to_vec())],
            })
            .await
            .unwrap()
            .expect("create when absent succeeds");
        // Creating again when absent must fail.
        let again = store
            .commit(Txn {
                compares: vec![Compare::ModRevision(format!("{p}a"), 0)],
                ops: vec![Op::Put(format!("{p}a"), b"2".to_vec())],
            })
            .await
            .unwrap();
        assert_eq!(again, None);
        let kv = store.get(&format!("{p}a")).await.unwrap().unwrap();
        assert_eq!(kv.value, b"1");
        assert_eq!(kv.mod_revision, r1);
        let mut rx = store.watch(p, 0).await.unwrap();
        match next(&mut rx).await {
            WatchItem::Snapshot { revision, kvs } => {
                assert!(revision >= r1);
                assert_eq!(kvs.len(), 1);
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        let r2 = store
            .commit(Txn {
                compares: vec![Compare::ModRevision(format!("{p}a"), r1)],
                ops: vec![
                    Op::Put(format!("{p}a"), b"3".to_vec()),
                    Op::Put(format!("{p}b"), b"4".to_vec()),
                ],
            })
            .await
            .unwrap()
            .unwrap();
        assert!(r2 > r1);
        match next(&mut rx).await {
            WatchItem::Changes { revision, events } => {
                assert_eq!(revision, r2);
                assert_eq!(events.len(), 2);
                assert_eq!(events[1].value.as_deref(), Some(&b"4"[..]));
            }
            other => panic!("expected changes, got {other:?}"),
        }
        let r3 = store
            .commit(Txn {
                compares: vec![],
                ops: vec![Op::Delete(format!("{p}a"))],
            })
            .await
            .unwrap()
            .unwrap();
        match next(&mut rx).await {
            WatchItem::Changes { revision, events } => {
                assert_eq!(revision, r3);
                assert_eq!(
                    events,
                    vec![StoreEvent {
                        key: format!("{p}a"),
                        value: None
                    }]
                );
            }
            other => panic!("expected changes, got {other:?}"),
        }
        // A watch from r1 replays r2 and r3.
        let mut rx2 = store.watch(p, r1).await.unwrap();
        let mut seen = vec![];
        while seen.len() < 2 {
            match next(&mut rx2).await {
                WatchItem::Changes { revision, .. } => seen.push(revision),
                WatchItem::Snapshot { .. } => panic!("history is not compacted"),
            }
        }
        assert_eq!(seen, vec![r2, r3]);
        let (rev, kvs) = store.list(p).await.unwrap();
        assert!(rev >= r3);
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].key, format!("{p}b"));
    }
}
