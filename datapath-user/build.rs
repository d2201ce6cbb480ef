//! Builds the eBPF object (datapath-ebpf's `datapath` binary) and leaves it in OUT_DIR, where
//! `src/loader.rs` embeds it. Without the `ebpf` feature nothing is built (and nothing
//! embedded).
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DATAPATH_EBPF_TOOLCHAIN");
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    let metadata = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["locate-project", "--workspace", "--message-format", "plain"])
        .output()
        .context("cargo locate-project")?;
    let workspace = std::path::PathBuf::from(String::from_utf8(metadata.stdout)?.trim());
    let root = workspace
        .parent()
        .ok_or_else(|| anyhow!("workspace root"))?;
    let ebpf_dir = root.join("datapath-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // `cargo xtask setup` installs rust-src for nightly; a machine without nightly can build
    // with stable plus RUSTC_BOOTSTRAP=1 by setting DATAPATH_EBPF_TOOLCHAIN=stable.
    let toolchain_name = std::env::var("DATAPATH_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain_name.as_deref() {
        None | Some("nightly") => Toolchain::Nightly,
        Some(other) => Toolchain::Custom(other),
    };
    aya_build::build_ebpf(
        [Package {
            name: "datapath-ebpf",
            root_dir: ebpf_dir,
            ..Package::default()
        }],
        toolchain,
    )
}
