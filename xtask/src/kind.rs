//! `cargo xtask kind-e2e`: the access paths on a real kind cluster without kube-proxy. Needs a
//! Docker engine, kind and kubectl; where they are missing (as on the development machines of
//! this project) it says so and stops at once: nothing else depends on it.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{output, run_cmd, succeeds, workspace_root};

const CLUSTER: &str = "lb-e2e";
const IMAGE: &str = "lb-agent:dev";

fn missing() -> Vec<&'static str> {
    let mut m = Vec::new();
    if !succeeds("docker", &["info"]) {
        m.push("a running Docker engine (`docker info` fails)");
    }
    if !succeeds("kind", &["version"]) {
        m.push("kind");
    }
    if !succeeds("kubectl", &["version", "--client"]) {
        m.push("kubectl");
    }
    m
}

fn kubectl(args: &[&str]) -> Result<()> {
    run_cmd(Command::new("kubectl").args(["--context", &format!("kind-{CLUSTER}")]).args(args))
}

pub fn run(keep: bool) -> Result<()> {
    let missing = missing();
    if !missing.is_empty() {
        println!(
            "SKIPPED kind-e2e: this machine lacks {}. Run it where Docker, kind and kubectl exist.",
            missing.join(", ")
        );
        return Ok(());
    }
    let root = workspace_root();
    let clusters = output("kind", &["get", "clusters"])?;
    if !clusters.lines().any(|c| c == CLUSTER) {
        run_cmd(
            Command::new("kind")
                .args(["create", "cluster", "--config"])
                .arg(root.join("deploy/kind/cluster.yaml")),
        )?;
    }
    run_cmd(Command::new("docker").current_dir(&root).args([
        "build",
        "-f",
        "deploy/Dockerfile",
        "-t",
        IMAGE,
        ".",
    ]))?;
    run_cmd(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]))?;
    // The agents reach the API server by the control plane's container address.
    let ip = output(
        "docker",
        &[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &format!("{CLUSTER}-control-plane"),
        ],
    )?;
    let ip = ip.trim();
    if ip.is_empty() {
        bail!("cannot find the control plane's address");
    }
    kubectl(&["apply", "-k", root.join("deploy/kubernetes").to_str().unwrap()])?;
    kubectl(&[
        "-n",
        "kube-system",
        "patch",
        "configmap",
        "lb-agent",
        "--type",
        "merge",
        "-p",
        &format!("{{\"data\":{{\"K8S_API_SERVER\":\"https://{ip}:6443\"}}}}"),
    ])?;
    kubectl(&["-n", "kube-system", "rollout", "restart", "daemonset/lb-agent"])?;
    kubectl(&["-n", "kube-system", "rollout", "status", "daemonset/lb-agent", "--timeout=180s"])?;
    kubectl(&["apply", "-f", root.join("deploy/kind/e2e-workload.yaml").to_str().unwrap()])?;
    kubectl(&["rollout", "status", "deployment/echo", "--timeout=180s"])?;

    // Pod -> ClusterIP: both pods answer.
    let script = "for i in $(seq 1 30); do wget -qO- -T 2 http://echo.default.svc.cluster.local/hostname; echo; done";
    let out = output(
        "kubectl",
        &[
            "--context",
            &format!("kind-{CLUSTER}"),
            "run",
            "lb-e2e-client",
            "--rm",
            "-i",
            "--restart=Never",
            "--image=busybox:1.36",
            "--",
            "sh",
            "-c",
            script,
        ],
    )
    .context("pod -> ClusterIP")?;
    let names: std::collections::BTreeSet<&str> =
        out.lines().filter(|l| l.starts_with("echo-")).collect();
    if names.len() < 2 {
        bail!("pod -> ClusterIP reached {names:?}, expected both echo pods:\n{out}");
    }
    // Outside (a node's network namespace is outside the pods' cgroups) -> NodePort.
    for port in ["30080", "30081"] {
        let out = output(
            "docker",
            &[
                "exec",
                &format!("{CLUSTER}-worker"),
                "sh",
                "-c",
                &format!(
                    "for i in 1 2 3 4 5; do curl -s -m 2 http://localhost:{port}/hostname; echo; done"
                ),
            ],
        )?;
        if !out.lines().any(|l| l.starts_with("echo-")) {
            bail!("NodePort {port} did not answer:\n{out}");
        }
    }
    println!("kind-e2e: ClusterIP and NodePort (Cluster and Local) answered through lb-agent");
    if !keep {
        run_cmd(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))?;
    }
    Ok(())
}
