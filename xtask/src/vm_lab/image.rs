//! What the lab boots, built from Debian packages and cached under `target/vm-lab/`: QEMU 7.2
//! unpacked (not installed: the machine's qemu-utils from backports blocks installing it), the
//! cloud kernel, a debootstrap rootfs with that kernel's modules, an initramfs that loads the
//! virtio modules, and per run a payload disk with the scripts and the release binary.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{cpio, Kernel};
use crate::setup::package_installed;

/// Host packages: debootstrap, and QEMU 7.2's shared libraries and firmware (installable
/// beside qemu-utils 10, unlike qemu-system-x86 itself).
const HOST_PACKAGES: &[&str] = &[
    "debootstrap",
    "e2fsprogs",
    "xz-utils",
    "seabios",
    "ipxe-qemu",
    "libaio1",
    "libasound2",
    "libbpf1",
    "libbrlapi0.8",
    "libcacard0",
    "libcap-ng0",
    "libcapstone4",
    "libepoxy0",
    "libfdt1",
    "libfuse3-3",
    "libgbm1",
    "libglib2.0-0",
    "libibverbs1",
    "libjpeg62-turbo",
    "libnuma1",
    "libpixman-1-0",
    "libpmem1",
    "libpng16-16",
    "librdmacm1",
    "libsasl2-2",
    "libseccomp2",
    "libslirp0",
    "libsndio7.0",
    "libspice-server1",
    "liburing2",
    "libusb-1.0-0",
    "libusbredirparser1",
    "libvdeplug2",
];

/// QEMU 7.2 (bookworm's), unpacked.
const QEMU_DEBS: &[&str] = &["qemu-system-x86", "qemu-system-common", "qemu-system-data"];

/// The guests' userland.
const ROOTFS_PACKAGES: &str = "iproute2,iptables,bpftool,iperf3,ethtool,socat,iputils-ping,\
                               traceroute,kmod,procps,jq,bc,tcpdump,conntrack";

/// Modules the initramfs loads (with their dependencies): the disks and NICs are virtio.
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

/// Everything a run needs.
pub struct Artifacts {
    pub qemu: PathBuf,
    pub qemu_data: Vec<PathBuf>,
    pub kernel: PathBuf,
    pub kernel_release: String,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace().join("target"), PathBuf::from)
        .join("vm-lab")
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn output(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the host packages the lab needs (idempotent).
pub fn ensure_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("==> vm-lab: apt-get install {}", missing.join(" "));
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Downloads `package` (the candidate version) into `debs/` and unpacks it into `into`,
/// unless `marker` exists already.
fn unpack(cache: &Path, package: &str, into: &Path) -> Result<()> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let prefix = format!("{}_", package.replace('+', "%2b"));
    let find = || -> Option<PathBuf> {
        fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{package}_")) || n.starts_with(&prefix)
                    })
            })
    };
    if find().is_none() {
        eprintln!("==> vm-lab: apt-get download {package}");
        run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                // Root downloads into target/ (which apt's sandbox user may not write).
                .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package])
                .current_dir(&debs),
        )?;
    }
    let deb = find().with_context(|| format!("{package}: downloaded .deb not found"))?;
    fs::create_dir_all(into)?;
    run(
        &format!("dpkg-deb -x {}", deb.display()),
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(into),
    )
}

/// The kernel package the meta-package of `kernel` currently depends on.
fn kernel_package(kernel: Kernel) -> Result<String> {
    let meta = match kernel {
        Kernel::V6_1 => "linux-image-cloud-amd64",
        Kernel::V6_12 => "linux-image-6.12-cloud-amd64",
    };
    let deps = output(
        "apt-cache depends",
        Command::new("apt-cache").args(["depends", meta]),
    )?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("{meta}: no kernel package (run apt-get update)"))?;
    // The unsigned build is the same kernel without the Secure Boot signature.
    Ok(package.trim_end_matches("-unsigned").to_string())
}

pub fn prepare(kernel: Kernel) -> Result<Artifacts> {
    let cache = cache_dir();
    fs::create_dir_all(&cache)?;

    let qemu_root = cache.join("qemu");
    let qemu = qemu_root.join("usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        for p in QEMU_DEBS {
            unpack(&cache, p, &qemu_root)?;
        }
    }

    let package = kernel_package(kernel)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let kernel_root = cache.join(format!("kernel-{release}"));
    let vmlinuz = kernel_root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        unpack(&cache, &package, &kernel_root)?;
    }

    let rootfs_dir = cache.join("rootfs");
    let done = rootfs_dir.join(".vmlab-packages");
    if fs::read_to_string(&done).ok().as_deref() != Some(ROOTFS_PACKAGES) {
        eprintln!("==> vm-lab: debootstrap (bookworm, minbase)");
        let _ = fs::remove_dir_all(&rootfs_dir);
        let mut cmd = Command::new("debootstrap");
        cmd.args([
            "--variant=minbase",
            &format!("--include={ROOTFS_PACKAGES}"),
            "bookworm",
        ])
        .arg(&rootfs_dir)
        .stdout(Stdio::null());
        // The mirror this machine's apt uses (else debootstrap's default).
        if let Some(mirror) = apt_mirror() {
            cmd.arg(mirror);
        }
        run("debootstrap", &mut cmd)?;
        fs::write(&done, ROOTFS_PACKAGES)?;
    }
    let modules = rootfs_dir.join("usr/lib/modules").join(&release);
    if !modules.join("modules.dep").exists() {
        fs::create_dir_all(modules.parent().unwrap_or(&rootfs_dir))?;
        run(
            "copying the kernel modules",
            Command::new("cp")
                .arg("-a")
                .arg(kernel_root.join("lib/modules").join(&release))
                .arg(&modules),
        )?;
        run(
            "depmod",
            Command::new("chroot")
                .arg(&rootfs_dir)
                .args(["depmod", &release]),
        )?;
    }

    let rootfs = cache.join(format!("rootfs-{release}.img"));
    if !rootfs.exists() {
        eprintln!("==> vm-lab: rootfs image");
        make_ext4(&rootfs_dir, &rootfs, 1536)?;
    }

    let initramfs = cache.join(format!("initramfs-{release}.cpio"));
    let busybox = cache.join("busybox/bin/busybox");
    if !busybox.exists() {
        unpack(&cache, "busybox-static", &cache.join("busybox"))?;
    }
    write_initramfs(&busybox, &modules, &initramfs)?;

    Ok(Artifacts {
        qemu,
        qemu_data: vec![
            qemu_root.join("usr/share/qemu"),
            PathBuf::from("/usr/share/seabios"),
        ],
        kernel: vmlinuz,
        kernel_release: release,
        initramfs,
        rootfs,
    })
}

/// The URI of the bookworm main archive in this machine's apt sources.
fn apt_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(entries.flatten().map(|e| e.path()));
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .find_map(|text| mirror_in(&text))
}

/// Finds a bookworm entry in one sources file (one-line or deb822 format).
fn mirror_in(text: &str) -> Option<String> {
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"deb") {
            let rest: Vec<&str> = words[1..]
                .iter()
                .copied()
                .filter(|w| !w.starts_with('['))
                .collect();
            if rest.get(1) == Some(&"bookworm") {
                return rest.first().map(|s| (*s).to_string());
            }
        }
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
        };
        if field("Suites:").is_some_and(|s| s.split_whitespace().any(|s| s == "bookworm")) {
            return field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_string));
        }
    }
    None
}

/// An ext4 image of `dir` (no root or loop device needed), `mib` MiB, sparse.
pub fn make_ext4(dir: &Path, image: &Path, mib: u64) -> Result<()> {
    let _ = fs::remove_file(image);
    fs::File::create(image)
        .and_then(|f| f.set_len(mib << 20))
        .with_context(|| format!("creating {}", image.display()))?;
    run(
        &format!("mkfs.ext4 {}", image.display()),
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(image),
    )
}

/// The modules to load, dependencies first, from `modules.dep`.
fn load_order(modules_dep: &str, wanted: &[&str]) -> Vec<String> {
    let deps: Vec<(&str, Vec<&str>)> = modules_dep
        .lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((module, deps.split_whitespace().collect()))
        })
        .collect();
    let stem = |path: &str| {
        let name = path.rsplit('/').next().unwrap_or(path);
        name.split(".ko").next().unwrap_or(name).to_string()
    };
    let mut order: Vec<String> = Vec::new();
    for want in wanted {
        let Some((module, needs)) = deps.iter().find(|(m, _)| stem(m) == *want) else {
            continue; // built into this kernel
        };
        // modules.dep lists the deepest dependency last.
        for path in needs.iter().rev().chain(std::iter::once(module)) {
            if !order.iter().any(|o| o == path) {
                order.push((*path).to_string());
            }
        }
    }
    order
}

fn write_initramfs(busybox: &Path, modules: &Path, out: &Path) -> Result<()> {
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules.display()))?;
    let init = fs::read(crate::workspace().join("deploy/vm-lab/initramfs-init"))?;
    let mut w = cpio::Writer::new(std::io::BufWriter::new(fs::File::create(out)?));
    for d in ["bin", "dev", "proc", "sys", "modules", "newroot"] {
        w.dir(d)?;
    }
    w.file("bin/busybox", 0o755, &fs::read(busybox)?)?;
    w.file("init", 0o755, &init)?;
    let mut order = String::new();
    for path in load_order(&dep, BOOT_MODULES) {
        let bytes = fs::read(modules.join(&path))?;
        // busybox insmod takes plain modules; 6.12's are xz-compressed.
        let (name, bytes) = if let Some(plain) = path.strip_suffix(".xz") {
            let out = Command::new("xz")
                .args(["-dc"])
                .arg(modules.join(&path))
                .output()
                .context("running xz")?;
            if !out.status.success() {
                bail!("xz -d {path} failed");
            }
            (plain.to_string(), out.stdout)
        } else {
            (path.clone(), bytes)
        };
        let file = name.rsplit('/').next().unwrap_or(&name).to_string();
        w.file(&format!("modules/{file}"), 0o644, &bytes)?;
        order.push_str(&file);
        order.push('\n');
    }
    w.file("modules.order", 0o644, order.as_bytes())?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_either_sources_format() {
        let deb822 = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\n\
                      Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        let one_line = "deb [arch=amd64] http://mirror.invalid/debian bookworm main\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        assert_eq!(mirror_in("deb http://x.invalid/ nodistro main\n"), None);
    }

    #[test]
    fn dependencies_load_first_once_and_builtins_are_skipped() {
        let dep = "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n";
        let order = load_order(dep, &["virtio_pci", "virtio_blk", "virtio_net"]);
        let names: Vec<&str> = order
            .iter()
            .map(|p| p.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_pci_modern_dev.ko",
                "virtio_pci.ko",
                "virtio_blk.ko"
            ]
        );
    }
}
