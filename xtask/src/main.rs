//! Project tasks: `cargo xtask setup | test | demo | bench | vm-test | kind-e2e`.
//!
//! xtask depends on nothing of the workspace, so it builds on a fresh machine before the eBPF
//! toolchain exists and can install that toolchain.

mod bench;
mod demo;
mod history;
mod kind;
mod setup;
mod test;
mod util;
mod vm_test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tasks of the lb workspace")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent; seconds when all is there).
    Setup,
    /// Formatting, lints (host and BPF target) and every test, root-only ones included.
    Test {
        /// Extra arguments for the test runner (a filter, for example).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a two-node mini-cluster in network namespaces with real agents and show who answers.
    Demo,
    /// The access paths on a kind cluster without kube-proxy (needs Docker, kind, kubectl; says
    /// so and stops where they are missing).
    KindE2e {
        /// Keep the cluster afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Print benchmark figures: control-plane, datapath, e2e (vs kube-proxy), or all of them.
    Bench {
        /// control-plane, datapath or e2e (default: all).
        which: Option<String>,
        /// datapath only: also measure the kernel programs as built at this commit (a hash,
        /// tag, or `HEAD~1`), interleaved with this build's, and print their ratios.
        #[arg(long)]
        against: Option<String>,
    },
    /// One kernel test binary of lb-tests (its tests matching FILTER) in a VM booting an older
    /// kernel (6.1 or 5.10), as the older-kernel test boots it: a minute or two.
    VmTest {
        /// 6.1 or 5.10.
        kernel: String,
        /// The test binary: sctp, dsr, device_test_run...
        test: String,
        /// Test name filters (and test-runner flags) passed on.
        #[arg(trailing_var_arg = true)]
        filter: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test { args } => setup::run().and_then(|()| test::run(&args)),
        Command::Demo => setup::run().and_then(|()| demo::run()),
        Command::KindE2e { keep } => kind::run(keep),
        Command::Bench { which, against } => {
            setup::run().and_then(|()| bench::run(which.as_deref(), against.as_deref()))
        }
        Command::VmTest { kernel, test, filter } => {
            setup::run().and_then(|()| vm_test::run(&kernel, &test, &filter))
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
