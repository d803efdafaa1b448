//! The deploy folder stays true: Kubernetes manifests validate against the schemas
//! (kubernetes-validate, strict, installed by `cargo xtask setup`), the kustomization lists
//! files that exist, the DaemonSet only uses flags the agent has, and each Grafana dashboard panel
//! queries the agent's metrics (which a real agent's scrape has: `e2e_health`).

use std::{path::PathBuf, process::Command};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(bin) = lb_tests::setup_tool("kubernetes-validate") else {
        if lb_tests::tools_required() {
            panic!("kubernetes-validate is missing; run `cargo xtask setup`");
        }
        eprintln!("SKIPPED: kubernetes-validate not installed (cargo xtask setup installs it)");
        return;
    };
    let dir = root().join("deploy");
    let files: Vec<PathBuf> =
        ["serviceaccount", "clusterrole", "clusterrolebinding", "configmap", "daemonset"]
            .iter()
            .map(|f| dir.join(format!("kubernetes/{f}.yaml")))
            .chain([dir.join("examples/web.yaml"), dir.join("kind/e2e-workload.yaml")])
            .collect();
    for version in ["1.33.0", "1.37.0"] {
        let out = Command::new(&bin)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kustomization_daemonset_flags_and_dashboard_are_consistent() {
    let dir = root().join("deploy");
    let kustomization = std::fs::read_to_string(dir.join("kubernetes/kustomization.yaml")).unwrap();
    let resources: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
        .collect();
    assert_eq!(resources.len(), 5, "{kustomization}");
    for r in resources {
        assert!(dir.join("kubernetes").join(r).exists(), "kustomization lists missing {r}");
    }

    let help = Command::new(lb_tests::workspace_bin("lb-agent")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let ds = std::fs::read_to_string(dir.join("kubernetes/daemonset.yaml")).unwrap();
    for flag in ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split('=').next().unwrap())
    {
        assert!(
            help.contains(&format!("--{flag}")),
            "the DaemonSet passes --{flag}, which lb-agent does not have"
        );
    }

    // Each panel queries something of the agent's; that the agent exports it is checked on a
    // real agent's scrape (`e2e_health`).
    for (title, used) in lb_tests::manifests::dashboard_metrics() {
        assert!(!used.is_empty(), "panel {title:?} queries none of the agent's metrics");
    }
}
