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
    maps::{self, Maps},
    netdev,
};

/// The eBPF object built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));

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

/// Loads the object, re-using maps pinned at `pin_path` (after checking their layout) and
/// pinning new ones there.
pub fn load(opts: &LoadOptions) -> Result<Ebpf> {
    bpffs::ensure_pin_dir(&opts.pin_path)?;
    maps::check_layout(&opts.pin_path)?;
    let object = object_for_this_kernel(opts.kernel_checksum_helpers);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&opts.pin_path)
        .map_max_entries(names::CONNTRACK, opts.flow_table_size)
        .map_max_entries(names::NAT_BINDINGS, opts.flow_table_size)
        .load(object.bytes())
        .map_err(|e| match e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Error::Permission("creating BPF maps".into())
            }
            other => Error::Load(other),
        })?;
    let mut layout: Array<_, LayoutInfo> = Array::try_from(
        ebpf.map_mut(names::LAYOUT)
            .ok_or_else(|| Error::NotRunning(opts.pin_path.clone()))?,
    )
    .map_err(|e| Error::map("LAYOUT", e))?;
    layout
        .set(0, LayoutInfo::current(), 0)
        .map_err(|e| Error::map("writing LAYOUT", e))?;
    for name in [
        names::PROG_FROM_POD,
        names::PROG_FROM_POD_SLOW,
        names::PROG_UPLINK_INGRESS,
        names::PROG_UPLINK_EGRESS,
    ] {
        program(&mut ebpf, name)?
            .load()
            .map_err(|e| Error::program(format!("loading {name} (verifier)"), e))?;
    }
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
    Ok(ebpf)
}

/// The object with its checksum-state sequences (`datapath_common::skb`) resolved against the
/// running kernel's BTF, or replaced by the fallback (the kernel's checksum helpers).
fn object_for_this_kernel(kernel_checksum_helpers: bool) -> AlignedObject {
    let mut object = AlignedObject::copy_of(OBJECT);
    let sequence = if kernel_checksum_helpers {
        Err("asked for the kernel's checksum helpers".to_string())
    } else {
        csum_state_sequence()
    };
    let sites = skb::patch_object(
        object.bytes_mut(),
        sequence.as_ref().unwrap_or(&skb::FALLBACK),
    );
    match sequence {
        Ok(_) => info!(
            "checksum state read through bpf_cast_to_kern_ctx ({sites} sites): TCP/UDP checksums are fixed without helper calls"
        ),
        Err(reason) => {
            warn!("{reason}: TCP/UDP checksums go through the kernel's helpers (slower)");
        }
    }
    object
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
fn attach_clsact(
    prog: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
    pin_path: &Path,
    what: &str,
) -> Result<()> {
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
        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::Netlink(tc::NlOptions {
                    priority: TC_PRIORITY,
                    handle: TC_HANDLE.into(),
                    ..Default::default()
                }),
            )
            .map_err(|e| {
                Error::program(
                    format!(
                        "{} (is tc priority {TC_PRIORITY} handle {TC_HANDLE:#x} taken by another tool?)",
                        context()
                    ),
                    e,
                )
            })?;
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
    Ok(())
}

fn link_pin(pin_path: &Path, what: &str) -> PathBuf {
    pin_path.join(LINKS_DIR).join(what)
}

fn pod_link_name(ifindex: u32) -> String {
    format!("pod_{ifindex}")
}

/// Attaches `prog` to `ifname`, keeping the attachment pinned at `<pin>/links/<what>`. An
/// existing pinned link gets the new program atomically (no gap in translation).
pub fn attach(
    prog: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
    pin_path: &Path,
    what: &str,
) -> Result<()> {
    let context = || format!("attaching to {ifname}");
    if !tcx_supported() {
        return attach_clsact(prog, ifname, attach_type, pin_path, what);
    }
    let path = link_pin(pin_path, what);
    std::fs::create_dir_all(path.parent().unwrap_or(pin_path))
        .map_err(|e| Error::io("creating the links directory", e))?;
    let id = match PinnedLink::from_pin(&path) {
        // Already attached (a previous daemon): swap the program in, atomically.
        Ok(pinned) => {
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| Error::link(context(), e))?;
            prog.attach_to_link(link)
        }
        Err(_) => prog.attach(ifname, attach_type),
    }
    .map_err(|e| Error::program(context(), e))?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e| Error::program(context(), e))?
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| Error::link(context(), e))?;
    info!(
        "attached {what} to {ifname} {}: TCX link ({})",
        direction(attach_type),
        if path.exists() {
            "program swapped in"
        } else {
            "new"
        }
    );
    if path.exists() {
        // The pin keeps the link; dropping our handle only closes the descriptor.
        return Ok(());
    }
    link.pin(&path).map_err(|e| {
        Error::io(
            format!("pinning link {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(())
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
        Err(_) => Ok(found),
    }
}

/// Pins the pod-side program so `pod add` in another process can attach it.
pub fn pin_from_pod_program(ebpf: &mut Ebpf, pin_path: &Path) -> Result<()> {
    let path = pin_path.join(FROM_POD_PIN);
    let _ = std::fs::remove_file(&path);
    program(ebpf, names::PROG_FROM_POD)?
        .pin(&path)
        .map_err(|e| {
            Error::io(
                format!("pinning {}", path.display()),
                std::io::Error::other(e.to_string()),
            )
        })
}

/// The pinned pod-side program, when a daemon is running.
#[must_use]
pub fn pinned_from_pod_program(pin_path: &Path) -> Option<SchedClassifier> {
    SchedClassifier::from_pin(pin_path.join(FROM_POD_PIN)).ok()
}

/// Attaches the pod-side program to a pod's host veth.
pub fn attach_pod(prog: &mut SchedClassifier, pin_path: &Path, ifindex: u32) -> Result<()> {
    let ifname = netdev::ifname(ifindex)
        .ok_or_else(|| Error::UnknownInterface(format!("ifindex {ifindex}")))?;
    attach(
        prog,
        &ifname,
        TcAttachType::Ingress,
        pin_path,
        &pod_link_name(ifindex),
    )
}

pub fn detach_pod(pin_path: &Path, ifindex: u32) -> Result<bool> {
    detach(pin_path, &pod_link_name(ifindex))
}

/// Attaches the pod-side program to every registered pod's veth (pods added while no daemon
/// ran). Returns how many were attached.
pub fn attach_registered_pods(prog: &mut SchedClassifier, maps: &Maps) -> Result<usize> {
    let mut attached = 0;
    for (ip, pod) in maps.pods()? {
        match attach_pod(prog, &maps.path, pod.host_ifindex) {
            Ok(()) => attached += 1,
            Err(e) => warn!("pod {ip} ({}): {e}", pod.name()),
        }
    }
    Ok(attached)
}

/// Removes every pinned link (detaching the programs) and the pinned program; the maps stay.
pub fn detach_all(pin_path: &Path) -> Result<usize> {
    let mut detached = 0;
    for record in ClsactRecord::all(pin_path) {
        record.detach()?;
        detached += 1;
    }
    if let Ok(entries) = std::fs::read_dir(pin_path.join(LINKS_DIR)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if detach(pin_path, &name)? {
                detached += 1;
            }
        }
    }
    let _ = std::fs::remove_file(pin_path.join(FROM_POD_PIN));
    Ok(detached)
}

/// An exclusive lock per pin path, so two daemons never drive the same maps.
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    pub fn acquire(pin_path: &Path) -> Result<Self> {
        let dir = Path::new("/run/datapath-user");
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating /run/datapath-user", e))?;
        let escaped: String = pin_path
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{escaped}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // SAFETY: valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::AlreadyRunning {
                path: pin_path.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        file.set_len(0)
            .map_err(|e| Error::io("truncating lock file", e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io("writing lock file", e))?;
        info!("lock {} held", path.display());
        Ok(Self { _file: file })
    }
}
