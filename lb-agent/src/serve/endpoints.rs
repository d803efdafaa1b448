//! `/healthz` and `/livez` (kube-proxy's, see `proxy_health.rs`), `/readyz` (ready only after
//! the first complete sync of every object into the maps) on the health port, and `/metrics`
//! on its own port (as kube-proxy: the health port is opened to load balancers).

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{
    Reply,
    metrics::{CodeLabel, Metrics},
    proxy_health::ProxyHealth,
    reply,
};

pub struct Status {
    pub ready: AtomicBool,
    pub metrics: Metrics,
    /// Where the datapath's maps are pinned (counters are read from them at each scrape).
    pub bpffs: PathBuf,
    pub proxy: Mutex<ProxyHealth>,
}

impl Status {
    /// `health_timeout`: how long a change may wait to reach the maps (or the sync loop stay
    /// still) before `/healthz` and `/livez` answer 503.
    pub fn new(bpffs: PathBuf, health_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            metrics: Metrics::new(),
            bpffs,
            proxy: Mutex::new(ProxyHealth::new(health_timeout)),
        })
    }

    /// The proxy health (a poisoned lock still holds valid data: every update is one store).
    pub fn proxy(&self) -> std::sync::MutexGuard<'_, ProxyHealth> {
        self.proxy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which paths a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paths {
    /// `/healthz`, `/livez`, `/readyz`: the port load balancers and probes reach.
    Health,
    /// `/metrics`.
    Metrics,
    /// Both (one port for both flags).
    All,
}

impl Paths {
    pub fn describe(self) -> &'static str {
        match self {
            Paths::Health => "/healthz, /livez and /readyz",
            Paths::Metrics => "/metrics",
            Paths::All => "/healthz, /livez, /readyz and /metrics",
        }
    }

    fn serves(self, path: &str) -> bool {
        match self {
            Paths::All => true,
            Paths::Metrics => path == "/metrics",
            Paths::Health => path != "/metrics",
        }
    }
}

pub async fn handle(status: Arc<Status>, paths: Paths, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    if !paths.serves(path) {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    match path {
        path @ ("/healthz" | "/livez") => {
            let h = status.proxy();
            let (now, wall) = (Instant::now(), SystemTime::now());
            let (code, body, answers) = if path == "/healthz" {
                let (code, body) = h.healthz(now, wall);
                (code, body, &status.metrics.healthz)
            } else {
                let (code, body) = h.livez(now, wall);
                (code, body, &status.metrics.livez)
            };
            answers.get_or_create(&CodeLabel { code: code.as_str().into() }).inc();
            reply(code, "application/json", body)
        }
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
