//! The lab's network namespace (two bridges, one tap per NIC) and the three VMs in it.
//!
//!   node 192.0.2.10 ── br0 ── 192.0.2.1 router 198.51.100.1 ── br1 (1280) ── server 198.51.100.20
//!
//! QEMU runs inside the namespace with tap backends only: nothing reaches another network.

use std::{
    fs,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Set by SIGINT/SIGTERM: the run stops following the console and cleans up (VMs, namespace).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`] so that drops run and nothing is left behind.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

use super::{image::Artifacts, report::Outcome, Accel};

/// A VM: its role (the guest's `vmlab.role`), memory, and NICs (tap, bridge, extra device
/// options).
struct Vm {
    role: &'static str,
    memory_mb: u32,
    nics: &'static [(&'static str, &'static str, &'static str)],
}

const VMS: &[Vm] = &[
    Vm {
        role: "router",
        memory_mb: 256,
        nics: &[("tap-rtr0", "br0", ""), ("tap-rtr1", "br1", "")],
    },
    Vm {
        role: "server",
        memory_mb: 384,
        // No checksum offload towards the server: it verifies every checksum it receives.
        nics: &[(
            "tap-srv0",
            "br1",
            ",guest_csum=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off",
        )],
    },
    Vm {
        role: "node",
        memory_mb: 1024,
        nics: &[("tap-node0", "br0", "")],
    },
];

pub struct Lab {
    pub ns: String,
    dir: PathBuf,
    vms: Vec<(&'static str, Child)>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Lab {
    /// Creates the namespace and its bridges and taps; removed on drop.
    pub fn new(dir: &Path) -> Result<Self> {
        let ns = format!(
            "vmlab-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() & 0xffff)
        );
        ip(&["netns", "add", &ns])?;
        let lab = Self {
            ns,
            dir: dir.to_path_buf(),
            vms: Vec::new(),
        };
        let n = lab.ns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        for br in ["br0", "br1"] {
            ip(&["-n", n, "link", "add", br, "type", "bridge"])?;
            ip(&["-n", n, "link", "set", br, "up"])?;
        }
        for vm in VMS {
            for (tap, br, _) in vm.nics {
                ip(&["-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
                ip(&["-n", n, "link", "set", tap, "master", br, "up"])?;
            }
        }
        Ok(lab)
    }

    fn qemu(&self, a: &Artifacts, payload: &Path, accel: Accel, vm: &Vm) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(&a.qemu);
        for dir in &a.qemu_data {
            cmd.arg("-L").arg(dir);
        }
        cmd.args(accel.qemu_args())
            .args(["-m", &vm.memory_mb.to_string(), "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot", "-serial"])
            .arg(format!(
                "file:{}",
                self.dir.join(format!("{}.console", vm.role)).display()
            ))
            .arg("-kernel")
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&a.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet loglevel=3 panic=-1 vmlab.role={}",
                vm.role
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,snapshot=on",
                a.rootfs.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                payload.display()
            ));
        for (i, (tap, _, opts)) in vm.nics.iter().enumerate() {
            cmd.arg("-netdev")
                .arg(format!("tap,id=n{i},ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n{i},mac=52:54:00:00:{:02x}:{i:02x},romfile={opts}",
                    VMS.iter().position(|v| v.role == vm.role).unwrap_or(0)
                ));
        }
        // snapshot=on keeps each VM's writes in a temporary file: put it in the run directory.
        cmd.env("TMPDIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.dir.join(format!("{}.qemu-stderr", vm.role)))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            );
        cmd
    }

    /// Boots the VMs and follows the node's console until the suite ends (or `timeout`),
    /// printing its result lines as they come.
    pub fn run(
        &mut self,
        a: &Artifacts,
        payload: &Path,
        accel: Accel,
        timeout: Duration,
    ) -> Result<Outcome> {
        for vm in VMS {
            let child = self
                .qemu(a, payload, accel, vm)
                .spawn()
                .with_context(|| format!("starting the {} VM", vm.role))?;
            self.vms.push((vm.role, child));
        }
        let console = self.dir.join("node.console");
        let deadline = Instant::now() + timeout;
        let mut outcome = Outcome::default();
        let mut offset = 0;
        let mut partial = String::new();
        loop {
            if let Ok(mut f) = fs::File::open(&console) {
                f.seek(SeekFrom::Start(offset))?;
                let mut reader = BufReader::new(f);
                let mut buf = Vec::new();
                while reader.read_until(b'\n', &mut buf)? > 0 {
                    offset += buf.len() as u64;
                    partial.push_str(&String::from_utf8_lossy(&buf));
                    buf.clear();
                    if partial.ends_with('\n') {
                        if let Some(shown) = outcome.feed(&partial) {
                            println!("  {shown}");
                        }
                        partial.clear();
                    }
                }
            }
            if outcome.done {
                break;
            }
            let node_exited = self
                .vms
                .iter_mut()
                .find(|(role, _)| *role == "node")
                .is_some_and(|(_, c)| c.try_wait().ok().flatten().is_some());
            if node_exited && !partial.is_empty() {
                outcome.feed(&partial);
            }
            let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed);
            if node_exited || interrupted || Instant::now() > deadline {
                let why = if interrupted {
                    "interrupted"
                } else if node_exited {
                    "the node VM stopped before the suite ended"
                } else {
                    "the suite did not finish in time"
                };
                eprintln!("vm-lab: {why}; node console tail:");
                let text = fs::read_to_string(&console).unwrap_or_default();
                for line in text.lines().rev().take(25).collect::<Vec<_>>().iter().rev() {
                    eprintln!("  | {line}");
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(outcome)
    }

    fn stop_vms(&mut self) {
        for (_, child) in &mut self.vms {
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: signalling our own child (`ip netns exec` execs QEMU in place).
                unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.vms {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.vms.clear();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_vms();
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Whether KVM boots this kernel: a bare boot (kernel and initramfs only, no NICs) that must
/// reach the initramfs in `limit`. Debian's 6.1 faults early on some paravirtual KVMs.
pub fn kvm_boots(a: &Artifacts, dir: &Path, limit: Duration) -> bool {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let console = dir.join("kvm-probe.console");
    let mut cmd = Command::new(&a.qemu);
    for d in &a.qemu_data {
        cmd.arg("-L").arg(d);
    }
    let Ok(mut child) = cmd
        .args(Accel::Kvm.qemu_args())
        .args([
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1 vmlab.probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + limit;
    let booted = loop {
        if fs::read_to_string(&console).is_ok_and(|t| t.contains("vmlab: initramfs up")) {
            break true;
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    booted
}
