//! Loading the eBPF object with pinned maps, writing the configuration, and attaching the
//! programs. Attachments are TCX links pinned under `<pin>/links`, so `pod add` (another
//! process) can attach pods, a crashed daemon leaves translation running, and a new daemon
//! swaps its programs into the existing links atomically. Before 6.6 (no TCX) they are clsact
//! filters in a slot of ours (fixed priority and handle), recorded under `<pin>/links`, with
//! the same semantics: replaced in place by the next daemon, removed only by `detach`.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, ProgramArray},
    programs::{
        links::{FdLink, Link as _, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use datapath_common::{
    config::Config,
    maps::{self as names, LayoutInfo},
    skb,
};
use log::{info, warn};

use crate::{
    bpffs,
    btf::Btf,
    error::{Error, Result},
    maps, netdev,
    upgrade::{self, Upgrade},
};

/// The eBPF object built by this crate's build script.
#[cfg(feature = "ebpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));
/// Built without the `ebpf` feature: no object, and [`load`] says so.
#[cfg(not(feature = "ebpf"))]
static OBJECT: &[u8] = &[];

/// Pinned program the pod side attaches (`pod add` opens it from another process).
const FROM_POD_PIN: &str = "prog_tc_from_pod";
const LINKS_DIR: &str = "links";

/// What `run` loads.
pub struct LoadOptions {
    pub pin_path: PathBuf,
    pub flow_table_size: u32,
    /// Update TCP/UDP checksums through the kernel's helpers even where the programs could
    /// read the skb's checksum state: what kernels before 6.2 get (tests of that path).
    pub kernel_checksum_helpers: bool,
}

/// The loaded object, and the upgrade of maps pinned by the previous version to finish once
/// its programs are attached ([`crate::upgrade::Upgrade::finish`]).
pub struct Loaded {
    pub ebpf: Ebpf,
    pub upgrade: Option<Upgrade>,
}

/// Loads the object, re-using maps pinned at `pin_path` (after checking their layout, and
/// upgrading the previous one) and pinning new ones there.
pub fn load(opts: &LoadOptions) -> Result<Loaded> {
    if OBJECT.is_empty() {
        return Err(Error::NoObject);
    }
    bpffs::ensure_pin_dir(&opts.pin_path)?;
    let mut upgrade = upgrade::prepare(&opts.pin_path)?;
    // Before the new slow path is installed (from then on, new flows claim their ports in the
    // new map), and before the layout says the maps are this version's.
    let loaded = load_programs(opts).and_then(|ebpf| match &mut upgrade {
        Some(upgrade) => upgrade.carry_over().map(|()| ebpf),
        None => Ok(ebpf),
    });
    let mut ebpf = match loaded {
        Ok(ebpf) => ebpf,
        Err(e) => {
            // The previous version (a rollback) finds its maps as it left them.
            if let Some(upgrade) = &upgrade {
                upgrade.restore();
            }
            return Err(e);
        }
    };
    let mut layout: Array<_, LayoutInfo> = Array::try_from(
        ebpf.map_mut(names::LAYOUT)
            .ok_or_else(|| Error::NotRunning(opts.pin_path.clone()))?,
    )
    .map_err(|e| Error::map("LAYOUT", e))?;
    layout
        .set(0, LayoutInfo::current(), 0)
        .map_err(|e| Error::map("writing LAYOUT", e))?;
    let slow_fd = program(&mut ebpf, names::PROG_FROM_POD_SLOW)?
        .fd()
        .map_err(|e| Error::program(names::PROG_FROM_POD_SLOW, e))?
        .try_clone()
        .map_err(|e| Error::io("duplicating the slow-path program fd", e))?;
    let mut slow_path = ProgramArray::try_from(
        ebpf.map_mut(names::SLOW_PATH)
            .ok_or_else(|| Error::NotRunning(opts.pin_path.clone()))?,
    )
    .map_err(|e| Error::map(names::SLOW_PATH, e))?;
    slow_path
        .set(0, &slow_fd, 0)
        .map_err(|e| Error::map("installing the slow path", e))?;
    Ok(Loaded { ebpf, upgrade })
}

/// The object loaded with its maps (pinned ones re-used, new ones pinned) and its programs
/// through the verifier.
fn load_programs(opts: &LoadOptions) -> Result<Ebpf> {
    let object = object_for_this_kernel(opts.kernel_checksum_helpers)?;
    // A binding table created beside a pinned flow table (an upgrade) gets the table's size.
    let bindings_capacity =
        maps::pinned_flow_capacity(&opts.pin_path).unwrap_or(opts.flow_table_size);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_path)
        .map_max_entries(names::CONNTRACK, opts.flow_table_size)
        .map_max_entries(names::NAT_BINDINGS, bindings_capacity)
        .load(object.bytes())
        .map_err(|e| match e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Error::Permission("creating BPF maps".into())
            }
            other => Error::Load(other),
        })?;
    for name in names::PROGRAMS {
        program(&mut ebpf, name)?
            .load()
            .map_err(|e| Error::program(format!("loading {name} (verifier)"), e))?;
    }
    Ok(ebpf)
}

/// The object with its checksum-state sequences (`datapath_common::skb`) resolved against the
/// running kernel's BTF, or replaced by the fallback (the kernel's checksum helpers).
fn object_for_this_kernel(kernel_checksum_helpers: bool) -> Result<AlignedObject> {
    let mut object = AlignedObject::copy_of(OBJECT);
    let sequence = if kernel_checksum_helpers {
        Err("asked for the kernel's checksum helpers".to_string())
    } else {
        csum_state_sequence()
    };
    let sites = patch_checksum_sites(
        object.bytes_mut(),
        sequence.as_ref().unwrap_or(&skb::FALLBACK),
    )?;
    match sequence {
        Ok(_) => info!(
            "checksum state read through bpf_cast_to_kern_ctx ({sites} sites): TCP/UDP checksums are fixed without helper calls"
        ),
        Err(reason) => {
            warn!("{reason}: TCP/UDP checksums go through the kernel's helpers (slower)");
        }
    }
    Ok(object)
}

/// Replaces every checksum-state sequence in `object` with `replacement`. An object without
/// one was not built from this crate's sources: its programs would run the placeholder call
/// the verifier refuses, so it is refused here with the reason.
fn patch_checksum_sites(object: &mut [u8], replacement: &[skb::Insn; 4]) -> Result<usize> {
    match skb::patch_object(object, replacement) {
        0 => Err(Error::NoChecksumSites),
        sites => Ok(sites),
    }
}

/// A copy of the object in 8-byte-aligned memory: the ELF parser reads headers in place.
struct AlignedObject {
    words: Vec<u64>,
    len: usize,
}

impl AlignedObject {
    fn copy_of(bytes: &[u8]) -> Self {
        let mut object = Self {
            words: vec![0; bytes.len().div_ceil(8)],
            len: bytes.len(),
        };
        object.bytes_mut().copy_from_slice(bytes);
        object
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no alignment needs.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

fn csum_state_sequence() -> std::result::Result<[skb::Insn; 4], String> {
    let btf = Btf::kernel().map_err(|e| format!("kernel BTF unavailable ({e})"))?;
    let kfunc = btf
        .function_id("bpf_cast_to_kern_ctx")
        .map_err(|e| format!("{e} (kernel older than 6.2)"))?;
    let bit = btf
        .member_bit_offset("sk_buff", "ip_summed")
        .map_err(|e| e.to_string())?;
    skb::resolved(kfunc, bit)
        .ok_or_else(|| format!("sk_buff.ip_summed at bit {bit} cannot be read with one byte load"))
}

/// Writes the configuration the programs read.
pub fn write_config(ebpf: &mut Ebpf, config: &Config) -> Result<()> {
    let mut map: Array<_, Config> = Array::try_from(
        ebpf.map_mut(names::CONFIG)
            .ok_or_else(|| Error::NotRunning(PathBuf::new()))?,
    )
    .map_err(|e| Error::map("CONFIG", e))?;
    map.set(0, config, 0)
        .map_err(|e| Error::map("writing CONFIG", e))
}

pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::program(name.to_string(), aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(|e| Error::program(name.to_string(), e))
}

/// Set (to anything) in the environment of every `datapath-user` process to attach with clsact
/// filters even where TCX exists: how tests exercise the pre-6.6 path on a newer kernel.
pub const FORCE_CLSACT_ENV: &str = "DATAPATH_FORCE_CLSACT";

/// Which TCP/UDP checksum path the programs take on this kernel: `kfunc` (they read the
/// skb's checksum state and fix checksums themselves) or `helpers` (the kernel's helpers).
#[must_use]
pub fn checksum_path() -> &'static str {
    if csum_state_sequence().is_ok() {
        "kfunc"
    } else {
        "helpers"
    }
}

/// How programs attach on this kernel: `tcx` links (6.6 and later) or `clsact` filters.
#[must_use]
pub fn attach_mode() -> &'static str {
    if tcx_supported() {
        "tcx"
    } else {
        "clsact"
    }
}

fn tcx_supported() -> bool {
    std::env::var_os(FORCE_CLSACT_ENV).is_none()
        && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The clsact filter slot we own on every hook we use (tc priority, filter handle): a fixed
/// slot is what lets the next daemon replace our program in place, atomically, and `detach`
/// remove exactly ours.
pub const TC_PRIORITY: u16 = 0x4450;
pub const TC_HANDLE: u32 = 0xd47a;

/// Which way a clsact record attaches (its name ends in this).
fn direction(attach_type: TcAttachType) -> &'static str {
    match attach_type {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// A clsact attachment of ours, recorded under `<pin>/links` as the program pinned at
/// `<what>@clsact@<ifindex>@<ingress|egress>` (bpffs holds only BPF objects, and no dots).
struct ClsactRecord {
    path: PathBuf,
    what: String,
    ifindex: u32,
    attach_type: TcAttachType,
}

impl ClsactRecord {
    fn name(what: &str, ifindex: u32, attach_type: TcAttachType) -> String {
        format!("{what}@clsact@{ifindex}@{}", direction(attach_type))
    }

    fn parse(path: PathBuf) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_string();
        let mut parts = name.rsplitn(4, '@');
        let attach_type = match parts.next()? {
            "ingress" => TcAttachType::Ingress,
            "egress" => TcAttachType::Egress,
            _ => return None,
        };
        let ifindex = parts.next()?.parse().ok()?;
        if parts.next()? != "clsact" {
            return None;
        }
        let what = parts.next()?.to_string();
        Some(Self {
            path,
            what,
            ifindex,
            attach_type,
        })
    }

    /// Every clsact record under the pin path.
    fn all(pin_path: &Path) -> Vec<Self> {
        std::fs::read_dir(pin_path.join(LINKS_DIR))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Self::parse(e.path()))
            .collect()
    }

    /// Removes our filter (the one in our slot on the recorded hook) and the record. A hook
    /// whose device is gone took the filter with it.
    fn detach(self) -> Result<()> {
        if let Some(ifname) = netdev::ifname(self.ifindex) {
            let link = SchedClassifierLink::attached(
                &ifname,
                self.attach_type,
                TC_PRIORITY,
                TC_HANDLE.into(),
                None,
            )
            .map_err(|e| Error::io(format!("looking up {ifname}"), e))?;
            match link.detach() {
                Ok(()) => info!(
                    "detached {} from {ifname} {} (clsact)",
                    self.what,
                    direction(self.attach_type)
                ),
                // Already gone (removed by hand, or the qdisc with it): nothing of ours left.
                Err(e) => warn!(
                    "{}: no filter of ours on {ifname} {} ({e})",
                    self.what,
                    direction(self.attach_type)
                ),
            }
        }
        std::fs::remove_file(&self.path)
            .map_err(|e| Error::io(format!("removing {}", self.path.display()), e))
    }
}

/// clsact (kernels before 6.6): the same take-over semantics as the TCX links. Our filter sits
/// in a fixed slot (priority, handle) that the next daemon replaces in place, so translation
/// never stops across a restart; the record under the pin path says which hooks are ours.
fn attach_clsact(prog: &mut SchedClassifier, hook: Hook) -> Result<Attached> {
    let Hook {
        ifname,
        attach_type,
        pin_path,
        what,
    } = hook;
    let context = || format!("attaching to {ifname} (clsact)");
    let ifindex = netdev::ifindex(ifname)?;
    std::fs::create_dir_all(pin_path.join(LINKS_DIR))
        .map_err(|e| Error::io("creating the links directory", e))?;
    let mut previous = None;
    for record in ClsactRecord::all(pin_path) {
        if record.what != what {
            continue;
        }
        if record.ifindex == ifindex && record.attach_type == attach_type {
            previous = Some(record);
        } else {
            // Ours on a hook this attachment no longer uses (another uplink): remove it.
            record.detach()?;
        }
    }
    // The qdisc may exist already (ours, or another tool's); either is fine.
    let _ = tc::qdisc_add_clsact(ifname);
    let mut replaced = false;
    if previous.is_some() {
        let link =
            SchedClassifierLink::attached(ifname, attach_type, TC_PRIORITY, TC_HANDLE.into(), None)
                .map_err(|e| Error::io(context(), e))?;
        // Replace in place: the kernel swaps the program of the existing filter.
        match prog.attach_to_link(link) {
            Ok(id) => {
                std::mem::forget(
                    prog.take_link(id)
                        .map_err(|e| Error::program(context(), e))?,
                );
                replaced = true;
            }
            Err(e) => warn!("{what}: recorded filter not found on {ifname} ({e}); attaching anew"),
        }
    }
    if !replaced {
        let id = match prog.attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::Netlink(tc::NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE.into(),
                ..Default::default()
            }),
        ) {
            Ok(id) => id,
            // Our slot is taken: another process of ours (a `pod add` racing the daemon's
            // start) attached a moment ago and is about to record it; or another tool uses it.
            Err(e) if is_already_attached(&e) => {
                return wait_for_record(pin_path, what, ifindex, attach_type).ok_or_else(|| {
                    Error::program(
                        format!(
                            "{} (tc priority {TC_PRIORITY} handle {TC_HANDLE:#x} is taken by another tool)",
                            context()
                        ),
                        e,
                    )
                });
            }
            Err(e) => return Err(Error::program(context(), e)),
        };
        // The filter stays when this process exits: only `detach` removes it.
        std::mem::forget(
            prog.take_link(id)
                .map_err(|e| Error::program(context(), e))?,
        );
    }
    let path = pin_path
        .join(LINKS_DIR)
        .join(ClsactRecord::name(what, ifindex, attach_type));
    let _ = std::fs::remove_file(&path);
    prog.pin(&path).map_err(|e| {
        Error::io(
            format!("recording {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })?;
    info!(
        "attached {what} to {ifname} {}: clsact filter priority {TC_PRIORITY} handle {TC_HANDLE:#x} ({})",
        direction(attach_type),
        if replaced { "replaced in place" } else { "new" }
    );
    Ok(if replaced {
        Attached::Swapped
    } else {
        Attached::Created
    })
}

/// Waits (briefly) for another process of ours to record its clsact attachment.
fn wait_for_record(
    pin_path: &Path,
    what: &str,
    ifindex: u32,
    attach_type: TcAttachType,
) -> Option<Attached> {
    let path = pin_path
        .join(LINKS_DIR)
        .join(ClsactRecord::name(what, ifindex, attach_type));
    for _ in 0..100 {
        if path.exists() {
            return Some(Attached::Swapped);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

fn link_pin(pin_path: &Path, what: &str) -> PathBuf {
    pin_path.join(LINKS_DIR).join(what)
}

fn pod_link_name(ifindex: u32) -> String {
    format!("pod_{ifindex}")
}

/// What [`attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment (undone by [`detach`]).
    Created,
    /// The program was swapped into an attachment a previous daemon left.
    Swapped,
}

/// Where a program is attached: a TC hook of an interface, and the name its attachment is
/// recorded under (`<pin>/links/<what>`).
#[derive(Clone, Copy, Debug)]
pub struct Hook<'a> {
    pub ifname: &'a str,
    pub attach_type: TcAttachType,
    pub pin_path: &'a Path,
    pub what: &'a str,
}

/// Attaches `prog` to `hook`, keeping the attachment pinned at `<pin>/links/<what>`. An
/// existing pinned link gets the new program atomically (no gap in translation).
pub fn attach(prog: &mut SchedClassifier, hook: Hook) -> Result<Attached> {
    if !tcx_supported() {
        return attach_clsact(prog, hook);
    }
    let (ifname, pin_path) = (hook.ifname, hook.pin_path);
    let context = || format!("attaching to {ifname}");
    let path = link_pin(pin_path, hook.what);
    std::fs::create_dir_all(path.parent().unwrap_or(pin_path))
        .map_err(|e| Error::io("creating the links directory", e))?;
    let target = netdev::ifindex(ifname)?;
    let pinned_at = pinned_tcx_ifindex(&path).ok().flatten();
    let existing = match PinnedLink::from_pin(&path).map(FdLink::from) {
        Ok(link) if pinned_at == Some(target) => Some(link),
        // A link that outlived its interface, or sits on another one (a new --uplink), is
        // replaced rather than re-used.
        Ok(stale) => {
            std::fs::remove_file(&path)
                .map_err(|e| Error::io(format!("unpinning {}", path.display()), e))?;
            drop(stale);
            None
        }
        Err(_) => None,
    };
    let outcome = if existing.is_some() {
        Attached::Swapped
    } else {
        Attached::Created
    };
    let id = match existing {
        // Already attached (a previous daemon): swap the program in, atomically.
        Some(link) => {
            let link =
                SchedClassifierLink::try_from(link).map_err(|e| Error::link(context(), e))?;
            prog.attach_to_link(link)
        }
        None => prog.attach(ifname, hook.attach_type),
    };
    let id = match id {
        Ok(id) => id,
        // The same program is already on the hook: another process (a `pod add` racing the
        // daemon's start) attached it a moment ago and is about to pin its link.
        Err(e) if is_already_attached(&e) => {
            return wait_for_pinned(&path, target).ok_or_else(|| Error::program(context(), e));
        }
        Err(e) => return Err(Error::program(context(), e)),
    };
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e| Error::program(context(), e))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| Error::link(context(), e))?;
    info!(
        "attached {} to {ifname} {}: TCX link ({})",
        hook.what,
        direction(hook.attach_type),
        if path.exists() {
            "program swapped in"
        } else {
            "new"
        }
    );
    if path.exists() {
        // The pin keeps the link; dropping our handle only closes the descriptor.
        return Ok(outcome);
    }
    link.pin(&path).map_err(|e| {
        Error::io(
            format!("pinning link {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(outcome)
}

fn is_already_attached(e: &aya::programs::ProgramError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error() == Some(libc::EEXIST);
        }
        source = err.source();
    }
    false
}

/// Waits (briefly) for a link on `target` to be pinned at `path` by another process.
fn wait_for_pinned(path: &Path, target: u32) -> Option<Attached> {
    for _ in 0..100 {
        if pinned_tcx_ifindex(path).ok().flatten() == Some(target) {
            return Some(Attached::Swapped);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Detaches what is pinned at `<pin>/links/<what>` (a TCX link, or our clsact filters);
/// false when nothing was.
pub fn detach(pin_path: &Path, what: &str) -> Result<bool> {
    let mut found = false;
    for record in ClsactRecord::all(pin_path) {
        if record.what == what {
            record.detach()?;
            found = true;
        }
    }
    let path = link_pin(pin_path, what);
    match PinnedLink::from_pin(&path) {
        Ok(pinned) => {
            let link = pinned
                .unpin()
                .map_err(|e| Error::io(format!("unpinning {}", path.display()), e))?;
            // Closing the last reference detaches the program.
            drop(link);
            Ok(true)
        }
        Err(e) => match syscall_errno(&e) {
            Some(libc::ENOENT) => Ok(found),
            Some(libc::EPERM | libc::EACCES) => {
                Err(Error::Permission(format!("detaching {}", path.display())))
            }
            _ => Err(Error::link(format!("opening {}", path.display()), e)),
        },
    }
}

fn syscall_errno(e: &aya::programs::links::LinkError) -> Option<i32> {
    match e {
        aya::programs::links::LinkError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// The interface a pinned TCX link at `<pin>/links/<what>` is attached to: `None` when no link
/// is pinned there, `Some(0)` when the link outlived its interface (or was detached).
pub fn link_ifindex(pin_path: &Path, what: &str) -> Result<Option<u32>> {
    // clsact (no TCX): the record says where our filter is; a device that is gone took it
    // with it. (A filter deleted by hand from a live device is not noticed here.)
    if let Some(record) = ClsactRecord::all(pin_path)
        .into_iter()
        .find(|r| r.what == what)
    {
        let present = netdev::ifname(record.ifindex).is_some();
        return Ok(Some(if present { record.ifindex } else { 0 }));
    }
    let path = link_pin(pin_path, what);
    pinned_tcx_ifindex(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            Error::Permission(format!("reading link {}", path.display()))
        }
        _ => Error::io(format!("reading link {}", path.display()), e),
    })
}

/// `bpf_link_info.tcx.ifindex` of the link pinned at `path` (aya's `LinkInfo` does not expose
/// the link-type part); `None` when nothing is pinned there.
fn pinned_tcx_ifindex(path: &Path) -> std::io::Result<Option<u32>> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    // struct bpf_link_info: type, id, prog_id, then an 8-byte aligned union whose tcx member
    // starts with the ifindex.
    const TCX_IFINDEX_WORD: usize = 2;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET with a valid C string; the result is a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw mut get,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: the kernel just returned this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u64; 16];
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD with a valid descriptor and an output buffer of the
    // stated length.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            size_of::<InfoAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Little- or big-endian, the first u32 of the union's word is the ifindex.
    let word = info[TCX_IFINDEX_WORD].to_ne_bytes();
    Ok(Some(u32::from_ne_bytes([
        word[0], word[1], word[2], word[3],
    ])))
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// Whether the datapath can protect a pod: the uplink programs are attached and the pod-side
/// program is pinned for `pod add` to attach. The programs run without a daemon.
#[must_use]
pub fn datapath_attached(pin_path: &Path) -> bool {
    pin_path.join(FROM_POD_PIN).exists()
        && [UPLINK_INGRESS, UPLINK_EGRESS]
            .iter()
            .all(|what| matches!(link_ifindex(pin_path, what), Ok(Some(i)) if i != 0))
}

/// Link names of the uplink attachments under `<pin>/links`.
pub const UPLINK_INGRESS: &str = "uplink_ingress";
pub const UPLINK_EGRESS: &str = "uplink_egress";

/// Pins the pod-side program so `pod add` in another process can attach it. The pin is
/// replaced by a rename, so a concurrent `pod add` always finds one.
pub fn pin_from_pod_program(ebpf: &mut Ebpf, pin_path: &Path) -> Result<()> {
    let path = pin_path.join(FROM_POD_PIN);
    // bpffs names cannot contain a dot.
    let staged = pin_path.join(format!("{FROM_POD_PIN}_{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    program(ebpf, names::PROG_FROM_POD)?
        .pin(&staged)
        .map_err(|e| {
            Error::io(
                format!("pinning {}", staged.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
    std::fs::rename(&staged, &path)
        .map_err(|e| Error::io(format!("renaming the pin to {}", path.display()), e))
}

/// The pinned pod-side program, when a daemon is running.
#[must_use]
pub fn pinned_from_pod_program(pin_path: &Path) -> Option<SchedClassifier> {
    SchedClassifier::from_pin(pin_path.join(FROM_POD_PIN)).ok()
}

/// Attaches the pod-side program to a pod's host veth.
pub fn attach_pod(prog: &mut SchedClassifier, pin_path: &Path, ifindex: u32) -> Result<Attached> {
    let ifname = netdev::ifname(ifindex).ok_or(Error::UnknownIfindex(ifindex))?;
    attach(
        prog,
        Hook {
            ifname: &ifname,
            attach_type: TcAttachType::Ingress,
            pin_path,
            what: &pod_link_name(ifindex),
        },
    )
}

/// True when the pod-side program is attached to `ifindex` through a pinned link.
#[must_use]
pub fn pod_attached(pin_path: &Path, ifindex: u32) -> bool {
    link_pin(pin_path, &pod_link_name(ifindex)).exists()
}

pub fn detach_pod(pin_path: &Path, ifindex: u32) -> Result<bool> {
    detach(pin_path, &pod_link_name(ifindex))
}

/// The interface the pod-side program is attached to for the pod on `ifindex`, as
/// [`link_ifindex`].
pub fn pod_link_ifindex(pin_path: &Path, ifindex: u32) -> Result<Option<u32>> {
    link_ifindex(pin_path, &pod_link_name(ifindex))
}

/// Removes every pinned link (detaching the programs) and the pinned program; the maps stay.
pub fn detach_all(pin_path: &Path) -> Result<usize> {
    let mut detached = 0;
    for record in ClsactRecord::all(pin_path) {
        record.detach()?;
        detached += 1;
    }
    let links = pin_path.join(LINKS_DIR);
    match std::fs::read_dir(&links) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if detach(pin_path, &name)? {
                    detached += 1;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", links.display()), e)),
    }
    match std::fs::remove_file(pin_path.join(FROM_POD_PIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("removing the pinned pod-side program", e));
        }
        _ => {}
    }
    Ok(detached)
}

/// Where daemon locks live (outside bpffs, which holds no regular files).
const LOCK_DIR: &str = "/run/datapath-user";

/// Exclusive locks keyed by the pin directory's identity (its device and inode, whatever its
/// spelling) and by the pinned flow table's map id (the same maps pinned elsewhere), so two
/// daemons never drive the same maps. The lock files are removed when the daemon exits.
pub struct DaemonLock {
    locks: Vec<LockFile>,
    pin: PathBuf,
}

impl DaemonLock {
    /// Takes the locks for `pin_path` (creating it on a bpffs first) or says which pid holds
    /// them.
    pub fn acquire(pin_path: &Path) -> Result<Self> {
        bpffs::ensure_pin_dir(pin_path)?;
        let pin = bpffs::canonical(pin_path)?;
        std::fs::create_dir_all(LOCK_DIR)
            .map_err(|e| Error::io(format!("creating {LOCK_DIR}"), e))?;
        remove_stale_locks();
        let mut locks = Vec::new();
        for key in lock_keys(&pin)? {
            locks.push(LockFile::acquire(&Path::new(LOCK_DIR).join(key), &pin)?);
        }
        info!("lock on {} held", pin.display());
        Ok(Self { locks, pin })
    }

    /// Also locks the maps `load` has just created (maps pinned before `acquire` are locked
    /// already), so the same maps pinned elsewhere later are refused too.
    pub fn hold_new_maps(&mut self) -> Result<()> {
        let Some(id) = maps::pinned_map_id(&self.pin, names::CONNTRACK) else {
            return Ok(());
        };
        let path = Path::new(LOCK_DIR).join(map_lock_name(id));
        if self.locks.iter().any(|l| l.path == path) {
            return Ok(());
        }
        self.locks.push(LockFile::acquire(&path, &self.pin)?);
        Ok(())
    }
}

/// The pid of the live daemon serving `pin_path`: the process holding the flock on one of its
/// lock files, read from /proc/locks so that asking never takes a lock from a starting daemon.
#[must_use]
pub fn daemon_pid(pin_path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let pin = bpffs::canonical(pin_path).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    lock_keys(&pin).ok()?.into_iter().find_map(|key| {
        let meta = std::fs::metadata(Path::new(LOCK_DIR).join(key)).ok()?;
        flock_holder(&locks, meta.dev(), meta.ino())
    })
}

/// Where the daemon serving `pin_path` publishes its state: beside its lock file.
#[must_use]
pub fn state_file(pin_path: &Path) -> Option<PathBuf> {
    let pin = bpffs::canonical(pin_path).ok()?;
    let key = lock_keys(&pin).ok()?.into_iter().next()?;
    Some(Path::new(LOCK_DIR).join(key.replace(".lock", ".state.json")))
}

/// The pid holding an flock on the file (`dev`, `ino`) in /proc/locks' text.
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; dev as hex major:minor.
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == want => pid.parse().ok(),
            _ => None,
        }
    })
}

/// Lock file names for the pin directory `pin` (canonical, existing).
fn lock_keys(pin: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(pin).map_err(|e| Error::io(format!("reading {}", pin.display()), e))?;
    let mut keys = vec![format!("pin-{}-{}.lock", meta.dev(), meta.ino())];
    if let Some(id) = maps::pinned_map_id(pin, names::CONNTRACK) {
        keys.push(map_lock_name(id));
    }
    Ok(keys)
}

/// Removes lock files nobody holds (left by a daemon that crashed). Safe against a daemon
/// taking one meanwhile: `LockFile::acquire` re-checks the name after locking.
fn remove_stale_locks() {
    let Ok(entries) = std::fs::read_dir(LOCK_DIR) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|ext| ext != "lock") {
            continue;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // SAFETY: valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn map_lock_name(conntrack_id: u32) -> String {
    format!("map-{conntrack_id}.lock")
}

/// A flock'ed file holding the owner's pid and pin path; unlinked by its owner on drop.
struct LockFile {
    path: PathBuf,
    _file: File,
}

impl LockFile {
    fn acquire(path: &Path, pin: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            // SAFETY: valid descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let owner = std::fs::read_to_string(path).unwrap_or_default();
                return Err(Error::AlreadyRunning {
                    path: pin.to_path_buf(),
                    pid: owner.lines().next().unwrap_or("unknown").trim().to_string(),
                });
            }
            // The previous owner may have unlinked the file between our open and our lock:
            // then we hold a lock nobody else will see; start again on the new file.
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0)
                .map_err(|e| Error::io("truncating lock file", e))?;
            writeln!(file, "{}\n{}", std::process::id(), pin.display())
                .map_err(|e| Error::io("writing lock file", e))?;
            return Ok(Self {
                path: path.to_path_buf(),
                _file: file,
            });
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Unlinked while still locked: a waiting process re-checks the name (see acquire).
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs name their maps after their statics: every name userspace opens must be
    /// one of the object's maps, every program one of its programs.
    #[test]
    fn every_shared_name_is_in_the_built_object() {
        let object = aya_obj::Object::parse(AlignedObject::copy_of(OBJECT).bytes()).unwrap();
        for map in names::MAPS {
            assert!(object.maps.contains_key(map), "no map {map} in the object");
        }
        for prog in names::PROGRAMS {
            assert!(
                object.programs.contains_key(prog),
                "no program {prog} in the object"
            );
        }
    }

    #[test]
    fn the_built_object_carries_checksum_sites_and_an_object_without_is_refused() {
        let mut object = AlignedObject::copy_of(OBJECT);
        let sites = patch_checksum_sites(object.bytes_mut(), &skb::FALLBACK).unwrap();
        assert!(sites > 0);
        assert!(matches!(
            patch_checksum_sites(object.bytes_mut(), &skb::FALLBACK),
            Err(Error::NoChecksumSites)
        ));
    }
}
