//! Bad flags stop `lb-agent` at once with a message naming the flag, before anything is loaded
//! into the kernel (no root needed: it never gets that far).

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent")).args(args).output().expect("run");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn with(extra: &[&str]) -> (i32, String) {
    let dir = format!("{}/../deploy/examples", env!("CARGO_MANIFEST_DIR"));
    let mut args = vec!["--manifests", &dir, "--node-name", "node-a", "--devices", "eth-x"];
    args.extend_from_slice(extra);
    agent(&args)
}

#[test]
fn malformed_flags_are_refused_with_the_flag_named() {
    for (extra, code, needle) in [
        (&["--log-level", "bogus=zzz"][..], 2, "invalid value 'bogus=zzz' for '--log-level"),
        (&["--nodeport-addresses", "10.0.0.0/99"], 2, "--nodeport-addresses"),
        (&["--max-conntrack", "lots"], 2, "--max-conntrack"),
        (&["--health-bind-address", "nowhere"], 2, "--health-bind-address"),
        (&["--maglev-max-size", "1000"], 1, "--maglev-max-size 1000 is not one of"),
        (&["--nat-port-range", "70000-80000"], 2, "--nat-port-range"),
        (&["--nat-port-range", "1000-3000"], 2, "ports below 1024"),
    ] {
        let (got, stderr) = with(extra);
        assert_eq!(got, code, "{extra:?}: {stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    // A NAT range overlapping this machine's ephemeral ports is refused before anything loads.
    let eph = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let first: u32 = eph.split_whitespace().next().unwrap().parse().unwrap();
    let overlapping = format!("{}-{}", first.max(1024), first.max(1024) + 1000);
    let (got, stderr) = with(&["--nat-port-range", &overlapping]);
    assert_eq!(got, 1, "{stderr}");
    assert!(stderr.contains(&format!("--nat-port-range {overlapping} overlaps")), "{stderr}");

    let (got, stderr) = agent(&["--manifests", "/nonexistent-lb", "--node-name", "n"]);
    assert_eq!(got, 1, "{stderr}");
    assert!(stderr.contains("--manifests /nonexistent-lb: not a directory"), "{stderr}");
    let (got, stderr) = agent(&["--manifests", "/tmp"]);
    assert_eq!(got, 2, "{stderr}");
    assert!(stderr.contains("required arguments were not provided:\n  --node-name"), "{stderr}");
}
