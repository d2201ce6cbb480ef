//! `cargo xtask vm-lab`: the datapath on the kernels EKS nodes run (Debian's 6.1 and 6.12 cloud
//! kernels), in three QEMU VMs — node, router (with a 1280-byte link), server — on bridges in
//! a network namespace of this run. The node runs the release `datapath-user`, a pod netns,
//! the FORWARD REJECT rule, and the behaviour suite (`deploy/vm-lab/node-suite.sh`). Under
//! emulation (TCG) the lab checks behaviour only: no figure it gives says anything of speed.

mod cpio;
mod image;
mod lab;
mod report;

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::ValueEnum;

/// Guest kernel.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kernel {
    /// Debian 12's cloud kernel 6.1 (Amazon Linux 2023's series): clsact, pre-6.2 checksum helpers.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's 6.12 cloud kernel (backported): TCX, the checksum-state kfunc.
    #[value(name = "6.12")]
    V6_12,
}

/// How QEMU runs the guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (works everywhere; behaviour only).
    Tcg,
}

impl Accel {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Self::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// `cargo xtask vm-lab` options.
#[derive(clap::Args)]
pub struct Args {
    /// Guest kernel series.
    #[arg(long, value_enum, default_value = "6.1")]
    kernel: Kernel,
    /// Keep the run directory (VM consoles, payload disk) after a passing run too.
    #[arg(long)]
    keep: bool,
    /// Force KVM or TCG. Default: KVM when a bare boot of the kernel succeeds with it, else TCG.
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// Seconds the suite may take once the VMs start.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    if !datapath_tests::is_root() {
        bail!("the VM lab needs root (network namespace, taps, debootstrap)");
    }
    image::ensure_host_packages()?;
    crate::build(true)?;
    let artifacts = image::prepare(args.kernel)?;
    let dir = image::cache_dir().join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let payload = build_payload(&dir)?;
    let prepared = started.elapsed();

    let accel = args.accel.unwrap_or_else(|| {
        if lab::kvm_boots(&artifacts, &dir, Duration::from_secs(10)) {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    });
    let why = match (args.accel, accel) {
        (Some(_), _) => "as asked",
        (None, Accel::Kvm) => "a bare boot worked",
        (None, Accel::Tcg) => "KVM missing or it did not boot this kernel",
    };
    println!(
        "==> vm-lab: kernel {}, QEMU {} ({why}); images ready in {:.0} s",
        artifacts.kernel_release,
        match accel {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG emulation, -cpu max",
        },
        prepared.as_secs_f64()
    );
    let boot = Instant::now();
    lab::catch_signals();
    let outcome = {
        let mut lab = lab::Lab::new(&dir)?;
        println!(
            "==> vm-lab: namespace {}; booting node, router, server",
            lab.ns
        );
        lab.run(
            &artifacts,
            &payload,
            accel,
            Duration::from_secs(args.timeout),
        )?
    };
    println!(
        "==> vm-lab: attach mode {}, checksum path {} (kernel {}); suite {:.0} s, total {:.0} s",
        outcome.info_value("attach").unwrap_or("unknown"),
        outcome.info_value("checksum").unwrap_or("unknown"),
        artifacts.kernel_release,
        boot.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for f in &outcome.failed {
        println!("    failed: {f}");
    }
    if outcome.ok() && !args.keep {
        let _ = fs::remove_dir_all(&dir);
    } else {
        println!("    consoles and payload kept in {}", dir.display());
    }
    println!("{}", outcome.summary());
    if !outcome.ok() {
        bail!("the VM lab failed");
    }
    Ok(())
}

/// The second disk: guest scripts, the release binary, a 4 MiB blob and its SHA-256.
fn build_payload(dir: &Path) -> Result<std::path::PathBuf> {
    let root = dir.join("payload");
    fs::create_dir_all(&root)?;
    let scripts = crate::workspace().join("deploy/vm-lab");
    for entry in fs::read_dir(&scripts).with_context(|| format!("reading {}", scripts.display()))? {
        let entry = entry?;
        fs::copy(entry.path(), root.join(entry.file_name()))?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace().join("target"), Into::into);
    fs::copy(
        Path::new(&target).join("release/datapath-user"),
        root.join("datapath-user"),
    )
    .context("copying the release datapath-user")?;
    // Incompressible, reproducible bytes (xorshift): a corrupted segment cannot go unnoticed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let blob: Vec<u8> = (0..(4 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    fs::write(root.join("blob"), &blob)?;
    let out = Command::new("sha256sum")
        .arg(root.join("blob"))
        .output()
        .context("running sha256sum")?;
    let sum = String::from_utf8_lossy(&out.stdout);
    let sum = sum.split_whitespace().next().context("sha256sum output")?;
    fs::write(root.join("blob.sha256"), sum)?;
    let image = dir.join("payload.img");
    image::make_ext4(&root, &image, 96)?;
    Ok(image)
}
