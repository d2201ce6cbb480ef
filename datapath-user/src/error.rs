//! Errors of the library, each worded as the one line an operator sees.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
    #[error("no default IPv4 route to take the uplink from; pass --uplink IFACE")]
    NoDefaultRoute,
    #[error("no interface has ifindex {0} any more (its veth was deleted?)")]
    UnknownIfindex(u32),
    #[error("interface {0:?} has no IPv4 address; pass --node-ip")]
    NoIpv4(String),
    #[error("node IP {ip} is not an address of {iface:?} (it has: {have})")]
    NodeIpNotOnUplink {
        ip: std::net::Ipv4Addr,
        iface: String,
        have: String,
    },
    #[error(
        "{0}: permission denied (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    )]
    Permission(String),
    #[error("bpffs is not mounted at {path} and could not be mounted: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("no datapath maps at {0} (is `datapath-user run` running with this --pin-path?)")]
    NotRunning(PathBuf),
    #[error("pinned maps at {path} have layout {found:?}, this version needs {expected:?}; stop the old daemon and remove {path} (flows are lost) or use another --pin-path")]
    IncompatibleLayout {
        path: PathBuf,
        found: datapath_common::maps::LayoutInfo,
        expected: datapath_common::maps::LayoutInfo,
    },
    #[error("pinned maps at {0} have the previous version's layout (1): start this version's daemon (`datapath-user run`), which upgrades them in place keeping every flow, then try again")]
    LayoutUpgradable(PathBuf),
    #[error("the datapath is not attached at {0}: start `datapath-user run` first (a pod registered now would send its IPv4 untranslated)")]
    NotAttached(PathBuf),
    #[error(
        "a daemon (pid {pid}) serves {path}: stop it first, or pass --force to detach under it"
    )]
    DaemonRunning { path: PathBuf, pid: u32 },
    #[error("another datapath-user run already uses {path} (pid {pid})")]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("{ip} is outside the pod range {cidr}")]
    OutsidePodRange {
        ip: std::net::Ipv4Addr,
        cidr: String,
    },
    #[error("{ip} {problem} ({cidr}): it cannot be a pod's address")]
    NotAPodAddress {
        ip: std::net::Ipv4Addr,
        problem: &'static str,
        cidr: String,
    },
    #[error("{ip} is already registered on {iface} ({name}); `datapath-user pod del --ip {ip}` first to move it")]
    PodAddressTaken {
        ip: std::net::Ipv4Addr,
        iface: String,
        name: String,
    },
    #[error("{iface:?} cannot be a pod's host veth: {reason}")]
    NotAHostVeth { iface: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{context}: {source}")]
    Link {
        context: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("the eBPF object holds no checksum-state sequence (datapath_common::skb::TEMPLATE) to patch: it was not built from the sources of this datapath-user")]
    NoChecksumSites,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("this build of datapath-user has no eBPF object (built without its `ebpf` feature)")]
    NoObject,
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            return Self::Permission(context.into());
        }
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub fn map(context: impl Into<String>, source: aya::maps::MapError) -> Self {
        if let aya::maps::MapError::SyscallError(e) = &source {
            if e.io_error.kind() == std::io::ErrorKind::PermissionDenied {
                return Self::Permission(context.into());
            }
        }
        Self::Map {
            context: context.into(),
            source,
        }
    }

    pub fn link(context: impl Into<String>, source: aya::programs::links::LinkError) -> Self {
        Self::Link {
            context: context.into(),
            source,
        }
    }

    pub fn program(context: impl Into<String>, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
