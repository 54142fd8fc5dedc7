//! Serving the `Control` API: TLS (or plaintext on loopback only), TCP options, request counting,
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::Request;

use super::ControlService;
use crate::auth::{Authenticator, Identity};
use crate::metrics::{CountLayer, RequestCounts};
use crate::store::Store;

/// TLS material for the server (PEM).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("plaintext is only allowed on loopback addresses, not {0}")]
    PlaintextNotLoopback(SocketAddr),
    #[error("TLS setup: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("serving: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serve the control API on `listener` until `shutdown` completes. `tls: None` means plaintext,
/// refused unless the listener is on a loopback address.
pub async fn serve<S: Store>(
    listener: tokio::net::TcpListener,
    service: ControlService<S>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_counted(listener, service, auth, tls, shutdown, Arc::default()).await
}

/// [`serve`], counting every request by method and gRPC status in `counts` (for metrics).
pub async fn serve_counted<S: Store>(
    listener: tokio::net::TcpListener,
    service: ControlService<S>,
    auth: Authenticator,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()> + Send,
    counts: Arc<RequestCounts>,
) -> Result<(), ServeError> {
    let local = listener.local_addr()?;
    let mut builder = tonic::transport::Server::builder();
    match tls {
        Some(t) => {
            let cfg = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem));
            builder = builder.tls_config(cfg).map_err(ServeError::Tls)?;
        }
        None if local.ip().is_loopback() => {}
        None => return Err(ServeError::PlaintextNotLoopback(local)),
    }
    // Without TCP_NODELAY, small watch messages wait for delayed ACKs (40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(30)));
    // Graceful shutdown waits for every connection to end, and an agent's Watch or
    // PushFlowEvents stream never does: after SHUTDOWN_GRACE the rest are cut (the agents
    // reconnect with backoff, as after a kill).
    let (began, fired) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = began.send(());
    };
    let serving = builder
        .layer(CountLayer(counts))
        .add_service(service.into_server(auth))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::select! {
        r = serving => r.map_err(ServeError::Transport),
        () = async {
            match fired.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::info!(
                "connections still open {SHUTDOWN_GRACE:?} after the shutdown began (streams): closed"
            );
            Ok(())
        }
    }
}

/// How long a shutdown waits for open connections (requests in flight) before closing them.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// For callers that hold an [`Identity`] outside a request (tests).
pub fn with_identity<T>(mut req: Request<T>, id: Identity) -> Request<T> {
    req.extensions_mut().insert(id);
    req
}
