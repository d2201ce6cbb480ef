//! Making sure the pin path is on a bpffs.

use std::{ffi::CString, os::unix::ffi::OsStrExt as _, path::Path};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

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

/// Ensures `pin_path` is a directory on a bpffs: creates it, mounting a bpffs at the nearest
/// ancestor that is not one (usually `/sys/fs/bpf`), when needed.
pub fn ensure_pin_dir(pin_path: &Path) -> Result<()> {
    let mount_point = if pin_path.starts_with("/sys/fs/bpf") {
        Path::new("/sys/fs/bpf")
    } else {
        pin_path.parent().unwrap_or(pin_path)
    };
    let bpffs_err = |reason: String| Error::Bpffs {
        path: mount_point.to_path_buf(),
        reason,
    };
    if !is_bpffs(mount_point) {
        std::fs::create_dir_all(mount_point).map_err(|e| bpffs_err(e.to_string()))?;
        let target = CString::new(mount_point.as_os_str().as_bytes())
            .map_err(|e| bpffs_err(e.to_string()))?;
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
            if err.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(Error::Permission(format!(
                    "mounting bpffs at {}",
                    mount_point.display()
                )));
            }
            return Err(bpffs_err(err.to_string()));
        }
    }
    std::fs::create_dir_all(pin_path)
        .map_err(|e| Error::io(format!("creating {}", pin_path.display()), e))?;
    if !is_bpffs(pin_path) {
        return Err(bpffs_err(format!(
            "{} is not on a bpffs",
            pin_path.display()
        )));
    }
    Ok(())
}
