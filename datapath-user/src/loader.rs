//! Loading the eBPF object with pinned maps, writing the configuration, and attaching the
//! programs. Attachments are TCX links pinned under `<pin>/links`, so `pod add` (another
//! process) can attach pods, a crashed daemon leaves translation running, and a new daemon
//! swaps its programs into the existing links atomically.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, ProgramArray},
    programs::{
        links::{FdLink, PinnedLink},
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

fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
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
        // Older kernels: a clsact filter, which stays until it is detached explicitly.
        let _ = tc::qdisc_add_clsact(ifname);
        let id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::Netlink(tc::NlOptions::default()),
            )
            .map_err(|e| Error::program(context(), e))?;
        std::mem::forget(
            prog.take_link(id)
                .map_err(|e| Error::program(context(), e))?,
        );
        return Ok(());
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

/// Detaches what is pinned at `<pin>/links/<what>`; false when nothing was.
pub fn detach(pin_path: &Path, what: &str) -> Result<bool> {
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
        Err(_) => Ok(false),
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
    let ifname = netdev::ifname(ifindex).ok_or(Error::UnknownIfindex(ifindex))?;
    attach(
        prog,
        &ifname,
        TcAttachType::Ingress,
        pin_path,
        &pod_link_name(ifindex),
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

/// Attaches the pod-side program to every registered pod's veth (pods added while no daemon
/// ran). Returns how many were attached.
pub fn attach_registered_pods(prog: &mut SchedClassifier, maps: &Maps) -> Result<usize> {
    let mut attached = 0;
    for (ip, pod) in maps.pods()? {
        match attach_pod(prog, &maps.path, pod.host_ifindex) {
            Ok(()) => attached += 1,
            Err(e) => warn!(
                "pod {ip} ({}) not attached: {e}; `datapath-user pod del --ip {ip}` removes it",
                if pod.name().is_empty() {
                    "no name"
                } else {
                    pod.name()
                }
            ),
        }
    }
    Ok(attached)
}

/// Removes every pinned link (detaching the programs) and the pinned program; the maps stay.
pub fn detach_all(pin_path: &Path) -> Result<usize> {
    let mut detached = 0;
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

    /// The pid of the daemon serving `pin_path`, if one runs.
    #[must_use]
    pub fn holder(pin_path: &Path) -> Option<String> {
        let pin = bpffs::canonical(pin_path).ok()?;
        lock_keys(&pin)
            .ok()?
            .into_iter()
            .find_map(|key| LockFile::holder(&Path::new(LOCK_DIR).join(key)))
    }
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

    /// The pid written in the lock file at `path` while a live process holds it.
    fn holder(path: &Path) -> Option<String> {
        let file = File::open(path).ok()?;
        // SAFETY: valid descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None;
        }
        let owner = std::fs::read_to_string(path).ok()?;
        Some(owner.lines().next()?.trim().to_string())
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        // Unlinked while still locked: a waiting process re-checks the name (see acquire).
        let _ = std::fs::remove_file(&self.path);
    }
}
