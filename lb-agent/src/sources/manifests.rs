//! A folder of Kubernetes manifests as the source of objects: how the agent runs without a
//! cluster (standalone L4 load balancer), and how the demo and every test here run.
//!
//! Files ending in `.yaml`, `.yml` or `.json` directly in the folder are read, each possibly
//! holding several `---`-separated documents (and `kind: List`). A bad document is reported with
//! its file, document number and field, and skipped; everything else keeps being served.
//! [`ManifestsDir::poll`] re-reads only files that changed and reports per-object changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::{Event, Object, ObjectRef};
use crate::{config::ModelConfig, model::service, state::SERVICE_NAME_LABEL};

/// A document that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: usize,
    /// Field path (`spec.ports[0].nodePort`), when the problem is one field.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}: ", self.file.display(), self.document)?;
        match &self.field {
            Some(field) => write!(f, "{field} {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// What one file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// Each object with its 1-based document number.
    pub objects: Vec<(usize, Object)>,
    pub errors: Vec<ManifestError>,
    /// Documents of kinds the agent does not watch (Deployments, ...): not errors.
    pub ignored: usize,
    /// Documents unchanged since the file's previous read, whose objects were reused.
    pub reused: usize,
    /// Per entry of `objects`: taken unchanged from the previous read.
    pub unchanged: Vec<bool>,
}

/// Splits a YAML stream into documents at `---` lines, with each document's first line number,
/// so that a syntax error in one document cannot hide the others. Documents are slices of
/// `text` (a `...` end marker stays in its document: YAML parsers accept it).
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut first_line, mut offset) = (0usize, 1usize, 0usize);
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((first_line, &text[start..offset]));
            (start, first_line) = (offset + line.len(), i + 2);
        }
        offset += line.len();
    }
    docs.push((first_line, &text[start..]));
    docs.retain(|(_, d)| {
        d.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#') && l != "..."
        })
    });
    docs
}

/// Parses the text of one manifest file (YAML or JSON).
pub fn parse_str(text: &str, file: &Path, cfg: &ModelConfig) -> Parsed {
    parse_reusing(text, file, cfg, None).0
}

/// The objects of each document of a file that parsed without error and were all accepted
/// (no duplicates), by a hash of the document's text.
type DocIndex = HashMap<u64, Vec<ObjectRef>>;

/// [`parse_str`] that takes the objects of documents whose text is unchanged from the file's
/// previous read (`previous`: its document index, and objects to move them out of) instead of
/// parsing them again: YAML parsing dominates a re-read, and a change usually touches one
/// document of many. Also returns, for each document without errors, its text's hash and its
/// objects: the next index, once the caller knows which objects it accepted.
fn parse_reusing(
    text: &str,
    file: &Path,
    cfg: &ModelConfig,
    mut previous: Option<(DocIndex, &mut BTreeMap<ObjectRef, Object>)>,
) -> (Parsed, Vec<(u64, Vec<ObjectRef>)>) {
    let mut out = Parsed::default();
    let mut index = Vec::new();
    // Document numbers count every document of the file, empty ones excluded.
    for (n, (first_line, doc)) in split_documents(text).into_iter().enumerate() {
        let document = n + 1;
        let hash = xxhash_rust::xxh3::xxh3_64(doc.as_bytes());
        if let Some((docs, objects)) = previous.as_mut()
            && let Some(refs) = docs.remove(&hash)
        {
            // Take the objects; if one is gone (a document repeated in the file), put back
            // what was taken and parse.
            let taken: Vec<(ObjectRef, Object)> =
                refs.iter().map_while(|r| objects.remove_entry(r)).collect();
            if taken.len() == refs.len() {
                if refs.is_empty() {
                    out.ignored += 1;
                }
                out.reused += 1;
                for (_, obj) in taken {
                    out.objects.push((document, obj));
                    out.unchanged.push(true);
                }
                index.push((hash, refs));
                continue;
            }
            objects.extend(taken);
        }
        let (objects_before, errors_before) = (out.objects.len(), out.errors.len());
        let err = |field: Option<String>, message: String| ManifestError {
            file: file.to_owned(),
            document,
            field,
            message,
        };
        let value: Value = match serde_yaml_ng::from_str(doc) {
            Ok(v) => v,
            Err(e) => {
                let line = e.location().map(|l| l.line() + first_line - 1);
                let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
                out.errors.push(err(None, format!("is not valid YAML{at}: {e}")));
                continue;
            }
        };
        parse_value(value, "", document, &mut out, &err, cfg);
        out.unchanged.resize(out.objects.len(), false);
        if out.errors.len() == errors_before {
            let refs = out.objects[objects_before..].iter().map(|(_, o)| o.reference()).collect();
            index.push((hash, refs));
        }
    }
    out.unchanged.resize(out.objects.len(), false);
    (out, index)
}

fn parse_value(
    value: Value,
    prefix: &str,
    document: usize,
    out: &mut Parsed,
    err: &dyn Fn(Option<String>, String) -> ManifestError,
    cfg: &ModelConfig,
) {
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let api = value.get("apiVersion").and_then(Value::as_str).map(str::to_owned);
    let field = |p: &str| Some(format!("{prefix}{p}"));
    match (api.as_deref(), kind.as_deref()) {
        (_, None) => out.errors.push(err(field("kind"), "is missing".into())),
        (Some("v1"), Some("List")) => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => return out.errors.push(err(field("items"), "must be a list".into())),
            };
            for (i, item) in items.into_iter().enumerate() {
                parse_value(item, &format!("{prefix}items[{i}]."), document, out, err, cfg);
            }
        }
        (Some("v1"), Some("Service")) => match typed::<Service>(value, prefix) {
            Ok(svc) => match service::parse(&svc, cfg) {
                Ok(_) => out.objects.push((document, Object::Service(svc))),
                Err(e) => out.errors.push(err(field(&e.path), e.message)),
            },
            Err((path, msg)) => out.errors.push(err(Some(path), msg)),
        },
        (Some("discovery.k8s.io/v1"), Some("EndpointSlice")) => {
            match typed::<EndpointSlice>(value, prefix) {
                Ok(slice) => match validate_slice(&slice) {
                    Ok(()) => out.objects.push((document, Object::EndpointSlice(slice))),
                    Err((path, msg)) => out.errors.push(err(field(&path), msg)),
                },
                Err((path, msg)) => out.errors.push(err(Some(path), msg)),
            }
        }
        (Some("v1"), Some("Node")) => match typed::<Node>(value, prefix) {
            Ok(node) if node.metadata.name.as_deref().unwrap_or("").is_empty() => {
                out.errors.push(err(field("metadata.name"), "is missing".into()))
            }
            Ok(node) => out.objects.push((document, Object::Node(node))),
            Err((path, msg)) => out.errors.push(err(Some(path), msg)),
        },
        (_, Some("Service" | "EndpointSlice" | "Node")) => out.errors.push(err(
            field("apiVersion"),
            format!(
                "{:?} is not the version this agent reads for kind {}",
                api.unwrap_or_default(),
                kind.unwrap_or_default()
            ),
        )),
        _ => out.ignored += 1,
    }
}

/// Deserializes with the path of the failing field.
fn typed<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            prefix.trim_end_matches('.').to_owned()
        } else {
            format!("{prefix}{path}")
        };
        (path, e.into_inner().to_string())
    })
}

fn validate_slice(slice: &EndpointSlice) -> Result<(), (String, String)> {
    if slice.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(("metadata.name".into(), "is missing".into()));
    }
    let labels = slice.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).is_none() {
        return Err((
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            "is missing: the slice belongs to no service".into(),
        ));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            return Err(("addressType".into(), format!("{other:?} is not IPv4, IPv6 or FQDN")));
        }
    };
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            return Err((format!("ports[{i}].port"), format!("{port} is outside 1-65535")));
        }
    }
    if let Some(v4) = family {
        for (i, ep) in slice.endpoints.iter().enumerate() {
            for (j, a) in ep.addresses.iter().enumerate() {
                let ok = a.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_ipv4() == v4);
                if !ok {
                    return Err((
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an {} address", slice.address_type),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A watched manifests folder: remembers each file's objects so that a change to one file
/// yields events for exactly the objects that changed.
#[derive(Debug)]
pub struct ManifestsDir {
    dir: PathBuf,
    cfg: ModelConfig,
    files: BTreeMap<PathBuf, FileState>,
    /// A file modified less than this long ago may still be being written (editors and
    /// `cp` write in place): reading it half-written would delete every object past the cut.
    /// It is read on a later poll. The first poll reads everything (nothing to protect yet).
    settle: Duration,
    polled: bool,
}

/// See [`ManifestsDir::settle`]. Files replaced by rename (ConfigMap volumes, `kubectl cp`
/// to a temporary name, most tools' safe writes) are whole at once and only wait this long.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    objects: BTreeMap<ObjectRef, Object>,
    /// What each cleanly parsed document held, for the next re-read (see [`parse_reusing`]).
    docs: DocIndex,
}

/// What tells a file changed without reading it: its modification time and size, and its
/// inode and change time, which no tool sets. A file replaced by one of the same size whose
/// modification time was kept (`cp -p`, `rsync -t`, `tar x`, an editor's backup restored)
/// differs in those, where it went unseen before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
    changed: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        Ok(Self {
            modified: meta.modified()?,
            len: meta.len(),
            inode: meta.ino(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// The outcome of one look at the folder.
#[derive(Debug, Default)]
pub struct Poll {
    pub events: Vec<Event>,
    pub errors: Vec<ManifestError>,
    /// Files read (new or changed) in this poll.
    pub files_read: usize,
    /// Documents of those files found unchanged, not parsed again.
    pub documents_reused: usize,
}

impl ManifestsDir {
    pub fn new(dir: impl Into<PathBuf>, cfg: ModelConfig) -> Self {
        Self { dir: dir.into(), cfg, files: BTreeMap::new(), settle: DEFAULT_SETTLE, polled: false }
    }

    /// Changes how long a modified file must stay untouched before it is read.
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads files that are new or changed since the last poll and forgets removed ones.
    /// The first poll reports every object.
    pub fn poll(&mut self) -> std::io::Result<Poll> {
        let mut seen = BTreeSet::new();
        let mut changed = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_manifest = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if !is_manifest || !path.is_file() {
                continue;
            }
            let meta = std::fs::metadata(&path)?;
            let stamp = Stamp::of(&meta)?;
            seen.insert(path.clone());
            if self.files.get(&path).is_none_or(|f| f.stamp != stamp) {
                // A clock step can put mtime in the future: then it counts as settled.
                let fresh = stamp.modified.elapsed().is_ok_and(|age| age < self.settle);
                if fresh && self.polled {
                    continue; // keeps its old objects until it settles
                }
                changed.push((path, stamp));
            }
        }
        self.polled = true;
        let mut poll = Poll::default();
        let mut before: BTreeMap<ObjectRef, Object> = BTreeMap::new();
        let removed: Vec<PathBuf> =
            self.files.keys().filter(|p| !seen.contains(*p)).cloned().collect();
        let mut old_docs: BTreeMap<PathBuf, DocIndex> = BTreeMap::new();
        for path in removed.iter().chain(changed.iter().map(|(p, _)| p)) {
            if let Some(old) = self.files.remove(path) {
                before.extend(old.objects);
                old_docs.insert(path.clone(), old.docs);
            }
        }
        // Objects now defined by the files read in this poll.
        let mut after: BTreeSet<ObjectRef> = BTreeSet::new();
        changed.sort();
        poll.files_read = changed.len();
        for (path, stamp) in changed {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    poll.errors.push(ManifestError {
                        file: path.clone(),
                        document: 0,
                        field: None,
                        message: format!("cannot be read: {e}"),
                    });
                    continue;
                }
            };
            // Unchanged documents take their objects from the file's previous read (in `before`):
            // moved, not compared, since the same text parses to the same object.
            let previous = old_docs.remove(&path).map(|docs| (docs, &mut before));
            let (parsed, hashes) = parse_reusing(&text, &path, &self.cfg, previous);
            poll.errors.extend(parsed.errors);
            poll.documents_reused += parsed.reused;
            let mut objects = BTreeMap::new();
            for ((document, obj), unchanged) in parsed.objects.into_iter().zip(parsed.unchanged) {
                let r = obj.reference();
                if after.contains(&r) || self.files.values().any(|f| f.objects.contains_key(&r)) {
                    poll.errors.push(ManifestError {
                        file: path.clone(),
                        document,
                        field: None,
                        message: format!(
                            "{r} is defined in another document too; this copy is ignored"
                        ),
                    });
                    continue;
                }
                if !unchanged && before.get(&r) != Some(&obj) {
                    poll.events.push(Event::Apply(obj.clone()));
                }
                after.insert(r.clone());
                objects.insert(r, obj);
            }
            let docs = hashes
                .into_iter()
                .filter(|(_, refs)| refs.iter().all(|r| objects.contains_key(r)))
                .collect();
            self.files.insert(path, FileState { stamp, objects, docs });
        }
        for r in before.keys() {
            if !after.contains(r) {
                poll.events.push(Event::Delete(r.clone()));
            }
        }
        Ok(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::new("node-1")
    }

    fn errors(text: &str) -> Vec<String> {
        parse_str(text, Path::new("deploy/examples/web.yaml"), &cfg())
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    const GOOD_SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: ok, namespace: default}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn a_bad_document_is_reported_by_file_document_and_field_and_the_rest_is_served() {
        let text = format!(
            "{GOOD_SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.2\n  ports:\n  - port: 80\n    nodePort: 99999\n---\n# comment only\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n"
        );
        let parsed = parse_str(&text, Path::new("deploy/examples/web.yaml"), &cfg());
        assert_eq!(
            parsed.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            [
                "deploy/examples/web.yaml document 2: spec.ports[0].nodePort 99999 is outside 30000-32767"
            ]
        );
        let kinds: Vec<(usize, &str)> = parsed
            .objects
            .iter()
            .map(|(d, o)| {
                (
                    *d,
                    match o {
                        Object::Service(_) => "Service",
                        Object::Node(_) => "Node",
                        _ => "?",
                    },
                )
            })
            .collect();
        assert_eq!(kinds, [(1, "Service"), (3, "Node")]);
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = errors(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.2\n  ports:\n  - port: eighty\n",
        );
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("deploy/examples/web.yaml document 1: spec.ports[0].port "),
            "{e:?}"
        );
    }

    #[test]
    fn broken_yaml_in_one_document_does_not_hide_the_others() {
        let text = format!(
            "{GOOD_SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [unclosed\n---\n{}",
            GOOD_SVC.replace("name: ok", "name: ok2").replace("10.96.0.1", "10.96.0.3")
        );
        let parsed = parse_str(&text, Path::new("x.yaml"), &cfg());
        assert_eq!(parsed.objects.len(), 2);
        assert_eq!(parsed.errors.len(), 1);
        let msg = parsed.errors[0].to_string();
        assert!(msg.starts_with("x.yaml document 2: is not valid YAML (line "), "{msg}");
    }

    #[test]
    fn semantic_errors_of_each_kind() {
        let cases = [
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}",
                "spec.clusterIP \"10.96.0.999\" is not an IP address",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 0}]}",
                "spec.ports[0].port 0 is outside 1-65535",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80, protocol: ICMP}]}",
                "spec.ports[0].protocol \"ICMP\" is not TCP, UDP or SCTP",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, ports: [{name: a, port: 53, protocol: UDP}, {name: b, port: 53}, {name: c, port: 53}]}",
                "spec.ports[2].port 53/TCP is used by two ports",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, clusterIP: 10.96.0.9, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]}",
                "spec.ports[1].nodePort 30080/TCP is used by two ports",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: Magic, clusterIP: 10.96.0.9}",
                "spec.type \"Magic\" is not ClusterIP, NodePort, LoadBalancer or ExternalName",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, loadBalancerSourceRanges: [10.0.0.0/33]}",
                "spec.loadBalancerSourceRanges[0] \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.9, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds 0 is outside 1-86400",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []",
                "metadata.labels.kubernetes.io/service-name is missing: the slice belongs to no service",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]",
                "endpoints[0].addresses[0] \"fd00::1\" is not an IPv4 address",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nports: [{port: 70000}]\nendpoints: []",
                "ports[0].port 70000 is outside 1-65535",
            ),
            (
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}",
                "apiVersion \"discovery.k8s.io/v1beta1\" is not the version this agent reads for kind EndpointSlice",
            ),
            ("apiVersion: v1\nmetadata: {name: s}", "kind is missing"),
        ];
        for (doc, want) in cases {
            assert_eq!(
                errors(doc),
                [format!("deploy/examples/web.yaml document 1: {want}")],
                "{doc}"
            );
        }
    }

    #[test]
    fn lists_are_unpacked_and_other_kinds_ignored() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}}\n- {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {clusterIP: 10.96.0.10, ports: [{port: -1}]}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let parsed = parse_str(text, Path::new("l.yaml"), &cfg());
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.ignored, 1);
        assert_eq!(
            parsed.errors[0].to_string(),
            "l.yaml document 1: items[1].spec.ports[0].port -1 is outside 1-65535"
        );
    }

    /// A fresh, empty directory for one test's files.
    fn empty_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A Service document.
    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    #[test]
    fn polling_reports_exactly_the_objects_that_changed() {
        let dir = empty_dir("lb-manifests");
        std::fs::write(
            dir.join("a.yaml"),
            format!("{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.2")),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
        let mut m = ManifestsDir::new(&dir, cfg()).with_settle(Duration::ZERO);
        let p = m.poll().unwrap();
        assert_eq!(p.events.len(), 2);
        assert!(m.poll().unwrap().events.is_empty(), "nothing changed");

        // Change b, keep a: one event. (Different size, so the change is seen even within one
        // mtime tick.)
        std::fs::write(
            dir.join("a.yaml"),
            format!("{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.22")),
        )
        .unwrap();
        let p = m.poll().unwrap();
        assert_eq!(p.events.len(), 1);
        assert!(
            matches!(&p.events[0], Event::Apply(Object::Service(s)) if s.metadata.name.as_deref() == Some("b"))
        );
        assert_eq!(p.documents_reused, 1, "a's document was not parsed again");

        // A broken document is parsed (and reported) on every read; documents that move keep
        // their objects; a document changed back is parsed and applied again.
        let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: default}\nspec: {ports: [{port: nope}]}\n";
        let text = format!("{broken}---\n{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.2"));
        std::fs::write(dir.join("a.yaml"), &text).unwrap();
        let p = m.poll().unwrap();
        assert_eq!((p.events.len(), p.errors.len(), p.documents_reused), (1, 1, 1), "{p:?}");
        assert_eq!(p.errors[0].document, 1);
        assert!(
            matches!(&p.events[0], Event::Apply(Object::Service(s)) if s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("10.96.0.2"))
        );
        std::fs::write(
            dir.join("a.yaml"),
            format!("{text}---\n# a comment\nkind: ConfigMap\napiVersion: v1\n"),
        )
        .unwrap();
        let p = m.poll().unwrap();
        assert_eq!((p.events.len(), p.errors.len(), p.documents_reused), (0, 1, 2), "{p:?}");
        std::fs::write(
            dir.join("a.yaml"),
            format!("{}---\n{}", svc("a", "10.96.0.1"), svc("b", "10.96.0.22")),
        )
        .unwrap();
        let p = m.poll().unwrap();
        assert_eq!((p.events.len(), p.errors.len(), p.documents_reused), (1, 0, 1), "{p:?}");

        // A duplicate in a new file is refused; removing the file deletes both services.
        std::fs::write(dir.join("b.yaml"), svc("a", "10.96.0.5")).unwrap();
        let p = m.poll().unwrap();
        assert!(p.events.is_empty());
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
        assert!(
            p.errors[0]
                .to_string()
                .contains("Service default/a is defined in another document too")
        );
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        let p = m.poll().unwrap();
        let mut deleted: Vec<String> = p
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Delete(r) => Some(r.to_string()),
                _ => None,
            })
            .collect();
        deleted.sort();
        assert_eq!(deleted, ["Service default/a", "Service default/b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn reused_documents_never_bring_back_another_files_copy() {
        let dir = empty_dir("lb-manifests-dup");
        let ip_of = |e: &Event| match e {
            Event::Apply(Object::Service(s)) => s.spec.as_ref().unwrap().cluster_ip.clone(),
            _ => None,
        };
        let mut m = ManifestsDir::new(&dir, cfg()).with_settle(Duration::ZERO);
        std::fs::write(dir.join("c.yaml"), svc("x", "10.96.0.1")).unwrap();
        assert_eq!(m.poll().unwrap().events.len(), 1);
        // a.yaml's copy of x is refused: c.yaml has it.
        std::fs::write(dir.join("a.yaml"), svc("x", "10.96.0.2")).unwrap();
        let p = m.poll().unwrap();
        assert_eq!((p.events.len(), p.errors.len()), (0, 1));
        // Both files change, each keeping its copy of x: read in name order, a.yaml's wins, as
        // if both were read afresh; c.yaml's unchanged copy is refused, not reused.
        std::fs::write(
            dir.join("a.yaml"),
            format!("{}---\n{}", svc("x", "10.96.0.2"), svc("y", "10.96.0.3")),
        )
        .unwrap();
        std::fs::write(
            dir.join("c.yaml"),
            format!("{}---\n{}", svc("x", "10.96.0.1"), svc("z", "10.96.0.4")),
        )
        .unwrap();
        let p = m.poll().unwrap();
        let mut ips: Vec<_> = p.events.iter().filter_map(ip_of).collect();
        ips.sort();
        assert_eq!(ips, ["10.96.0.2", "10.96.0.3", "10.96.0.4"], "{p:?}");
        assert_eq!(p.errors.len(), 1);
        assert!(p.errors[0].file.ends_with("c.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_replaced_by_one_of_its_size_and_modification_time_is_read_again() {
        let dir = empty_dir("lb-manifests-kept-mtime");
        let file = dir.join("svc.yaml");
        std::fs::write(&file, svc("a", "10.96.0.1")).unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        let mut m = ManifestsDir::new(&dir, cfg()).with_settle(Duration::ZERO);
        assert_eq!(m.poll().unwrap().events.len(), 1);
        // As `cp -p` or `rsync -t` would: another address of the same length, written aside,
        // its modification time set to the old file's, renamed over it.
        let aside = dir.join("svc.yaml.tmp");
        std::fs::write(&aside, svc("a", "10.96.0.2")).unwrap();
        std::fs::File::options().write(true).open(&aside).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(&aside, &file).unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.modified().unwrap(), mtime);
        let p = m.poll().unwrap();
        assert_eq!(p.events.len(), 1, "{p:?}");
        assert!(
            matches!(&p.events[0], Event::Apply(Object::Service(s)) if s.spec.as_ref().unwrap().cluster_ip.as_deref() == Some("10.96.0.2"))
        );
        assert!(m.poll().unwrap().events.is_empty(), "read once");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_still_being_written_is_read_only_once_it_settles() {
        let dir = empty_dir("lb-manifests-settle");
        let file = dir.join("svc.yaml");
        let whole: String = (1..=3)
            .map(|i| format!("{}---\n", svc(&format!("s{i}"), &format!("10.96.0.{i}"))))
            .collect();
        let age = |secs: u64| {
            let f = std::fs::File::options().write(true).open(&file).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(secs)).unwrap();
        };
        std::fs::write(&file, &whole).unwrap();
        let mut m = ManifestsDir::new(&dir, cfg()).with_settle(Duration::from_secs(30));
        assert_eq!(m.poll().unwrap().events.len(), 3, "the first poll reads everything");

        // Cut after the first document, just written: the other two must not be deleted.
        let cut = whole.find("---").unwrap();
        std::fs::write(&file, &whole[..cut]).unwrap();
        let p = m.poll().unwrap();
        assert!(p.events.is_empty() && p.errors.is_empty(), "read half-written: {p:?}");

        // The writer finishes; once untouched for the settle time the file is read, and
        // nothing changed.
        std::fs::write(&file, whole.replace("10.96.0.3", "10.96.0.33")).unwrap();
        assert!(m.poll().unwrap().events.is_empty(), "still fresh");
        age(60);
        let p = m.poll().unwrap();
        assert_eq!(p.events.len(), 1, "{p:?}");
        assert!(
            matches!(&p.events[0], Event::Apply(Object::Service(s)) if s.metadata.name.as_deref() == Some("s3"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
