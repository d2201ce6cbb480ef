//! Making sure the pin path is on a bpffs, without ever hiding an existing directory.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Component, Path, PathBuf},
};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The one bpffs mount point that is not the pin path itself.
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// True when `path` exists and is on a bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C string and a zeroed out-struct.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        // f_type is signed on glibc, unsigned on musl.
        libc::statfs(c_path.as_ptr(), &raw mut st) == 0
            && i128::from(st.f_type) == i128::from(BPF_FS_MAGIC)
    }
}

/// `path` spelled one way: absolute, its existing part with symlinks, `.` and `..` resolved,
/// the rest appended (`/p/lab/`, `/p/./lab` and `/p/x/../lab` are all `/p/lab`).
pub fn canonical(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("reading the current directory", e))?
            .join(path)
    };
    let existing = absolute
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or_else(|| Path::new("/"));
    let mut out = std::fs::canonicalize(existing)
        .map_err(|e| Error::io(format!("resolving {}", existing.display()), e))?;
    let rest = absolute.strip_prefix(existing).unwrap_or(Path::new(""));
    for component in rest.components() {
        match component {
            Component::Normal(part) => out.push(part),
            // The part that does not exist yet has no symlinks: `..` is lexical there.
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Ensures `pin_path` is a directory on a bpffs. A pin path on a bpffs (a mount point or
/// below one) is used as it is. Otherwise a bpffs is mounted at `/sys/fs/bpf` (for pin
/// paths below it) or at the pin path itself, and only on an empty directory: mounting on a
/// parent would hide that directory's files from every process of the mount namespace.
pub fn ensure_pin_dir(pin_path: &Path) -> Result<()> {
    let pin = canonical(pin_path)?;
    if pin.exists() && !pin.is_dir() {
        return Err(Error::Bpffs {
            path: pin.clone(),
            reason: "it exists and is not a directory".into(),
        });
    }
    let nearest = pin
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or_else(|| Path::new("/"));
    if !is_bpffs(nearest) {
        let mount_point = if pin.starts_with(SYS_FS_BPF) {
            PathBuf::from(SYS_FS_BPF)
        } else {
            pin.clone()
        };
        mount_bpffs(&mount_point)?;
    }
    std::fs::create_dir_all(&pin)
        .map_err(|e| Error::io(format!("creating {}", pin.display()), e))?;
    if !is_bpffs(&pin) {
        return Err(Error::Bpffs {
            path: pin.clone(),
            reason: format!("{} is not on a bpffs", pin.display()),
        });
    }
    Ok(())
}

/// Mounts a bpffs at `mount_point`, which must be missing or an empty directory.
fn mount_bpffs(mount_point: &Path) -> Result<()> {
    let bpffs_err = |reason: String| Error::Bpffs {
        path: mount_point.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(mount_point).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Error::Permission(format!("creating {}", mount_point.display()))
        } else {
            bpffs_err(e.to_string())
        }
    })?;
    let mut entries = std::fs::read_dir(mount_point).map_err(|e| bpffs_err(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bpffs_err(
            "the directory is not empty and a mount would hide its files; mount a bpffs there yourself or choose a new --pin-path".into(),
        ));
    }
    let target =
        CString::new(mount_point.as_os_str().as_bytes()).map_err(|e| bpffs_err(e.to_string()))?;
    // SAFETY: valid C strings; a plain bpffs mount.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
            return Err(Error::Permission(format!(
                "mounting bpffs at {}",
                mount_point.display()
            )));
        }
        return Err(bpffs_err(err.to_string()));
    }
    log::info!("mounted a bpffs at {}", mount_point.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_spellings_agree() {
        let tmp = std::env::temp_dir().join(format!("dp-canon-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("a")).unwrap();
        let base = canonical(&tmp).unwrap();
        for spelling in ["a/", "a/.", "./a", "a/../a", "b/../a"] {
            assert_eq!(
                canonical(&tmp.join(spelling)).unwrap(),
                base.join("a"),
                "{spelling}"
            );
        }
        // Not existing yet: resolved lexically.
        assert_eq!(canonical(&tmp.join("x/y/../z/")).unwrap(), base.join("x/z"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
