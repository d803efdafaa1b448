//! The agent's own health as kube-proxy reports it on its health port (10256): `/healthz`,
//! which cloud load balancers probe to decide whether a node gets traffic for services with
//! externalTrafficPolicy Cluster, and `/livez`, for liveness probes.
//!
//! - Healthy unless a change has been waiting to reach the maps for longer than the timeout
//!   (a write failed and its retries keep failing), or the sync loop has not turned for that
//!   long (stuck). While starting, before the first sync, it is healthy, as kube-proxy.
//! - `/healthz` also answers 503 when the node is going away (being deleted, or tainted
//!   `ToBeDeletedByClusterAutoscaler`), so load balancers drain it first; `/livez` does not
//!   look at the node (the agent must keep running on a draining node).
//! - Bodies as kube-proxy's: `{"lastUpdated": .., "currentTime": .., "nodeEligible": ..}`,
//!   where `lastUpdated` is the current time while healthy.

use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on a node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's default: twice its 30 s sync period.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    /// When the maps last matched the cluster state.
    last_updated: Option<SystemTime>,
    /// Since when a change has been waiting to reach the maps.
    pending_since: Option<Instant>,
    /// The sync loop's last turn (none before it started).
    heartbeat: Option<Instant>,
    node_eligible: bool,
}

/// Whether `node` may keep receiving load-balanced traffic: not being deleted, not marked for
/// deletion by the cluster autoscaler.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let marked = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !marked
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            last_updated: None,
            pending_since: None,
            heartbeat: None,
            node_eligible: true,
        }
    }

    /// The maps match the cluster state as of now.
    pub fn updated(&mut self, wall: SystemTime) {
        self.pending_since = None;
        self.last_updated = Some(wall);
    }

    /// A change has been waiting to reach the maps since `since` (kept if earlier).
    pub fn pending(&mut self, since: Instant) {
        self.pending_since = Some(self.pending_since.map_or(since, |p| p.min(since)));
    }

    /// The sync loop turned.
    pub fn beat(&mut self, now: Instant) {
        self.heartbeat = Some(now);
    }

    pub fn set_node_eligible(&mut self, eligible: bool) {
        self.node_eligible = eligible;
    }

    /// The agent's health, the node aside (`/livez`).
    pub fn healthy(&self, now: Instant) -> bool {
        let late = |t: Option<Instant>| {
            t.is_some_and(|t| now.saturating_duration_since(t) >= self.timeout)
        };
        !late(self.pending_since) && !late(self.heartbeat)
    }

    /// `/healthz`: the agent's health and the node's eligibility.
    pub fn healthz(&self, now: Instant, wall: SystemTime) -> (StatusCode, String) {
        let healthy = self.healthy(now) && self.node_eligible;
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
            self.shown_last_updated(healthy, wall),
            rfc3339(wall),
            self.node_eligible
        );
        (status(healthy), body)
    }

    /// `/livez`: the agent's health only.
    pub fn livez(&self, now: Instant, wall: SystemTime) -> (StatusCode, String) {
        let healthy = self.healthy(now);
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            self.shown_last_updated(healthy, wall),
            rfc3339(wall)
        );
        (status(healthy), body)
    }

    /// As kube-proxy: "now" while healthy (older clients read it as the last sync loop run).
    fn shown_last_updated(&self, healthy: bool, wall: SystemTime) -> String {
        match (healthy, self.last_updated) {
            (true, _) => rfc3339(wall),
            (false, Some(t)) => rfc3339(t),
            (false, None) => "0001-01-01T00:00:00Z".into(),
        }
    }
}

fn status(healthy: bool) -> StatusCode {
    if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map_or_else(|_| "?".into(), |t| format!("{t:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(yaml: &str) -> Node {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_node_being_deleted_or_marked_by_the_autoscaler_is_not_eligible() {
        assert!(node_eligible(&node("metadata: {name: n}")));
        assert!(node_eligible(&node(
            "metadata: {name: n}\nspec: {taints: [{key: node.kubernetes.io/unschedulable, effect: NoSchedule}]}"
        )));
        assert!(!node_eligible(&node(
            "metadata: {name: n}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]}"
        )));
        assert!(!node_eligible(&node(
            "metadata: {name: n, deletionTimestamp: \"2026-12-06T00:00:00Z\"}"
        )));
    }

    #[test]
    fn late_changes_and_a_stuck_loop_are_unhealthy_a_draining_node_only_for_healthz() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_515_200);
        let mut h = ProxyHealth::new(Duration::from_secs(60));
        // Starting: healthy, though nothing was synced yet.
        assert_eq!(h.healthz(t0, wall).0, StatusCode::OK);
        h.updated(wall);
        h.beat(t0);
        let (code, body) = h.healthz(t0 + Duration::from_secs(5), wall);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2026-12-06T00:00:00.000Z\",\"currentTime\": \"2026-12-06T00:00:00.000Z\", \"nodeEligible\": true}"
        );

        // A write fails: healthy until it has waited the timeout.
        h.beat(t0 + Duration::from_secs(10));
        h.pending(t0 + Duration::from_secs(10));
        h.pending(t0 + Duration::from_secs(20)); // still the first one that counts
        assert!(h.healthy(t0 + Duration::from_secs(69)));
        h.beat(t0 + Duration::from_secs(69));
        assert!(!h.healthy(t0 + Duration::from_secs(70)));
        let later = wall + Duration::from_secs(70);
        let (code, body) = h.livez(t0 + Duration::from_secs(70), later);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2026-12-06T00:00:00.000Z\",\"currentTime\": \"2026-12-06T00:01:10.000Z\"}"
        );
        // A retry gets through.
        h.updated(later);
        assert!(h.healthy(t0 + Duration::from_secs(71)));

        // The loop stops turning.
        assert!(!h.healthy(t0 + Duration::from_secs(69 + 60)));
        h.beat(t0 + Duration::from_secs(128));

        // The node drains: /healthz says so, /livez does not mind.
        h.set_node_eligible(false);
        let now = t0 + Duration::from_secs(129);
        let (code, body) = h.healthz(now, later);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.ends_with("\"nodeEligible\": false}"), "{body}");
        assert_eq!(h.livez(now, later).0, StatusCode::OK);
    }
}
