//! `lbctl plan` on the example manifests: JSON fields scripts rely on, and exit codes.

use std::process::Command;

use serde_json::Value;

fn lbctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lbctl")).args(args).output().expect("run lbctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> String {
    format!("{}/../deploy/examples", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn plan_json_of_the_example() {
    let (code, stdout, stderr) =
        lbctl(&["plan", "--manifests", &examples(), "--node-name", "node-a", "-o", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("valid JSON");
    let svc = &v["services"][0];
    assert_eq!(svc["namespace"], "default");
    assert_eq!(svc["name"], "web");
    assert_eq!(svc["port_name"], "http");
    assert_eq!(svc["protocol"], "TCP");
    assert_eq!(svc["family"], "IPv4");
    let fronts: Vec<String> = svc["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {}:{} {}",
                f["kind"].as_str().unwrap(),
                f["address"].as_str().unwrap(),
                f["port"],
                f["scope"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        fronts,
        [
            "ClusterIP 10.96.0.10:80 internal",
            "NodePort 10.210.0.11:30080 internal",
            "NodePort 10.210.0.11:30080 external",
            "NodePort 127.0.0.1:30080 internal"
        ]
    );
    assert_eq!(
        svc["internal_backends"],
        serde_json::json!(["10.244.1.10:8080", "10.244.2.10:8080"])
    );
    assert_eq!(
        svc["external_backends"],
        serde_json::json!(["10.244.1.10:8080", "10.244.2.10:8080"])
    );
    assert_eq!(svc["retained_backends"], serde_json::json!(["10.244.2.11:8080"]));
}

#[test]
fn plan_on_another_node_sees_other_local_endpoints() {
    let (_, stdout, _) = lbctl(&["plan", "--manifests", &examples(), "--node-name", "node-b"]);
    assert!(stdout.contains("internal backends: 10.244.1.10:8080 10.244.2.10:8080*"), "{stdout}");
    // node-b has no Node object here: no NodePort address unless given (localhost's only).
    let nodeports: Vec<&str> = stdout.lines().filter(|l| l.contains("NodePort")).collect();
    assert_eq!(nodeports.len(), 1, "{stdout}");
    assert!(nodeports[0].contains("127.0.0.1:30080"), "{stdout}");
    let (_, stdout, _) = lbctl(&[
        "plan",
        "--manifests",
        &examples(),
        "--node-name",
        "node-b",
        "--node-ip",
        "10.210.0.12",
    ]);
    assert!(stdout.contains("10.210.0.12:30080"), "{stdout}");
}

#[test]
fn plan_reports_bad_documents_and_exits_1() {
    let dir = std::env::temp_dir().join(format!("lbctl-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(format!("{}/web.yaml", examples()), dir.join("web.yaml")).unwrap();
    std::fs::write(
        dir.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {type: NodePort, clusterIP: 10.96.0.11, ports: [{port: 80, nodePort: 99999}]}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = lbctl(&[
        "plan",
        "--manifests",
        dir.to_str().unwrap(),
        "--node-name",
        "node-a",
        "-o",
        "json",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 1, "the good service is still planned");
    let err = v["errors"][0].as_str().unwrap();
    assert!(
        err.ends_with("bad.yaml document 1: spec.ports[0].nodePort 99999 is outside 30000-32767"),
        "{err}"
    );
    assert!(stderr.contains("nodePort 99999"), "{stderr}");
}

#[test]
fn plan_of_a_missing_folder_is_a_clear_error() {
    let (code, _, stderr) = lbctl(&["plan", "--manifests", "/nonexistent/lb", "--node-name", "n"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("reading /nonexistent/lb"), "{stderr}");
}
