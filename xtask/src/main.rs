//! `cargo xtask`: the project's one-command workflows.

mod bench;
mod demo;
mod setup;
mod test;
mod vm_lab;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Setup, build, test, demo, benchmarks and VM lab of the datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages (LLVM 22 dev files, lab tools),
    /// rust-src for the eBPF toolchain, bpf-linker 0.13.0. Idempotent.
    Setup {
        /// Only report what is missing; install nothing.
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF object and the datapath-user binary.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit and property tests, BPF_PROG_TEST_RUN tests, namespace lab tests.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the lab (a node, three pods, a server), run the datapath, drive ping, HTTP and
    /// UDP from the pods, show flows and stats, tear everything down.
    Demo,
    /// Plain routing vs the iptables egress-v4 setup vs the datapath on the same lab, in one
    /// run: packet rate and node cost per packet, new TCP connections/s, TCP transactions/s,
    /// TCP bulk; BPF_PROG_TEST_RUN micro-benchmarks; the scale test (`flows` over 1M flows,
    /// the daemon's CPU at 500k). Prints each figure beside its goal. Writes results/bench-*/.
    Bench {
        /// One short repetition (about a minute) instead of three.
        #[arg(long)]
        quick: bool,
        /// Run only these workloads (comma-separated): pps, tcp_crr, tcp_crr_rst, tcp_rr,
        /// tcp_crr_1pod, tcp_rr_1pod, tcp_bulk, micro (the BPF_PROG_TEST_RUN figures), scale
        /// (the scale test, about four minutes).
        /// Example: `cargo xtask bench --only tcp_crr,tcp_crr_rst`.
        #[arg(long, value_delimiter = ',', value_name = "WORKLOAD,...")]
        only: Vec<String>,
        /// Measure nothing: print the report of a kept run from its results.json, figures
        /// beside their goals. Example: `cargo xtask bench --report results/reference`.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["quick", "only"])]
        report: Option<PathBuf>,
    },
    /// The behaviour suite on Debian's 6.1 (or 6.12) cloud kernel: node, router (1280-byte
    /// link) and server VMs in QEMU on bridges in a namespace of this run. Builds and caches
    /// the rootfs, kernel and initramfs under target/vm-lab/. Emulated: behaviour only.
    VmLab(vm_lab::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { check } => setup::run(check).map(|_| ()),
        Task::Build { release } => setup::ensure().and_then(|()| build(release)),
        Task::Test { args } => test::run(&args),
        Task::Demo => demo::run(),
        Task::Bench {
            report: Some(run_dir),
            ..
        } => bench::show(&run_dir),
        Task::Bench { quick, only, .. } => bench::run(quick, &only),
        Task::VmLab(args) => vm_lab::run(&args),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace());
    setup::apply_toolchain_env(&mut cmd);
    cmd
}

/// Builds datapath-user (and with it the eBPF object).
fn build(release: bool) -> Result<()> {
    eprintln!(
        "==> building datapath-user{}",
        if release { " (release)" } else { "" }
    );
    let mut cmd = cargo();
    cmd.args(["build", "-p", "datapath-user"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(())
}
