//! `/healthz` (the agent is alive), `/readyz` (ready only after the first complete sync of every
//! object into the maps) and `/metrics`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{Reply, metrics::Metrics, reply};

pub struct Status {
    pub ready: AtomicBool,
    pub metrics: Metrics,
    /// Where the datapath's maps are pinned (counters are read from them at each scrape).
    pub bpffs: PathBuf,
}

impl Status {
    pub fn new(bpffs: PathBuf) -> Arc<Self> {
        Arc::new(Self { ready: AtomicBool::new(false), metrics: Metrics::new(), bpffs })
    }
}

pub async fn handle(status: Arc<Status>, req: Request<Incoming>) -> Reply {
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if status.ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/readyz" => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "initial sync not done\n")
        }
        "/metrics" => match status.metrics.encode(&status.bpffs) {
            Ok(text) => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e:#}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
