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
use lb_agent::{
    config::ModelConfig,
    dataplane::{
        store::{MapStore, MemoryStore},
        writer::{Writer, WriterConfig, canonical},
    },
    model::maglev,
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
            if query.contains("watch=true") {
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
    Client::new(service, "default")
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
    let writer = Writer::new(
        MemoryStore::new(1 << 16, 1024),
        WriterConfig {
            maglev_max_size: maglev::DEFAULT_MAX_SIZE,
            max_services: 1024,
            answer_service_pings: true,
        },
    )
    .unwrap();
    let mut syncer = Syncer::new(ModelConfig::new("node-a"), writer);
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
