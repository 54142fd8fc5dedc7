//! Prometheus metrics.
//!
//! - [`exposition`] (feature `client`): the Prometheus text format and the `GET /metrics`
//!   endpoint, used by the control plane and the node agent alike; re-exported here.
//! - `control` (feature `server`): the control plane's own metrics, listed in its module doc and
//!   in `control/README.md`; re-exported here.

#[cfg(feature = "server")]
mod control;
pub mod exposition;

#[cfg(feature = "server")]
pub use control::{ControlRegistry, Count, CountLayer, RequestCounts};
pub use exposition::{serve_http, to_prometheus_text};
