//! The lab (a node, its pods, a server) in network namespaces, shared by the integration
//! tests, `cargo xtask demo` and the benchmarks.

pub mod capture;
pub mod churn;
pub mod lab;
pub mod netns;
pub mod packet;
#[cfg(feature = "bpf")]
pub mod testrun;
pub mod traffic;

pub use lab::{Lab, LabOptions, Mode};

/// Path of the `datapath-user` binary under test: `$DATAPATH_USER_BIN`, else the workspace's
/// `target/debug/datapath-user`.
#[must_use]
pub fn datapath_user_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("DATAPATH_USER_BIN") {
        return bin.into();
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), Into::into);
    target.join("debug").join("datapath-user")
}

/// True when running as root (the lab needs it).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}
