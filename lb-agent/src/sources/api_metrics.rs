//! The API server requests' metrics that kube-proxy serves (client-go's
//! `rest_client_requests_total{code,host,method}` and
//! `rest_client_request_duration_seconds{host,verb}`), for the agent's own requests: a tower
//! layer on the kube client. Dashboards built for kube-proxy chart its API traffic by code
//! with these (a node whose watches fail shows up as 4xx/5xx or `<error>`).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, Response};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP status, or `<error>` when no response came (client-go's word).
    pub code: String,
    pub host: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub host: String,
    pub verb: String,
}

type HistogramFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// client-go's buckets for request latency (seconds).
const LATENCY_BUCKETS: [f64; 12] =
    [0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];

/// Requests by outcome and their latency (to the response's headers: a watch's stream of
/// events comes after).
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
        }
    }
}

impl ApiMetrics {
    /// Registers both families under client-go's names (no prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "rest_client_requests",
            "Number of HTTP requests to the API server, partitioned by status code, method, and host",
            self.requests.clone(),
        );
        registry.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds (to the response's headers), by verb and host",
            self.latency.clone(),
        );
    }

    /// A layer counting the requests of a client of the API server at `host` (`address:port`
    /// as in its URL: client-go's label).
    pub fn layer(&self, host: &str) -> ApiMetricsLayer {
        ApiMetricsLayer { metrics: self.clone(), host: host.into() }
    }

    fn record(&self, host: &str, method: &str, code: String, seconds: f64) {
        let (host, method) = (host.to_owned(), method.to_owned());
        self.latency
            .get_or_create(&LatencyLabels { host: host.clone(), verb: method.clone() })
            .observe(seconds);
        self.requests.get_or_create(&RequestLabels { code, host, method }).inc();
    }
}

#[derive(Clone, Debug)]
pub struct ApiMetricsLayer {
    metrics: ApiMetrics,
    host: Arc<str>,
}

impl<S> Layer<S> for ApiMetricsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.metrics.clone(), host: self.host.clone() }
    }
}

/// A service whose every call is counted in [`ApiMetrics`].
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    metrics: ApiMetrics,
    host: Arc<str>,
}

impl<S, B, RB> Service<Request<B>> for Counted<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = req.method().clone();
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let start = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_owned(),
            };
            metrics.record(&host, method.as_str(), code, start.elapsed().as_secs_f64());
            result
        })
    }
}

/// client-go's `host` label of a cluster URL: its host and port as written (no credentials).
pub fn host_label(url: &http::Uri) -> String {
    let authority = url.authority().map_or("", |a| a.as_str());
    authority.rsplit('@').next().unwrap_or(authority).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_label_is_the_urls_host_and_port_without_credentials() {
        for (url, host) in [
            ("https://10.96.0.1:443", "10.96.0.1:443"),
            ("https://api.example.com/", "api.example.com"),
            ("https://user:pw@[fd00::1]:6443/base", "[fd00::1]:6443"),
        ] {
            assert_eq!(host_label(&url.parse().unwrap()), host, "{url}");
        }
    }
}
