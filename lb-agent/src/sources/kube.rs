//! The Kubernetes API as the source of objects: watchers for Services, EndpointSlices and this
//! node's Node, with kube-proxy's label selector (objects of other proxies and headless
//! services' slices are filtered by the API server).
//!
//! A (re)list, at start or after a 410 Gone or a lost connection, arrives as one
//! [`KubeMsg::Relist`] that replaces every object of its kind, so nothing stale or missing
//! survives it. Watch events arrive as [`KubeMsg::Events`]. Errors are logged and retried with
//! backoff by kube-runtime.

use std::path::Path;

use anyhow::{Context, Result};
use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    client::ClientBuilder,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tracing::warn;

use super::{Event, Object, api_metrics::ApiMetrics};

/// kube-proxy's selector for Services and EndpointSlices.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

pub const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

#[derive(Debug)]
pub enum KubeMsg {
    Events(Vec<Event>),
    /// Every object of the kind, replacing what was known.
    Relist(Kind, Vec<Object>),
}

/// A client from a kubeconfig file, else the in-cluster or default configuration; `api_server`
/// overrides the URL (a cluster without kube-proxy cannot reach the `kubernetes` ClusterIP
/// before this agent runs). Its requests are counted in `metrics`.
pub async fn client(
    kubeconfig: Option<&Path>,
    api_server: Option<&str>,
    metrics: &ApiMetrics,
) -> Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no kubeconfig and not running in a cluster")?,
    };
    if let Some(url) = api_server {
        config.cluster_url =
            url.parse().with_context(|| format!("--k8s-api-server {url:?} is not a URL"))?;
    }
    let counted = metrics.layer(&super::api_metrics::host_label(&config.cluster_url));
    let builder = ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    Ok(builder.with_layer(&counted).build())
}

/// Turns one watcher into messages, buffering Init..InitDone into one Relist.
fn messages<K, F>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    kind: Kind,
    wrap: F,
) -> BoxStream<'static, KubeMsg>
where
    K: Send + 'static,
    F: Fn(K) -> Object + Send + Sync + 'static,
{
    let mut buffer: Option<Vec<Object>> = None;
    stream
        .filter_map(move |item| {
            let msg = match item {
                Ok(watcher::Event::Init) => {
                    buffer = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(k)) => {
                    buffer.get_or_insert_with(Vec::new).push(wrap(k));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    Some(KubeMsg::Relist(kind, buffer.take().unwrap_or_default()))
                }
                Ok(watcher::Event::Apply(k)) => Some(KubeMsg::Events(vec![Event::Apply(wrap(k))])),
                Ok(watcher::Event::Delete(k)) => {
                    Some(KubeMsg::Events(vec![Event::Delete(wrap(k).reference())]))
                }
                Err(e) => {
                    warn!(?kind, error = %e, "watch failed; retrying");
                    None
                }
            };
            futures::future::ready(msg)
        })
        .boxed()
}

/// Every change to the objects this node needs, merged from the three watchers.
pub fn watch(client: Client, node_name: &str) -> BoxStream<'static, KubeMsg> {
    let labelled = watcher::Config::default().labels(LABEL_SELECTOR);
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let node_cfg = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    futures::stream::select_all([
        messages(
            watcher(services, labelled.clone()).default_backoff(),
            Kind::Service,
            Object::Service,
        ),
        messages(
            watcher(slices, labelled).default_backoff(),
            Kind::EndpointSlice,
            Object::EndpointSlice,
        ),
        messages(watcher(nodes, node_cfg).default_backoff(), Kind::Node, Object::Node),
    ])
    .boxed()
}
