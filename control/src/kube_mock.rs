//! A mock Kubernetes API server for tests (feature `kube-mock`), the way kube-rs tests itself:
//! behind a `kube::Client` through a `tower-test` mock service ([`MockApi::client`]), or over
//! HTTP on a TCP address ([`MockApi::serve_http`]) for a `sluice-control` process pointed at it
//! with `--kubeconfig` ([`kubeconfig`]).
//!
//! It speaks only the documented API (api-concepts: "Efficient detection of changes", "Retrieving
//! large results sets in chunks", "Watch bookmarks", "Resource versions"), with objects built from
//! the k8s-openapi types, and knows nothing of Sluice:
//! - `GET` of a collection (all namespaces, or one) is a list: `metadata.resourceVersion` is the
//!   current one; `limit` cuts it into pages of a consistent snapshot linked by `continue`; a
//!   `continue` token that expired answers `410 Gone` (reason `Expired`).
//! - `GET ...?watch=true&resourceVersion=N` is a chunked stream of `{"type","object"}` lines:
//!   every change after N (ADDED, MODIFIED, DELETED), `BOOKMARK`s to watches that asked for them
//!   ([`MockApi::bookmark`]), and, when N is older than the history kept ([`MockApi::compact`]),
//!   one `ERROR` event with a `410` Status, then the end. [`MockApi::end_watches`] ends every
//!   stream as a server timeout does; [`MockApi::gone`] sends every open watch an `ERROR 410`.
//! - `GET` of one object; `PATCH` of one object with a JSON merge patch (or a strategic merge
//!   patch, applied as a merge patch: right for maps such as annotations).
//! - [`MockApi::set_refusing`]: the server refuses connections (the tower client gets a
//!   connection error, the HTTP listener is closed); [`MockApi::set_page_delay`]: slow lists;
//!   [`MockApi::expire_continue`]: the next list continuations fail (a list cut short).
//!
//! Every request is logged ([`MockApi::requests`]) so tests can check what the client did.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use k8s_openapi::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

/// The body of every answer.
pub type MockBody = BoxBody<Bytes, std::io::Error>;

type Chunk = Result<Frame<Bytes>, std::io::Error>;

/// One kind the mock serves: where its collection is and what its lists are called.
#[derive(Debug, Clone)]
struct KindInfo {
    api_version: &'static str,
    kind: &'static str,
    namespaced: bool,
}

#[derive(Debug, Clone)]
struct Stored {
    value: Value,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    value: Value,
}

struct Watch {
    collection: String,
    namespace: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Default)]
struct State {
    kinds: HashMap<String, KindInfo>,
    rv: u64,
    /// (collection, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Stored>,
    /// Changes after `compacted`, in order.
    history: Vec<Change>,
    compacted: u64,
    watches: Vec<Watch>,
    /// Continue token -> (list resourceVersion, the rest of the snapshot).
    pages: HashMap<String, (u64, Vec<Value>)>,
    next_token: u64,
    refusing: bool,
    page_delay: Duration,
    expire_continue: usize,
    requests: Vec<String>,
}

/// The mock API server. Clones share it.
#[derive(Clone)]
pub struct MockApi {
    state: Arc<Mutex<State>>,
    /// Woken when `refusing` changes.
    refusing_changed: Arc<Notify>,
}

impl std::fmt::Debug for MockApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockApi").finish_non_exhaustive()
    }
}

fn collection_of<K: Resource>() -> String {
    let base = if K::GROUP.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{}", K::API_VERSION)
    };
    format!("{base}/{}", K::URL_PATH_SEGMENT)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn full(code: StatusCode, v: &Value) -> Response<MockBody> {
    let body = http_body_util::Full::new(Bytes::from(v.to_string()))
        .map_err(|e: Infallible| match e {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn event_line(ty: &str, object: &Value) -> Chunk {
    let mut line = json!({"type": ty, "object": object}).to_string();
    line.push('\n');
    Ok(Frame::data(Bytes::from(line)))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// JSON merge patch (RFC 7386).
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Where a request goes: (collection, namespace if the path names one, object name if any).
fn route(path: &str) -> Option<(String, Option<String>, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (base, rest) = match *segs.first()? {
        "api" if segs.len() >= 3 => (format!("/api/{}", segs[1]), &segs[2..]),
        "apis" if segs.len() >= 4 => (format!("/apis/{}/{}", segs[1], segs[2]), &segs[3..]),
        _ => return None,
    };
    match rest {
        ["namespaces", ns, plural, name @ ..] if name.len() <= 1 => Some((
            format!("{base}/{plural}"),
            Some(ns.to_string()),
            name.first().map(|n| n.to_string()),
        )),
        [plural] => Some((format!("{base}/{plural}"), None, None)),
        [plural, name] => Some((format!("{base}/{plural}"), None, Some(name.to_string()))),
        _ => None,
    }
}

impl Default for MockApi {
    fn default() -> Self {
        Self::new()
    }
}

impl MockApi {
    /// A server knowing Namespaces, Nodes, Pods, Services, EndpointSlices and NetworkPolicies
    /// (more with [`MockApi::register`]), holding nothing, at resourceVersion 1.
    pub fn new() -> Self {
        use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use k8s_openapi::api::networking::v1::NetworkPolicy;
        let api = Self {
            state: Arc::default(),
            refusing_changed: Arc::default(),
        };
        api.lock().rv = 1;
        api.register::<Namespace>();
        api.register::<Node>();
        api.register::<Pod>();
        api.register::<Service>();
        api.register::<EndpointSlice>();
        api.register::<NetworkPolicy>();
        api
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve kind `K` too.
    pub fn register<K: Resource>(&self) {
        let namespaced = std::any::type_name::<K::Scope>().ends_with("NamespaceResourceScope");
        self.lock().kinds.insert(
            collection_of::<K>(),
            KindInfo {
                api_version: K::API_VERSION,
                kind: K::KIND,
                namespaced,
            },
        );
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// Record a change and send it to the watches of its collection.
    fn publish(st: &mut State, change: Change) {
        let line = |c: &Change| event_line(c.kind, &c.value);
        st.watches.retain(|w| {
            if w.collection != change.collection
                || w.namespace.as_ref().is_some_and(|n| *n != change.namespace)
            {
                return !w.tx.is_closed();
            }
            w.tx.send(line(&change)).is_ok()
        });
        st.history.push(change);
    }

    /// Create or replace an object (ADDED or MODIFIED); returns its new resourceVersion.
    pub fn put<K: Resource + Serialize>(&self, obj: &K) -> u64 {
        let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
        v["apiVersion"] = json!(K::API_VERSION);
        v["kind"] = json!(K::KIND);
        let mut st = self.lock();
        self.put_value(&mut st, collection_of::<K>(), v)
    }

    fn put_value(&self, st: &mut State, collection: String, mut v: Value) -> u64 {
        st.rv += 1;
        let rv = st.rv;
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        let key = (collection.clone(), ns.clone(), name.clone());
        let existed = st
            .objects
            .get(&key)
            .map(|s| s.value["metadata"]["uid"].clone());
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        v["metadata"]["uid"] = match &existed {
            Some(uid) if !uid.is_null() => uid.clone(),
            _ => json!(format!("uid-{rv}")),
        };
        let kind = if existed.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, Stored { value: v.clone() });
        Self::publish(
            st,
            Change {
                rv,
                collection,
                namespace: ns,
                kind,
                value: v,
            },
        );
        rv
    }

    /// Delete an object (DELETED, carrying its last state at a new resourceVersion); `false` if
    /// there was none.
    pub fn delete<K: Resource>(&self, namespace: Option<&str>, name: &str) -> bool {
        let mut st = self.lock();
        let key = (
            collection_of::<K>(),
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        let Some(mut old) = st.objects.remove(&key) else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        old.value["metadata"]["resourceVersion"] = json!(rv.to_string());
        Self::publish(
            &mut st,
            Change {
                rv,
                collection: key.0,
                namespace: key.1,
                kind: "DELETED",
                value: old.value,
            },
        );
        true
    }

    /// One object as stored.
    pub fn get<K: Resource + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let st = self.lock();
        let key = (
            collection_of::<K>(),
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        serde_json::from_value(st.objects.get(&key)?.value.clone()).ok()
    }

    /// Send a BOOKMARK at the current resourceVersion to every watch that allows bookmarks.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv;
        let kinds = st.kinds.clone();
        st.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let info = kinds.get(&w.collection);
            let obj = json!({"kind": info.map_or("", |i| i.kind),
                "apiVersion": info.map_or("", |i| i.api_version),
                "metadata": {"resourceVersion": rv.to_string()}});
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
    }

    /// End every open watch stream (as the server's watch timeout does).
    pub fn end_watches(&self) {
        self.lock().watches.clear();
    }

    /// Forget the history up to now: watches and list continuations from before answer `410`.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.history.clear();
        st.pages.clear();
    }

    /// Send every open watch an `ERROR` event with a `410 Gone` Status and end it, after
    /// compacting (so that resuming from where they were fails too: the client must relist).
    pub fn gone(&self) {
        self.compact();
        let mut st = self.lock();
        let msg = format!("too old resource version: 1 ({})", st.rv);
        for w in st.watches.drain(..) {
            let _ =
                w.tx.send(event_line("ERROR", &status(410, "Expired", &msg)));
        }
    }

    /// Refuse connections (and end open watches) while `true`.
    pub fn set_refusing(&self, refusing: bool) {
        {
            let mut st = self.lock();
            st.refusing = refusing;
            if refusing {
                st.watches.clear();
            }
        }
        self.refusing_changed.notify_waiters();
    }

    /// Wait this long before answering each list page.
    pub fn set_page_delay(&self, d: Duration) {
        self.lock().page_delay = d;
    }

    /// The next `n` list continuations answer `410 Gone` (their snapshot expired), as a server
    /// does when a paginated list takes longer than its history lasts.
    pub fn expire_continue(&self, n: usize) {
        self.lock().expire_continue = n;
    }

    fn refusing(&self) -> bool {
        self.lock().refusing
    }

    /// Answer one request. `Err` when the server refuses connections.
    pub async fn answer(
        &self,
        method: Method,
        uri: http::Uri,
        body: Bytes,
    ) -> Result<Response<MockBody>, std::io::Error> {
        let delay = {
            let mut st = self.lock();
            st.requests.push(format!("{method} {uri}"));
            if st.refusing {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused (mock API server is down)",
                ));
            }
            st.page_delay
        };
        let q = query(&uri);
        let Some((collection, ns, name)) = route(uri.path()) else {
            return Ok(full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ));
        };
        let info = self.lock().kinds.get(&collection).cloned();
        let Some(info) = info else {
            return Ok(full(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            ));
        };
        let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
        Ok(match (method, name) {
            (Method::GET, None) if watching => self.watch(&collection, ns, &q),
            (Method::GET, None) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                self.list(&collection, &info, ns, &q)
            }
            (Method::GET, Some(name)) => {
                let st = self.lock();
                let key = (collection, ns.unwrap_or_default(), name.clone());
                match st.objects.get(&key) {
                    Some(s) => full(StatusCode::OK, &s.value),
                    None => full(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            &format!("{} {name:?} not found", info.kind),
                        ),
                    ),
                }
            }
            (Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                    return Ok(full(
                        StatusCode::BAD_REQUEST,
                        &status(400, "BadRequest", "the patch is not JSON"),
                    ));
                };
                let mut st = self.lock();
                let key = (collection.clone(), ns.unwrap_or_default(), name.clone());
                let Some(s) = st.objects.get(&key) else {
                    return Ok(full(
                        StatusCode::NOT_FOUND,
                        &status(
                            404,
                            "NotFound",
                            &format!("{} {name:?} not found", info.kind),
                        ),
                    ));
                };
                let mut v = s.value.clone();
                merge_patch(&mut v, &patch);
                self.put_value(&mut st, collection, v);
                let stored = st
                    .objects
                    .get(&key)
                    .map(|s| s.value.clone())
                    .unwrap_or_default();
                full(StatusCode::OK, &stored)
            }
            _ => full(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "not supported by this mock"),
            ),
        })
    }

    fn list(
        &self,
        collection: &str,
        info: &KindInfo,
        ns: Option<String>,
        q: &HashMap<String, String>,
    ) -> Response<MockBody> {
        let mut st = self.lock();
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let (rv, rest) = match q.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let expired = st.expire_continue > 0;
                match st.pages.remove(token) {
                    Some(page) if !expired => page,
                    _ => {
                        st.expire_continue = st.expire_continue.saturating_sub(1);
                        return full(
                            StatusCode::GONE,
                            &status(
                                410,
                                "Expired",
                                "The provided continue parameter is too old to display a \
                                 consistent list result. You can start a new list without \
                                 the continue parameter.",
                            ),
                        );
                    }
                }
            }
            None => {
                let items = st
                    .objects
                    .iter()
                    .filter(|((c, n, _), _)| c == collection && ns.as_ref().is_none_or(|x| x == n))
                    .map(|(_, s)| s.value.clone())
                    .collect();
                (st.rv, items)
            }
        };
        let (items, more) = match limit {
            Some(l) if rest.len() > l => {
                let mut items = rest;
                let more = items.split_off(l);
                (items, Some(more))
            }
            _ => (rest, None),
        };
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if let Some(more) = more {
            st.next_token += 1;
            let token = format!("page-{}-{rv}", st.next_token);
            meta["continue"] = json!(token);
            meta["remainingItemCount"] = json!(more.len());
            st.pages.insert(token, (rv, more));
        }
        let _ = info.namespaced;
        full(
            StatusCode::OK,
            &json!({"kind": format!("{}List", info.kind), "apiVersion": info.api_version,
                "metadata": meta, "items": items}),
        )
    }

    fn watch(
        &self,
        collection: &str,
        ns: Option<String>,
        q: &HashMap<String, String>,
    ) -> Response<MockBody> {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        let mut st = self.lock();
        let from = q.get("resourceVersion").and_then(|r| r.parse::<u64>().ok());
        match from {
            Some(from) if from >= st.compacted => {
                for c in st.history.iter().filter(|c| {
                    c.rv > from
                        && c.collection == collection
                        && ns.as_ref().is_none_or(|n| *n == c.namespace)
                }) {
                    let _ = tx.send(event_line(c.kind, &c.value));
                }
                let bookmarks = matches!(
                    q.get("allowWatchBookmarks").map(String::as_str),
                    Some("true" | "1")
                );
                st.watches.push(Watch {
                    collection: collection.to_string(),
                    namespace: ns,
                    bookmarks,
                    tx: tx.clone(),
                });
                // The server ends a watch after its timeout.
                // (A weak sender: a watch ended by the server before its timeout must end now.)
                if let Some(secs) = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()) {
                    let state = Arc::downgrade(&self.state);
                    let weak = tx.downgrade();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                        if let (Some(s), Some(tx)) = (state.upgrade(), weak.upgrade()) {
                            let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
                            st.watches.retain(|w| !w.tx.same_channel(&tx));
                        }
                    });
                }
            }
            _ => {
                let msg = format!(
                    "too old resource version: {} ({})",
                    from.unwrap_or_default(),
                    st.compacted
                );
                let _ = tx.send(event_line("ERROR", &status(410, "Expired", &msg)));
            }
        }
        drop(st);
        let body =
            StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).boxed();
        let mut r = Response::new(body);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    /// A `kube::Client` talking to this server through a `tower-test` mock service (no sockets).
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let api = api.clone();
                tokio::spawn(async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    match api.answer(parts.method, parts.uri, body).await {
                        Ok(resp) => send.send_response(resp),
                        Err(e) => send.send_error(e),
                    }
                });
            }
        });
        kube::Client::new(service, "default")
    }

    /// Serve HTTP/1.1 on `addr` until the task is dropped; while refusing, the listener is
    /// closed (connections are refused) and open connections are dropped. Returns once the first
    /// listener is bound, with the task serving.
    pub async fn serve_http(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let first = tokio::net::TcpListener::bind(addr).await?;
        let api = self.clone();
        Ok(tokio::spawn(async move {
            let mut listener = Some(first);
            loop {
                let l = match listener.take() {
                    Some(l) => l,
                    None => match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let refused = api.refusing_changed.notified();
                    if api.refusing() {
                        break;
                    }
                    tokio::select! {
                        accepted = l.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let _ = stream.set_nodelay(true);
                            let api = api.clone();
                            conns.spawn(async move {
                                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                                    let api = api.clone();
                                    async move {
                                        let (parts, body) = req.into_parts();
                                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                        api.answer(parts.method, parts.uri, body).await
                                    }
                                });
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(io, svc)
                                    .await;
                            });
                        }
                        () = refused => {}
                    }
                }
                drop(l);
                conns.abort_all();
                while api.refusing() {
                    let wake = api.refusing_changed.notified();
                    if !api.refusing() {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), wake).await;
                }
            }
        }))
    }
}

/// A kubeconfig for a mock served at `server` (`http://127.0.0.1:PORT`), no credentials.
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: {server}\n\
         contexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\n\
         current-context: mock\nusers:\n- name: mock\n  user: {{}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_queries() {
        assert_eq!(
            route("/api/v1/pods"),
            Some(("/api/v1/pods".into(), None, None))
        );
        assert_eq!(
            route("/api/v1/namespaces/a/pods/p"),
            Some(("/api/v1/pods".into(), Some("a".into()), Some("p".into())))
        );
        assert_eq!(
            route("/api/v1/namespaces/a"),
            Some(("/api/v1/namespaces".into(), None, Some("a".into())))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            Some((
                "/apis/discovery.k8s.io/v1/endpointslices".into(),
                None,
                None
            ))
        );
        let uri: http::Uri = "/api/v1/pods?limit=2&continue=a%2Db&watch=true"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(q["continue"], "a-b");
        assert_eq!(q["limit"], "2");
        let mut v = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut v,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            v,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }
}
