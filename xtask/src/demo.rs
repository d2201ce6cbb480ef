//! `cargo xtask demo`: the datapath end to end on the lab, narrated.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Result};
use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
    netns::{exec, exec_output},
    traffic::{self, Server},
    Lab, LabOptions,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn checkpoint() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: tearing the lab down");
    }
    Ok(())
}

fn say(what: &str) {
    println!("\n\x1b[1m==> {what}\x1b[0m");
}

pub fn run() -> Result<()> {
    if !datapath_tests::is_root() {
        bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    crate::setup::ensure()?;
    crate::build(false)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    say("building the lab: node 192.0.2.10, pods 169.254.172.2-4, server 192.0.2.20 (FORWARD REJECT for the pod range installed)");
    let lab = Lab::new(LabOptions {
        pods: 3,
        ..LabOptions::default()
    })?;
    println!(
        "namespaces: {}, {}, {}",
        lab.node,
        lab.server,
        lab.pods
            .iter()
            .map(|p| p.ns.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The drop of `lab` tears everything down, on success, error or Ctrl-C alike.
    let result = drive(&lab);
    say("tearing down");
    drop(lab);
    result?;
    say("done: every pod flow left with the node's address; see above");
    Ok(())
}

fn drive(lab: &Lab) -> Result<()> {
    checkpoint()?;
    say("datapath-user pod list");
    print!("{}", lab.cli(&["pod", "list"])?);

    let http_log = format!("/tmp/dp-demo-http-{}.log", lab.id);
    let http = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server,
            "python3",
            "-m",
            "http.server",
            "80",
            "--bind",
            SERVER_IP,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&http_log)?)
        .spawn()?;
    let http = ChildGuard(http);
    let udp = Server::udp_echo(&lab.server, 5353)?;
    std::thread::sleep(Duration::from_millis(500));

    for pod in &lab.pods {
        checkpoint()?;
        say(&format!(
            "{} ({}): ping, HTTP GET, UDP request to {SERVER_IP}",
            pod.name, pod.ip
        ));
        print!(
            "{}",
            exec(&pod.ns, &["ping", "-c", "2", "-i", "0.2", SERVER_IP])?
        );
        let out = exec_output(
            &pod.ns,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "HTTP %{http_code}, %{size_download} bytes\n",
                &format!("http://{SERVER_IP}/"),
            ],
        )?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        let reply = traffic::udp_request(&pod.ns, SERVER_IP, 5353, 5000, b"dns-like query")?;
        println!("UDP reply: {:?}", String::from_utf8_lossy(&reply));
    }
    checkpoint()?;
    say("datapath-user flows");
    print!("{}", lab.cli(&["flows"])?);
    say("datapath-user stats");
    print!("{}", lab.cli(&["stats"])?);
    say("what the server saw");
    drop(http);
    let log = std::fs::read_to_string(&http_log).unwrap_or_default();
    let _ = std::fs::remove_file(&http_log);
    for line in log.lines().filter(|l| l.contains("GET")) {
        println!("http server: {line}");
    }
    let mut clients: Vec<Ipv4Addr> = log
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .chain(udp.peer_ips())
        .collect();
    clients.sort();
    clients.dedup();
    println!("distinct client addresses at the server: {clients:?}");
    if clients != [NODE_IP.parse::<Ipv4Addr>()?] {
        bail!("the server saw addresses other than the node IP: {clients:?}");
    }
    Ok(())
}

/// Ends a child process we started when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
