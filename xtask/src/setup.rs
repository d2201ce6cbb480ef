//! `cargo xtask setup`: checks for and installs everything a fresh Debian machine lacks.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the lab and tests use.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    "ethtool",
    "iputils-ping",
    "traceroute",
    "bpftool",
    "iperf3",
    "netsniff-ng",
    "socat",
    "curl",
    "python3",
    "containernetworking-plugins",
    // The CNI plugin under a real container runtime (tests/tests/runtime.rs) and the image.
    "podman",
    "busybox-static",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What is missing on this machine.
struct Missing {
    packages: Vec<&'static str>,
    rust_src: bool,
    bpf_linker: bool,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.packages.is_empty() && !self.rust_src && !self.bpf_linker
    }
}

fn quiet(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn package_installed(name: &str) -> bool {
    quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_some_and(|s| s.contains("install ok installed"))
}

/// The toolchain that builds the eBPF crate: nightly when present, else stable with
/// RUSTC_BOOTSTRAP (see toolchain notes).
pub fn ebpf_toolchain() -> &'static str {
    let has_nightly = quiet(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.starts_with("nightly")));
    if has_nightly {
        "nightly"
    } else {
        "stable"
    }
}

/// Points a cargo invocation at the eBPF toolchain.
pub fn apply_toolchain_env(cmd: &mut Command) {
    if ebpf_toolchain() == "stable" {
        cmd.env("DATAPATH_EBPF_TOOLCHAIN", "stable")
            .env("RUSTC_BOOTSTRAP", "1");
    }
}

fn rust_src_installed(toolchain: &str) -> bool {
    quiet(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )
    .is_some_and(|sysroot| {
        std::path::Path::new(sysroot.trim())
            .join("lib/rustlib/src/rust/library/core")
            .exists()
    })
}

fn bpf_linker_ok() -> bool {
    quiet(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn find_missing() -> Missing {
    Missing {
        packages: PACKAGES
            .iter()
            .copied()
            .filter(|p| !package_installed(p))
            .collect(),
        rust_src: !rust_src_installed(ebpf_toolchain()),
        bpf_linker: !bpf_linker_ok(),
    }
}

fn step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {what}");
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Installs what is missing (or, with `check_only`, reports it). Returns whether anything
/// was missing.
pub fn run(check_only: bool) -> Result<bool> {
    let missing = find_missing();
    if missing.is_empty() {
        eprintln!("==> setup: everything is installed");
        return Ok(false);
    }
    if !missing.packages.is_empty() {
        eprintln!(
            "==> missing Debian packages: {}",
            missing.packages.join(" ")
        );
    }
    let toolchain = ebpf_toolchain();
    if missing.rust_src {
        eprintln!("==> missing rust-src for the {toolchain} toolchain");
    }
    if missing.bpf_linker {
        eprintln!("==> missing bpf-linker {BPF_LINKER_VERSION}");
    }
    if check_only {
        bail!("setup incomplete: run `cargo xtask setup` (as root) to install the above");
    }
    if !missing.packages.is_empty() {
        if !datapath_tests::is_root() {
            bail!(
                "installing Debian packages needs root: run `sudo apt-get install -y {}` or `sudo cargo xtask setup`",
                missing.packages.join(" ")
            );
        }
        step(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        step(
            &format!("apt-get install {}", missing.packages.join(" ")),
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing.packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if missing.rust_src {
        step(
            &format!("rustup component add rust-src --toolchain {toolchain}"),
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", toolchain]),
        )?;
    }
    if missing.bpf_linker {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        step(
            &format!("cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22, about 70 s)"),
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
        )?;
    }
    let still = find_missing();
    if !still.is_empty() {
        bail!(
            "setup still incomplete (packages: {:?}, rust-src: {}, bpf-linker: {})",
            still.packages,
            still.rust_src,
            still.bpf_linker
        );
    }
    eprintln!("==> setup complete");
    Ok(true)
}

/// Runs setup when something is missing.
pub fn ensure() -> Result<()> {
    run(false).map(|_| ())
}
