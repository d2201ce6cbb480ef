//! Userspace of the datapath: loading, pinning and attaching the eBPF programs, the pinned
//! maps as typed tables, the expired-flow sweep, and the views `datapath-user` prints.

pub mod batch;
pub mod bpffs;
pub mod btf;
pub mod cni;
pub mod conflist;
pub mod error;
pub mod flows;
pub mod health;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod migration;
pub mod netdev;
pub mod pods;
pub mod stats;
pub mod sweep;
pub mod upgrade;

pub use error::Error;

/// Default bpffs directory for pinned maps, programs and links.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/datapath";
