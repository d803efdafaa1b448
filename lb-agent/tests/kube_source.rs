//! The API-server source against a mocked API server (tower-test): the initial lists, watch
//! events, a 410 Gone that forces a re-list (the vanished service must go), and a dropped watch
//! connection. The pipeline behind it is the real one (state, model, writer on an in-memory
//! store), so the assertions are on programmed frontends.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, channel::mpsc};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::StreamBody;
use kube::{Client, client::Body};
mod common;

use lb_agent::{
    config::ModelConfig,
    dataplane::{
        store::{MapStore, MemoryStore},
        writer::canonical,
    },
    sources::kube::{KubeMsg, LABEL_SELECTOR, watch},
    sync::Syncer,
};
use serde_json::{Value, json};

type WatchTx = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;
type MockBody = StreamBody<mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;

/// The API server: current objects per collection, and the open watch streams.
#[derive(Default)]
struct Api {
    items: HashMap<&'static str, Vec<Value>>,
    watches: HashMap<&'static str, Vec<WatchTx>>,
    requests: Vec<String>,
    /// Collections whose lists are refused with this status (RBAC missing, say).
    refused: HashMap<&'static str, u16>,
}

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

fn list_kind(path: &str) -> &'static str {
    match path {
        SERVICES => "ServiceList",
        SLICES => "EndpointSliceList",
        _ => "NodeList",
    }
}

fn body(bytes: Vec<u8>, keep_open: Option<&mut Vec<WatchTx>>) -> MockBody {
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send(Ok(Frame::data(Bytes::from(bytes)))).unwrap();
    match keep_open {
        Some(watches) => watches.push(tx),
        None => drop(tx),
    }
    StreamBody::new(rx)
}

fn spawn_api(api: Arc<Mutex<Api>>) -> Client {
    Client::new(serve_api(api), "default")
}

/// The mocked API server's service, answered by a task of its own.
fn serve_api(api: Arc<Mutex<Api>>) -> tower_test::mock::Mock<Request<Body>, Response<MockBody>> {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let uri = req.uri().clone();
            let path: &'static str = match uri.path() {
                SERVICES => SERVICES,
                SLICES => SLICES,
                NODES => NODES,
                other => panic!("unexpected request {other}"),
            };
            let query = uri.query().unwrap_or("").to_string();
            let mut api = api.lock().unwrap();
            api.requests.push(format!("{path}?{query}"));
            if let Some(&code) = api.refused.get(path) {
                let status = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": code});
                let mut refusal = Response::new(body(serde_json::to_vec(&status).unwrap(), None));
                *refusal.status_mut() = http::StatusCode::from_u16(code).unwrap();
                send.send_response(refusal);
            } else if query.contains("watch=true") {
                // Open a watch: events are pushed later by the test.
                let mut watches = std::mem::take(api.watches.entry(path).or_default());
                let b = body(Vec::new(), Some(&mut watches));
                api.watches.insert(path, watches);
                send.send_response(Response::new(b));
            } else {
                let items = api.items.get(path).cloned().unwrap_or_default();
                let list = json!({"apiVersion": "v1", "kind": list_kind(path), "metadata": {"resourceVersion": "10"}, "items": items});
                send.send_response(Response::new(body(serde_json::to_vec(&list).unwrap(), None)));
            }
        }
    });
    service
}

/// Sends a watch event to every open watch of `path`.
fn push(api: &Arc<Mutex<Api>>, path: &'static str, event: Value) {
    let api = api.lock().unwrap();
    let mut line = serde_json::to_vec(&event).unwrap();
    line.push(b'\n');
    for tx in api.watches.get(path).into_iter().flatten() {
        let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))));
    }
}

fn service(name: &str, ip: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
           "spec": {"clusterIP": ip, "ports": [{"port": 80}]}})
}

fn slice(svc: &str, ips: &[&str], rv: &str) -> Value {
    let eps: Vec<Value> =
        ips.iter().map(|ip| json!({"addresses": [ip], "nodeName": "node-b"})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{svc}-1"), "namespace": "default", "resourceVersion": rv, "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4", "ports": [{"port": 8080}], "endpoints": eps})
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "3"},
           "status": {"addresses": [{"type": "InternalIP", "address": "10.210.0.11"}]}})
}

/// Frontend address -> number of distinct backends, from the programmed maps.
fn programmed(s: &Syncer<MemoryStore>) -> Vec<(String, usize)> {
    let dump = canonical(&s.writer.store().snapshot().unwrap()).unwrap();
    dump.frontends
        .iter()
        .map(|(k, (_, _, count, _))| (format!("{}:{}", k.ip(), k.port()), *count as usize))
        .collect()
}

/// Drives the source (applying what it yields) until `done` holds.
async fn until(
    what: &str,
    syncer: &mut Syncer<MemoryStore>,
    stream: &mut futures::stream::BoxStream<'static, KubeMsg>,
    done: impl Fn(&Syncer<MemoryStore>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !done(syncer) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}; programmed: {:?}",
            programmed(syncer)
        );
        match tokio::time::timeout(Duration::from_millis(50), stream.next()).await {
            Err(_) => continue,
            Ok(None) => panic!("the watch stream ended"),
            Ok(Some(KubeMsg::Events(ev))) => {
                syncer.apply(ev);
            }
            Ok(Some(KubeMsg::Relist(kind, objects))) => {
                syncer.apply_relist(kind, objects);
            }
        }
    }
}

fn watch_open(api: &Arc<Mutex<Api>>, path: &'static str) -> bool {
    api.lock().unwrap().watches.get(path).is_some_and(|w| !w.is_empty())
}

#[tokio::test]
async fn lists_watches_410_gone_and_reconnects_leave_nothing_stale_or_missing() {
    let api = Arc::new(Mutex::new(Api::default()));
    {
        let mut a = api.lock().unwrap();
        a.items.insert(
            SERVICES,
            vec![service("web", "10.96.0.10", "5"), service("old", "10.96.0.11", "6")],
        );
        a.items.insert(
            SLICES,
            vec![
                slice("web", &["10.244.1.1", "10.244.1.2"], "7"),
                slice("old", &["10.244.2.1"], "8"),
            ],
        );
        a.items.insert(NODES, vec![node()]);
    }
    let client = spawn_api(api.clone());
    let mut syncer = common::memory_syncer(ModelConfig::new("node-a"));
    let mut stream = watch(client, "node-a");

    until("the initial lists are programmed", &mut syncer, &mut stream, |s| {
        programmed(s) == vec![("10.96.0.10:80".to_string(), 2), ("10.96.0.11:80".to_string(), 1)]
    })
    .await;
    {
        let a = api.lock().unwrap();
        let svc_list = a.requests.iter().find(|r| r.starts_with(SERVICES)).unwrap();
        let selector = svc_list.split('&').find(|p| p.starts_with("labelSelector=")).unwrap();
        let decoded = selector.replace("%21", "!").replace("%2C", ",").replace("%2F", "/");
        assert!(decoded.contains(LABEL_SELECTOR), "kube-proxy's selector: {decoded}");
        assert!(
            a.requests.iter().any(|r| r.starts_with(NODES) && r.contains("metadata.name%3Dnode-a")),
            "{:?}",
            a.requests
        );
    }

    // Wait until the watches are open, then scale web up through a watch event.
    let a = api.clone();
    until("the watches are open", &mut syncer, &mut stream, move |_| {
        watch_open(&a, SLICES) && watch_open(&a, SERVICES)
    })
    .await;
    push(
        &api,
        SLICES,
        json!({"type": "MODIFIED", "object": slice("web", &["10.244.1.1", "10.244.1.2", "10.244.1.3"], "11")}),
    );
    until("a watch event scales web to 3", &mut syncer, &mut stream, |s| {
        programmed(s).contains(&("10.96.0.10:80".to_string(), 3))
    })
    .await;

    // 410 Gone on the services watch, while `old` was deleted and its event missed: the re-list
    // must remove it.
    api.lock().unwrap().items.insert(SERVICES, vec![service("web", "10.96.0.10", "12")]);
    push(
        &api,
        SERVICES,
        json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": "too old resource version", "reason": "Expired", "code": 410}}),
    );
    until("the re-list drops the vanished service", &mut syncer, &mut stream, |s| {
        programmed(s) == vec![("10.96.0.10:80".to_string(), 3)]
    })
    .await;

    // The slices watch connection drops; the watcher reconnects and later events still apply.
    api.lock().unwrap().watches.remove(SLICES);
    let a = api.clone();
    until("the slices watch is reopened", &mut syncer, &mut stream, move |_| {
        watch_open(&a, SLICES)
    })
    .await;
    push(&api, SLICES, json!({"type": "MODIFIED", "object": slice("web", &["10.244.1.9"], "20")}));
    until("events after the reconnect apply", &mut syncer, &mut stream, |s| {
        programmed(s) == vec![("10.96.0.10:80".to_string(), 1)]
    })
    .await;
}

/// The value of one sample line `name{labels}` in a text exposition.
fn sample(page: &str, line_start: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
}

/// kube-proxy's client metrics for the agent's own requests, through the layer the agent puts
/// on its client: lists and watches answered 200 by method, a refused list (RBAC missing on
/// Nodes) by its code, each request's latency once.
#[tokio::test]
async fn api_requests_are_counted_by_code_and_method_as_kube_proxys_rest_client_metrics() {
    use lb_agent::sources::api_metrics::ApiMetrics;
    use tower::Layer;
    let api = Arc::new(Mutex::new(Api::default()));
    {
        let mut a = api.lock().unwrap();
        a.items.insert(SERVICES, vec![service("web", "10.96.0.10", "5")]);
        a.items.insert(SLICES, vec![slice("web", &["10.244.1.1"], "7")]);
        a.refused.insert(NODES, 403);
    }
    let metrics = ApiMetrics::default();
    let client =
        Client::new(metrics.layer("10.96.0.1:443").layer(serve_api(api.clone())), "default");
    let mut stream = watch(client, "node-a");
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let page = || {
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &registry).unwrap();
        page
    };
    let count = |page: &str, code: &str| {
        let labels = format!("{{code=\"{code}\",host=\"10.96.0.1:443\",method=\"GET\"}}");
        sample(page, &format!("rest_client_requests_total{labels}")).unwrap_or(0.0)
    };
    let sent = |path: &str| {
        let api = api.lock().unwrap();
        api.requests.iter().filter(|r| r.starts_with(path)).count() as f64
    };
    // The Node list is refused: only the other two kinds arrive, their watches open, and every
    // answer to them comes back through the layer (the stream must be polled for that).
    let mut relisted = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = page();
        let answered = count(&p, "200") == sent(SERVICES) + sent(SLICES);
        if relisted.len() == 2
            && watch_open(&api, SERVICES)
            && watch_open(&api, SLICES)
            && answered
            && count(&p, "403") >= 1.0
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never counted:\n{p}");
        let next = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        if let Ok(Some(KubeMsg::Relist(kind, _))) = next {
            relisted.push(kind);
        }
    }
    let p = page();
    // Node requests go on (the watcher retries with backoff); each counted once answered.
    assert!((1.0..=sent(NODES)).contains(&count(&p, "403")), "{p}");
    assert_eq!(count(&p, "200"), 4.0, "a list and a watch of each allowed kind: {p}");
    let timed = sample(
        &p,
        "rest_client_request_duration_seconds_count{host=\"10.96.0.1:443\",verb=\"GET\"}",
    );
    assert_eq!(timed, Some(count(&p, "200") + count(&p, "403")), "{p}");
}
