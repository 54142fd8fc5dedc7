//! The embedded backend: one redb file.
//!
//! Tables: `objects` (key → 8-byte little-endian mod revision + value), `log` (revision → the
//! encoded events of that revision, the last `history` revisions), `meta` (`revision`,
//! `compacted`: the log holds exactly the revisions after `compacted`). Every commit is one redb
//! write transaction with immediate durability, so a crash (SIGKILL, power loss) leaves the store at
//! the last committed revision with objects and log in agreement.

use std::path::Path;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use super::{
    Compare, KeyValue, Op, Revision, Store, StoreError, StoreEvent, Txn, WatchItem, WatchReceiver,
};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Revisions kept in the log for watchers that fall behind, by default.
pub const DEFAULT_HISTORY: u64 = 100_000;

/// Committed revisions kept in memory for live watchers (a watcher that falls further behind
/// reads what it missed from the log). Each holds its events' encoded objects, so this bounds the
/// memory the change feed holds (a full ring of 4,096 churn revisions is megabytes).
const CHANGE_RING: usize = 256;

/// Items a watch buffers for its reader.
const WATCH_BUFFER: usize = 1024;

type Batch = Arc<(Revision, Vec<StoreEvent>)>;

struct Inner {
    db: Database,
    history: u64,
    /// Held across commit and publication so watchers see revisions in order.
    writer: Mutex<()>,
    changes: broadcast::Sender<Batch>,
}

/// The embedded crash-safe store.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(e.into())
}

fn join_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Task(e)
}

fn encode_events(events: &[StoreEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    for ev in events {
        out.extend_from_slice(&(ev.key.len() as u32).to_le_bytes());
        out.extend_from_slice(ev.key.as_bytes());
        match &ev.value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    out
}

fn decode_events(mut b: &[u8]) -> Result<Vec<StoreEvent>, StoreError> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
        if b.len() < n {
            return Err(StoreError::Corrupt("truncated log entry"));
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Ok(head)
    }
    fn len(b: &mut &[u8]) -> Result<usize, StoreError> {
        let raw = take(b, 4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize)
    }
    let mut events = Vec::new();
    while !b.is_empty() {
        let n = len(&mut b)?;
        let key = std::str::from_utf8(take(&mut b, n)?)
            .map_err(|source| StoreError::NotUtf8 {
                what: "log key",
                source,
            })?
            .to_string();
        let value = match take(&mut b, 1)?[0] {
            0 => None,
            _ => {
                let n = len(&mut b)?;
                Some(take(&mut b, n)?.to_vec())
            }
        };
        events.push(StoreEvent { key, value });
    }
    Ok(events)
}

fn split_value(raw: &[u8]) -> Result<(Revision, Vec<u8>), StoreError> {
    if raw.len() < 8 {
        return Err(StoreError::Corrupt(
            "object value shorter than its revision",
        ));
    }
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&raw[..8]);
    Ok((u64::from_le_bytes(rev), raw[8..].to_vec()))
}

fn filter(events: &[StoreEvent], prefix: &str) -> Vec<StoreEvent> {
    events
        .iter()
        .filter(|e| e.key.starts_with(prefix))
        .cloned()
        .collect()
}

impl RedbStore {
    /// Open (or create) the store in directory `dir` (file `state.redb`).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(dir, DEFAULT_HISTORY)
    }

    /// As [`RedbStore::open`], keeping `history` revisions of log for watchers.
    pub fn open_with_history(dir: &Path, history: u64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = Database::create(dir.join("state.redb")).map_err(err)?;
        let tx = db.begin_write().map_err(err)?;
        {
            tx.open_table(OBJECTS).map_err(err)?;
            tx.open_table(LOG).map_err(err)?;
            tx.open_table(META).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let (changes, _) = broadcast::channel(CHANGE_RING);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                history: history.max(1),
                writer: Mutex::new(()),
                changes,
            }),
        })
    }

    fn commit_blocking(inner: &Inner, txn: Txn) -> Result<Option<Revision>, StoreError> {
        let _guard = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = inner.db.begin_write().map_err(err)?;
        let revision;
        let mut events = Vec::with_capacity(txn.ops.len());
        {
            let mut objects = tx.open_table(OBJECTS).map_err(err)?;
            let mut meta = tx.open_table(META).map_err(err)?;
            let current = meta
                .get("revision")
                .map_err(err)?
                .map(|g| g.value())
                .unwrap_or(0);
            for Compare::ModRevision(key, want) in &txn.compares {
                let have = match objects.get(key.as_str()).map_err(err)? {
                    Some(g) => split_value(g.value())?.0,
                    None => 0,
                };
                if have != *want {
                    return Ok(None);
                }
            }
            revision = current + 1;
            for op in &txn.ops {
                match op {
                    Op::Put(key, value) => {
                        let mut raw = Vec::with_capacity(8 + value.len());
                        raw.extend_from_slice(&revision.to_le_bytes());
                        raw.extend_from_slice(value);
                        objects.insert(key.as_str(), raw.as_slice()).map_err(err)?;
                        events.push(StoreEvent {
                            key: key.clone(),
                            value: Some(value.clone()),
                        });
                    }
                    Op::Delete(key) => {
                        if objects.remove(key.as_str()).map_err(err)?.is_some() {
                            events.push(StoreEvent {
                                key: key.clone(),
                                value: None,
                            });
                        }
                    }
                }
            }
            if events.is_empty() {
                return Ok(Some(current));
            }
            meta.insert("revision", revision).map_err(err)?;
            let mut log = tx.open_table(LOG).map_err(err)?;
            log.insert(revision, encode_events(&events).as_slice())
                .map_err(err)?;
            let compacted = meta
                .get("compacted")
                .map_err(err)?
                .map(|g| g.value())
                .unwrap_or(0);
            let keep_after = revision.saturating_sub(inner.history);
            if keep_after > compacted {
                for r in compacted + 1..=keep_after {
                    log.remove(r).map_err(err)?;
                }
                meta.insert("compacted", keep_after).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        // Nobody listening is fine.
        let _ = inner.changes.send(Arc::new((revision, events)));
        Ok(Some(revision))
    }

    /// Read what a watcher at `from` is missing: a snapshot or the log after `from`.
    fn catch_up(
        inner: &Inner,
        prefix: &str,
        from: Revision,
    ) -> Result<(Revision, Vec<WatchItem>), StoreError> {
        let tx = inner.db.begin_read().map_err(err)?;
        let meta = tx.open_table(META).map_err(err)?;
        let current = meta
            .get("revision")
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0);
        let compacted = meta
            .get("compacted")
            .map_err(err)?
            .map(|g| g.value())
            .unwrap_or(0);
        if from == 0 || from < compacted || from > current {
            let objects = tx.open_table(OBJECTS).map_err(err)?;
            let kvs = list_in(&objects, prefix)?;
            return Ok((
                current,
                vec![WatchItem::Snapshot {
                    revision: current,
                    kvs,
                }],
            ));
        }
        let log = tx.open_table(LOG).map_err(err)?;
        let mut items = Vec::new();
        for entry in log.range(from + 1..).map_err(err)? {
            let (rev, raw) = entry.map_err(err)?;
            let events = filter(&decode_events(raw.value())?, prefix);
            if !events.is_empty() {
                items.push(WatchItem::Changes {
                    revision: rev.value(),
                    events,
                });
            }
        }
        Ok((current, items))
    }
}

fn list_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<KeyValue>, StoreError> {
    let mut kvs = Vec::new();
    for entry in table.range(prefix..).map_err(err)? {
        let (k, v) = entry.map_err(err)?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        let (mod_revision, value) = split_value(v.value())?;
        kvs.push(KeyValue {
            key: key.to_string(),
            value,
            mod_revision,
        });
    }
    Ok(kvs)
}

impl Store for RedbStore {
    fn backend(&self) -> &'static str {
        "redb"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let inner = self.inner.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let tx = inner.db.begin_read().map_err(err)?;
            let objects = tx.open_table(OBJECTS).map_err(err)?;
            match objects.get(key.as_str()).map_err(err)? {
                Some(g) => {
                    let (mod_revision, value) = split_value(g.value())?;
                    Ok(Some(KeyValue {
                        key,
                        value,
                        mod_revision,
                    }))
                }
                None => Ok(None),
            }
        })
        .await
        .map_err(join_err)?
    }

    async fn list(&self, prefix: &str) -> Result<(Revision, Vec<KeyValue>), StoreError> {
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let tx = inner.db.begin_read().map_err(err)?;
            let meta = tx.open_table(META).map_err(err)?;
            let current = meta
                .get("revision")
                .map_err(err)?
                .map(|g| g.value())
                .unwrap_or(0);
            let objects = tx.open_table(OBJECTS).map_err(err)?;
            Ok((current, list_in(&objects, &prefix)?))
        })
        .await
        .map_err(join_err)?
    }

    async fn commit(&self, txn: Txn) -> Result<Option<Revision>, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || Self::commit_blocking(&inner, txn))
            .await
            .map_err(join_err)?
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchReceiver, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut last = from;
            'catch_up: loop {
                // Subscribe before reading so nothing committed in between is missed.
                let mut live = inner.changes.subscribe();
                let inner2 = inner.clone();
                let p = prefix.clone();
                let read =
                    tokio::task::spawn_blocking(move || Self::catch_up(&inner2, &p, last)).await;
                let (current, items) = match read {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(join_err(e))).await;
                        return;
                    }
                };
                for item in items {
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                last = current;
                loop {
                    let batch = tokio::select! {
                        b = live.recv() => b,
                        _ = tx.closed() => return,
                    };
                    match batch {
                        Ok(batch) => {
                            let (revision, ref events) = *batch;
                            if revision <= last {
                                continue;
                            }
                            if revision != last + 1 {
                                continue 'catch_up;
                            }
                            last = revision;
                            let events = filter(events, &prefix);
                            if !events.is_empty()
                                && tx
                                    .send(Ok(WatchItem::Changes { revision, events }))
                                    .await
                                    .is_err()
                            {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => continue 'catch_up,
                        Err(broadcast::error::RecvError::Closed) => return,
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

    #[test]
    fn events_round_trip() {
        let events = vec![
            StoreEvent {
                key: "/a".into(),
                value: Some(b"x".to_vec()),
            },
            StoreEvent {
                key: "/b".into(),
                value: None,
            },
        ];
        assert_eq!(decode_events(&encode_events(&events)).unwrap(), events);
        assert!(decode_events(&[9, 0, 0, 0, b'a']).is_err());
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        crate::store::conformance::basic(&store).await;
    }

    #[tokio::test]
    async fn compacted_history_gives_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open_with_history(dir.path(), 2).unwrap();
        for i in 0..5u8 {
            store
                .commit(Txn {
                    compares: vec![],
                    ops: vec![Op::Put(format!("/k/{i}"), vec![i])],
                })
                .await
                .unwrap();
        }
        let mut rx = store.watch("/k/", 1).await.unwrap();
        match rx.recv().await.unwrap().unwrap() {
            WatchItem::Snapshot { revision, kvs } => {
                assert_eq!(revision, 5);
                assert_eq!(kvs.len(), 5);
            }
            other => panic!("expected a snapshot, got {other:?}"),
        }
        let mut rx = store.watch("/k/", 3).await.unwrap();
        match rx.recv().await.unwrap().unwrap() {
            WatchItem::Changes { revision, .. } => assert_eq!(revision, 4),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[test]
    fn errors_keep_their_causes() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let _held = RedbStore::open(dir.path()).unwrap();
        let Err(e) = RedbStore::open(dir.path()) else {
            panic!("a store already open in this process opened again");
        };
        assert!(matches!(e, StoreError::Redb(_)), "{e:?}");
        let cause = e.source().expect("the redb error is kept");
        assert!(cause.downcast_ref::<redb::Error>().is_some(), "{cause:?}");

        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let Err(e) = RedbStore::open(&file.join("sub")) else {
            panic!("a store under a regular file opened");
        };
        assert!(
            e.to_string().starts_with("embedded store: cannot create "),
            "{e}"
        );
        let cause = e.source().and_then(|c| c.downcast_ref::<std::io::Error>());
        assert!(cause.is_some(), "{e:?}");

        let Err(e) = decode_events(&[1, 0, 0, 0, 0xff, 0]) else {
            panic!("a key that is not UTF-8 decoded");
        };
        assert!(e.source().is_some(), "{e:?}");
    }

    /// A watcher that reads nothing while more revisions commit than its buffer and the in-memory
    /// change ring hold still gets every one of them, in order: it catches up from the log.
    #[tokio::test]
    async fn a_watcher_behind_the_change_ring_reads_the_rest_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        store
            .commit(Txn {
                compares: vec![],
                ops: vec![Op::Put("/k/first".into(), vec![0])],
            })
            .await
            .unwrap();
        let mut rx = store.watch("/k/", 1).await.unwrap();
        let n = (WATCH_BUFFER + 3 * CHANGE_RING) as u64;
        for i in 0..n {
            store
                .commit(Txn {
                    compares: vec![],
                    ops: vec![Op::Put(format!("/k/{}", i % 7), i.to_le_bytes().to_vec())],
                })
                .await
                .unwrap();
        }
        let mut last = 1;
        while last < n + 1 {
            match tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("the watcher stalled")
                .unwrap()
                .unwrap()
            {
                WatchItem::Changes { revision, .. } => {
                    assert_eq!(revision, last + 1, "a revision skipped or repeated");
                    last = revision;
                }
                other => panic!("expected changes, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn reopen_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store
                .commit(Txn {
                    compares: vec![],
                    ops: vec![Op::Put("/x".into(), b"1".to_vec())],
                })
                .await
                .unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let (rev, kvs) = store.list("/").await.unwrap();
        assert_eq!(rev, 1);
        assert_eq!(kvs[0].value, b"1");
    }
}
