//! Network programming latency as kube-proxy measures it (Kubernetes' scalability SLI): from
//! the moment a change to a service's pods made the EndpointSlice controller update a slice
//! (its `endpoints.kubernetes.io/last-change-trigger-time` annotation) to the moment this
//! node's maps reflect it. Like kube-proxy, only changes after the agent started count, each
//! once; a change whose service could not be written counts when a retry writes it.

use std::collections::HashMap;

use jiff::Timestamp;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::state::{ObjKey, slice_service};

pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub struct TriggerTimes {
    started: Timestamp,
    /// The last trigger time seen per slice: a re-sent slice is not a new change.
    seen: HashMap<ObjKey, Timestamp>,
    /// Changes not yet in the maps: (service, trigger time).
    pending: Vec<(ObjKey, Timestamp)>,
}

impl TriggerTimes {
    pub fn new(started: Timestamp) -> Self {
        Self { started, seen: HashMap::new(), pending: Vec::new() }
    }

    /// Notes an applied slice's trigger time, if it has one that is new and after the start.
    /// A malformed annotation is ignored (the slice itself is still applied).
    pub fn note(&mut self, slice: &EndpointSlice) {
        let Some(service) = slice_service(slice) else { return };
        let Some(t) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|v| v.parse::<Timestamp>().ok())
        else {
            return;
        };
        let key =
            ObjKey::new(service.namespace.clone(), slice.metadata.name.clone().unwrap_or_default());
        if t <= self.started || self.seen.get(&key) == Some(&t) {
            return;
        }
        self.seen.insert(key, t);
        self.pending.push((service, t));
    }

    /// A slice was deleted.
    pub fn forget(&mut self, slice: &ObjKey) {
        self.seen.remove(slice);
    }

    /// Only these slices exist (a re-list): the others are forgotten.
    pub fn keep_only(&mut self, slices: impl Iterator<Item = ObjKey>) {
        let live: std::collections::HashSet<ObjKey> = slices.collect();
        self.seen.retain(|k, _| live.contains(k));
    }

    /// The latencies, in seconds at `now`, of the pending changes whose service is now in the
    /// maps (`failed`: it could not be written; its changes wait for the retry).
    pub fn programmed(&mut self, now: Timestamp, failed: impl Fn(&ObjKey) -> bool) -> Vec<f64> {
        let mut done = Vec::new();
        self.pending.retain(|(service, t)| {
            if failed(service) {
                return true;
            }
            done.push(now.duration_since(*t).as_secs_f64().max(0.0));
            false
        });
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str, trigger: Option<&str>) -> EndpointSlice {
        let annotations = trigger
            .map(|t| format!("annotations: {{{TRIGGER_TIME_ANNOTATION}: \"{t}\"}}, "))
            .unwrap_or_default();
        serde_yaml_ng::from_str(&format!(
            "metadata: {{name: {name}, namespace: default, {annotations}labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: []"
        ))
        .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn each_change_after_the_start_counts_once_when_its_service_is_written() {
        let mut t = TriggerTimes::new(ts("2026-12-06T00:00:00Z"));
        let web = ObjKey::new("default", "web");
        t.note(&slice("web-a", "web", Some("2026-12-05T23:59:00Z"))); // before the start
        t.note(&slice("web-b", "web", None));
        t.note(&slice("web-c", "web", Some("yesterday"))); // malformed: ignored
        t.note(&slice("web-a", "web", Some("2026-12-06T00:00:10Z")));
        t.note(&slice("web-a", "web", Some("2026-12-06T00:00:10Z"))); // the same change again
        t.note(&slice("dns-a", "dns", Some("2026-12-06T00:00:11Z")));
        // dns could not be written: its change waits.
        let now = ts("2026-12-06T00:00:12.5Z");
        let failed = |s: &ObjKey| s.name == "dns";
        assert_eq!(t.programmed(now, failed), vec![2.5]);
        assert_eq!(t.programmed(now, failed), Vec::<f64>::new());
        assert_eq!(t.programmed(ts("2026-12-06T00:00:14Z"), |_| false), vec![3.0]);
        // A re-list without it forgets it; deleted and re-created with the same time: a new
        // change.
        t.keep_only([ObjKey::new("default", "dns-a")].into_iter());
        assert_eq!(t.seen.len(), 1);
        t.forget(&ObjKey::new("default", "web-a"));
        t.note(&slice("web-a", "web", Some("2026-12-06T00:00:10Z")));
        assert_eq!(t.programmed(ts("2026-12-06T00:00:20Z"), |s| s != &web), vec![10.0]);
    }
}
