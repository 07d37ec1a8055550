//! Per-request context carried through the proxy phases.

use crate::config::Config;
use crate::limiter::Decision;
use crate::metrics::RequestDecision;
use crate::routes::Route;
use crate::state::InFlight;
use std::sync::Arc;
use std::time::Instant;

pub struct Ctx {
    /// The config generation this request started on; it finishes on the same one.
    pub config: Option<Arc<Config>>,
    pub route: Option<Arc<Route>>,
    /// The decision whose headers the upstream response gains (none in shadow mode).
    pub decision: Option<Decision>,
    /// What this request was counted as (none until it is).
    pub counted_as: Option<RequestDecision>,
    /// Upstream connection attempts so far (one per target tried).
    pub attempts: usize,
    pub upstream_start: Option<Instant>,
    /// The request is a gRPC call: the gateway's own refusals are gRPC statuses.
    pub grpc: bool,
    pub started: Instant,
    pub _in_flight: InFlight,
}

impl Ctx {
    pub fn new(in_flight: InFlight) -> Ctx {
        Ctx {
            config: None,
            route: None,
            decision: None,
            counted_as: None,
            attempts: 0,
            upstream_start: None,
            grpc: false,
            started: Instant::now(),
            _in_flight: in_flight,
        }
    }
}
