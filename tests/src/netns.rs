//! Running commands and closures inside network namespaces.

use std::{
    os::fd::AsRawFd as _,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Runs `program args` in the root namespace; fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    check(&format!("{program} {}", args.join(" ")), &out)
}

/// Runs `args` inside namespace `ns` (`ip netns exec`).
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let out = exec_output(ns, args)?;
    check(&format!("[{ns}] {}", args.join(" ")), &out)
}

/// [`exec`] of a command line whose arguments contain no spaces ("ip link set lo up").
pub fn exec_line(ns: &str, line: &str) -> Result<String> {
    exec(ns, &line.split_whitespace().collect::<Vec<_>>())
}

/// Attribute `attr` of device `dev` in namespace `ns`, from `/sys/class/net` (which `ip netns
/// exec` mounts for the namespace).
fn device_attr(ns: &str, dev: &str, attr: &str) -> Result<String> {
    let out = exec(ns, &["cat", &format!("/sys/class/net/{dev}/{attr}")])?;
    Ok(out.trim().to_string())
}

/// The MAC address of `dev` in namespace `ns` (`02:00:...`).
pub fn mac_of(ns: &str, dev: &str) -> Result<String> {
    device_attr(ns, dev, "address")
}

/// The ifindex of `dev` in namespace `ns`.
pub fn ifindex_of(ns: &str, dev: &str) -> Result<u32> {
    device_attr(ns, dev, "ifindex")?
        .parse()
        .context("reading an ifindex")
}

/// True when one ping from `ns` to `dst` is answered within a second.
#[must_use]
pub fn ping(ns: &str, dst: &str) -> bool {
    exec_output(ns, &["ping", "-c", "1", "-W", "1", dst]).is_ok_and(|out| out.status.success())
}

/// Traceroute from `ns` to `dst`: one probe per hop, 1 s wait, at most 5 hops.
pub fn traceroute(ns: &str, dst: &str) -> Result<String> {
    exec(
        ns,
        &["traceroute", "-n", "-q", "1", "-w", "1", "-m", "5", dst],
    )
}

/// Like [`exec`] but returns the raw output whatever the exit status.
pub fn exec_output(ns: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} in {ns}"))
}

fn check(what: &str, out: &Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread that has entered namespace `ns`; sockets it creates live there.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let handle = spawn_within(ns, f)?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))
}

/// Spawns a thread in namespace `ns` running `f`.
pub fn spawn_within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid namespace descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = tx.send(rc);
        assert_eq!(rc, 0, "setns failed");
        f()
    });
    if rx.recv().unwrap_or(-1) != 0 {
        bail!(
            "entering namespace {ns} failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(handle)
}
