//! What the agent serves over HTTP: `/healthz`, `/livez`, `/readyz` and `/metrics`
//! (`endpoints.rs`, `proxy_health.rs`, `metrics.rs`), and the healthCheckNodePort of every LoadBalancer service with
//! externalTrafficPolicy Local (`health_check.rs`).

pub mod endpoints;
pub mod health_check;
pub mod metrics;
pub mod process_metrics;
pub mod proxy_health;

use std::{
    convert::Infallible,
    future::Future,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

pub type Reply = Response<Full<Bytes>>;

pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// Listens on `address`. An unspecified one (0.0.0.0 or ::) means every address of both
/// families where the node has IPv6 (load balancers and probes of IPv6 and dual-stack clusters
/// come over IPv6): a dual-stack socket; IPv4 alone where the node has none.
pub async fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    if !address.ip().is_unspecified() {
        return TcpListener::bind(address).await;
    }
    let dual_stack = || -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, address.port())).into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    match dual_stack() {
        Ok(l) => TcpListener::from_std(l),
        Err(_) => {
            TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, address.port()))).await
        }
    }
}

/// Serves HTTP/1.1 on `listener`, answering every request with `handler` until the task is
/// dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await
            {
                debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}
