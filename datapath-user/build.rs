//! Builds the eBPF object (datapath-ebpf's `datapath` binary) with a nested cargo and leaves
//! it in OUT_DIR, where `src/loader.rs` embeds it (with the `ebpf` feature, on by default).
//!
//! Cargo shows every line a build script prints as a warning, so the nested build's progress
//! is kept and shown only when it fails; compiler warnings in our eBPF crates are passed on.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::UNIX_EPOCH,
};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

const PACKAGE: &str = "datapath-ebpf";
/// The binary of `PACKAGE` that is the object, and its file name in OUT_DIR.
const OBJECT: &str = "datapath";

fn main() -> anyhow::Result<()> {
    // Without the `ebpf` feature nothing is built (and nothing embedded): the lab's users in
    // xtask need the library on machines without bpf-linker.
    if env::var_os("CARGO_FEATURE_EBPF").is_none() {
        return Ok(());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("the workspace root")?
        .join(PACKAGE);
    // The build-dependency on PACKAGE reruns this script when its library (and so
    // datapath-common) changes; the binary's own sources need this.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!("cargo:rerun-if-env-changed=DATAPATH_EBPF_TOOLCHAIN");

    let mut cmd = nested_cargo();
    cmd.args(["build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--message-format=json", "-Z", "build-std=core"])
        .arg("--target")
        .arg(bpf_target()?)
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags()?)
        // The outer build's compiler is not the eBPF toolchain's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;

    let said = NestedOutput::read(&output.stdout);
    if !output.status.success() {
        eprintln!(
            "{cmd:?}\n{}{}{}",
            said.diagnostics,
            said.other,
            String::from_utf8_lossy(&output.stderr)
        );
        bail!(
            "building the eBPF object failed ({}); the nested build's output is above. \
             `cargo xtask setup` installs what it needs (nightly rust-src, bpf-linker)",
            output.status
        );
    }
    for line in said.diagnostics.lines() {
        println!("cargo:warning={line}");
    }
    let object = said
        .object
        .ok_or_else(|| anyhow!("the nested build named no `{OBJECT}` binary"))?;
    let dst = out_dir.join(OBJECT);
    std::fs::copy(&object, &dst)
        .with_context(|| format!("copying {} to {}", object.display(), dst.display()))?;
    Ok(())
}

/// What the nested cargo printed on stdout (`--message-format=json`).
struct NestedOutput {
    /// The built object.
    object: Option<PathBuf>,
    /// Compiler warnings and errors, rendered.
    diagnostics: String,
    /// Lines that are not cargo messages.
    other: String,
}

impl NestedOutput {
    fn read(stdout: &[u8]) -> Self {
        let mut said = Self {
            object: None,
            diagnostics: String::new(),
            other: String::new(),
        };
        for line in String::from_utf8_lossy(stdout).lines() {
            let Ok(message) = serde_json::from_str::<Value>(line) else {
                said.other.push_str(line);
                said.other.push('\n');
                continue;
            };
            match message["reason"].as_str() {
                Some("compiler-artifact") if message["target"]["name"] == OBJECT => {
                    said.object = message["executable"].as_str().map(PathBuf::from);
                }
                Some("compiler-message") => {
                    let rendered = message["message"]["rendered"].as_str();
                    said.diagnostics.push_str(rendered.unwrap_or_default());
                }
                _ => {}
            }
        }
        said
    }
}

/// `cargo` of the eBPF toolchain: nightly unless DATAPATH_EBPF_TOOLCHAIN names another (a
/// machine without nightly builds with stable and RUSTC_BOOTSTRAP=1; `cargo xtask` sets both).
fn nested_cargo() -> Command {
    let toolchain = env::var("DATAPATH_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    match find_in_path("rustup") {
        Some(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", &toolchain, "cargo"]);
            cmd
        }
        None => Command::new("cargo"),
    }
}

/// bpfel or bpfeb, as the host (which loads the object) orders bytes.
fn bpf_target() -> anyhow::Result<&'static str> {
    match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => Ok("bpfel-unknown-none"),
        "big" => Ok("bpfeb-unknown-none"),
        other => bail!("unsupported endianness {other}"),
    }
}

/// The eBPF crate's flags: the host architecture for aya-ebpf, BTF and debug info for the
/// loader, and the identity of bpf-linker. The nested cargo does not fingerprint its linker,
/// so a new bpf-linker would leave a stale object: a cfg nobody reads carries the linker's
/// modification time, and changing it rebuilds the object.
fn rustflags() -> anyhow::Result<OsString> {
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };
    let mut flags = vec![
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ];
    if let Some(linker) = find_in_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
        let modified = std::fs::metadata(&linker)?
            .modified()?
            .duration_since(UNIX_EPOCH)?
            .as_nanos();
        flags.push(format!("--cfg=bpf_linker_modified=\"{modified}\""));
    }
    // Cargo's separator for encoded flags.
    Ok(flags.join("\x1f").into())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
