//! The etcd v3 backend. Revisions are etcd's; transactions are etcd `Txn`s with `mod_revision`
//! compares (0 = absent, checked as `version == 0`); watches are etcd watches from a start
//! revision, falling back to a snapshot (a ranged get and its header revision) when etcd has
//! compacted the history a watcher asked for.

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, EventType, GetOptions, TxnOp, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{
    Compare, KeyValue, Op, Revision, Store, StoreError, StoreEvent, Txn, WatchItem, WatchReceiver,
};

/// A connection to an etcd cluster. All keys are written as given (the server prefixes them).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl EtcdStore {
    /// Connect to the etcd endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let client = Client::connect(endpoints, None).await?;
        Ok(Self { client })
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
