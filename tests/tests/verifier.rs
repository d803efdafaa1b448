//! The verifier's cost of every program, on this kernel: each must load with its walk under
//! half the verifier's limit (1,000,000 instructions walked, past which the kernel refuses a
//! program), so that a change that makes the walk explode fails here, with the figures, and
//! not on a node after an upgrade. The older-kernel VMs (`older_kernel`) check the same on 6.1
//! (its verifier walks the same code differently) from the agent's own log line; 5.10 does not
//! count its walk.

use lb_agent::dataplane::programs::VERIFIER_LIMIT;
use lb_tests::{kernel::Datapath, prog_lines::LineMap, require_root};

#[test]
fn every_program_loads_well_under_the_verifiers_limit() {
    require_root!();
    let mut dp = Datapath::load();
    let loaded = dp.load_programs();
    let device = [
        lb_common::PROG_TC_INGRESS,
        lb_common::PROG_TC_EGRESS,
        lb_common::PROG_XDP_INGRESS,
        lb_common::PROG_TC_FROM_POD,
        lb_common::PROG_TC_TO_POD,
    ];
    for name in device {
        assert!(loaded.iter().any(|l| l.name == name), "{name} not among {loaded:?}");
    }
    for l in &loaded {
        // Instructions as run / walked by the verifier, and the load's time.
        println!("{l}");
        let verified = l.verified.expect("this kernel counts verified instructions");
        assert!(verified < VERIFIER_LIMIT / 2, "{l}: over half the verifier's limit");
    }
}

/// This kernel (6.18) has everything the programs use: the agent's probe finds all of it, so
/// the programs take no fallback here (5.10 in `older_kernel` finds none of it).
#[test]
fn the_host_kernel_has_every_feature_the_programs_use() {
    require_root!();
    let features = *lb_agent::dataplane::kernel_features::probed();
    assert_eq!(features, lb_common::KF_ALL, "{features:#x}");
}

/// The object carries BTF, so the kernel keeps each program's functions and source lines:
/// `lb-bench profile`, `bpftool prog dump xlated linum` and verifier logs name them. Samples
/// at a function's first instruction are put down to that function and a line of its source.
#[test]
fn device_programs_keep_their_functions_and_source_lines() {
    require_root!();
    let mut dp = Datapath::load();
    for (prog, rewrite) in
        [(lb_common::PROG_TC_INGRESS, "Tc"), (lb_common::PROG_XDP_INGRESS, "Xdp")]
    {
        dp.load_program(prog);
        let map = LineMap::of(dp.program_fd(prog)).unwrap_or_else(|e| panic!("{prog}: {e:#}"));
        let functions: Vec<(&str, u64)> = map.functions().collect();
        let start = |name: &str| {
            functions
                .iter()
                .find(|(n, _)| *n == name)
                .map(|f| f.1)
                .unwrap_or_else(|| panic!("{prog}: no function {name} among {functions:?}"))
        };
        let main = start(prog);
        let tracked = start(&format!("tracked<lb::rewrite::{rewrite}>"));
        start(&format!("new_flow<lb::rewrite::{rewrite}>"));
        let hook_file =
            if prog == lb_common::PROG_TC_INGRESS { "tc_ingress.rs:" } else { "xdp_ingress.rs:" };
        let line = map.line(main).unwrap_or_else(|| panic!("{prog}: no line at its start"));
        assert!(line.starts_with(hook_file), "{prog} starts at {line}");
        let line = map.line(tracked).unwrap_or_else(|| panic!("{prog}: no line in tracked"));
        assert!(line.starts_with("device.rs:"), "{prog}'s tracked starts at {line}");
        // Sampled call chains: two in tracked, one in the program's own function, one in a
        // kernel function tracked called, one outside the program.
        let elsewhere = 1;
        let chains = [
            vec![tracked, main],
            vec![tracked, main],
            vec![main],
            vec![elsewhere, tracked, main],
            vec![elsewhere],
        ];
        let shares = lb_tests::prog_lines::shares(&map, &chains);
        assert_eq!(shares.total, 4);
        let first = &shares.functions[0];
        assert!(first.1.starts_with("tracked<") && first.0 == 50.0, "{:?}", shares.functions);
        assert_eq!(shares.functions[1], (25.0, prog.to_owned()));
        assert_eq!(shares.callees.len(), 1, "{:?}", shares.callees);
        assert_eq!(shares.callees[0].0, 25.0);
    }
}
