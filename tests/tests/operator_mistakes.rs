//! An operator's ordinary mistakes on the namespace lab: each is refused with one clear line,
//! and none of them breaks a working pod's traffic or another daemon's state.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::SERVER_IP,
    netns::{exec, ping, within},
    traffic::{self, Server},
    Lab, LabOptions,
};

fn lab(opts: LabOptions) -> Lab {
    Lab::new(opts).expect("lab")
}

fn s(list: &[&str]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// What a command that may not stop by itself did within `limit`.
struct Outcome {
    /// None: still running at `limit` (then killed).
    status: Option<std::process::ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `datapath-user ARGS` in the node namespace for at most `limit`.
fn run_for(lab: &Lab, args: &[&str], limit: Duration) -> Outcome {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.node])
        .arg(datapath_tests::datapath_user_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn datapath-user");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = out.read_to_string(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = err.read_to_string(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            // Our own child, by pid; SIGTERM so a started daemon cleans up after itself.
            // SAFETY: signalling our child.
            unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// [`run_for`] with the lab's `--pin-path` appended.
fn run_pinned(lab: &Lab, args: &[&str], limit: Duration) -> Outcome {
    let pin = lab.pin_path.to_string_lossy();
    run_for(lab, &[args, &["--pin-path", &pin]].concat(), limit)
}

/// Asserts `args` exits non-zero promptly with `expected` in its one error line.
fn refused(lab: &Lab, args: &[&str], expected: &str) -> String {
    let out = run_for(lab, args, Duration::from_secs(10));
    let status = out
        .status
        .unwrap_or_else(|| panic!("{args:?} was not refused (still running): {}", out.stderr));
    assert!(!status.success(), "{args:?} succeeded: {}", out.stderr);
    assert_eq!(
        status.code(),
        Some(if out.stderr.starts_with("error:") {
            2
        } else {
            1
        }),
        "{args:?}: {}",
        out.stderr
    );
    assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{args:?}: {}", out.stderr);
    assert!(!out.stdout.contains("ready"), "{args:?} got ready");
    out.stderr
}

fn pinned_port_range(lab: &Lab) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&lab.cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    (
        v["port_range"][0].as_u64().unwrap(),
        v["port_range"][1].as_u64().unwrap(),
    )
}

/// Lock files in /run/datapath-user that name `pin` (by content or, as older versions
/// did, by their escaped file name).
fn lock_files_for(pin: &Path) -> Vec<PathBuf> {
    let spelled = pin.to_string_lossy().into_owned();
    let escaped: String = spelled
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    std::fs::read_dir("/run/datapath-user")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().contains(&escaped))
                        || std::fs::read_to_string(p).is_ok_and(|c| c.contains(&spelled))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_second_daemon_on_the_same_pin_directory_or_maps_is_refused_with_the_first_pid() {
    let mut lab = lab(LabOptions::default());
    let pid = lab.daemon_pid().unwrap().to_string();
    let pin = lab.pin_path.to_string_lossy().into_owned();
    let before = pinned_port_range(&lab);
    let mount = lab.bpf_mount.to_string_lossy().into_owned();
    let mount_name = lab
        .bpf_mount
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let spellings = [
        format!("{pin}/"),
        format!("{pin}/."),
        format!("{mount}/../{mount_name}/pin"),
    ];
    // A lock file a crashed daemon left behind: the next start removes it.
    let stale = PathBuf::from(format!("/run/datapath-user/stale-{}.lock", lab.id));
    std::fs::create_dir_all("/run/datapath-user").unwrap();
    std::fs::write(&stale, format!("999999\n{pin}-crashed\n")).unwrap();
    let refused_with_the_first_pid = |pin_path: &str| {
        let err = refused(
            &lab,
            &[
                "run",
                "--uplink",
                "eth0",
                "--port-range",
                "20000-29999",
                "--pin-path",
                pin_path,
            ],
            "already uses",
        );
        assert!(err.contains(&format!("pid {pid}")), "{err}");
    };
    for spelling in &spellings {
        refused_with_the_first_pid(spelling);
    }
    assert!(!stale.exists(), "stale lock file kept");
    // The same maps pinned at a second bpffs directory.
    let alias = PathBuf::from(format!("{mount}-alias"));
    std::fs::create_dir_all(&alias).unwrap();
    let alias_cleanup = Cleanup(alias.clone());
    datapath_tests::netns::run("mount", &["-t", "bpf", "bpf", alias.to_str().unwrap()]).unwrap();
    for entry in std::fs::read_dir(&lab.pin_path).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "links" || name.starts_with("prog_") {
            continue;
        }
        datapath_tests::netns::run(
            "bpftool",
            &[
                "map",
                "pin",
                "pinned",
                entry.path().to_str().unwrap(),
                alias.join(&name).to_str().unwrap(),
            ],
        )
        .unwrap();
    }
    refused_with_the_first_pid(alias.to_str().unwrap());
    drop(alias_cleanup);

    // Nothing of the first daemon's changed: its configuration, its pods' egress.
    assert_eq!(pinned_port_range(&lab), before);
    assert!(ping(&lab.pod(0).ns, SERVER_IP), "pod egress broken");
    assert!(lab.daemon_running(), "the first daemon died");
    assert!(!lock_files_for(&lab.pin_path).is_empty());
    assert!(lab.stop_daemon(libc::SIGTERM).unwrap().unwrap().success());
    assert_eq!(
        lock_files_for(&lab.pin_path),
        Vec::<PathBuf>::new(),
        "stale lock files"
    );
}

/// Unmounts and removes a directory when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mount points of type bpf in the mount namespace of `pid`.
fn bpf_mounts_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf ")))
        .filter_map(|l| l.split(' ').nth(4).map(ToString::to_string))
        .collect()
}

#[test]
fn bpffs_is_mounted_only_at_the_pin_path_never_over_a_parent_or_files() {
    let mut lab = lab(LabOptions {
        start_daemon: false,
        ..LabOptions::default()
    });
    let dir = PathBuf::from(format!("{}-files", lab.bpf_mount.display()));
    let _cleanup = Cleanup(dir.clone());
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/file.txt"), "operator's file").unwrap();

    // A new directory under a plain one: the bpffs goes on the pin path itself.
    lab.pin_path = dir.join("data/dp");
    lab.start_daemon().unwrap();
    let pid = lab.daemon_pid().unwrap();
    let mounts = bpf_mounts_of(pid);
    assert!(
        mounts.contains(&lab.pin_path.to_string_lossy().into_owned()),
        "{mounts:?}"
    );
    assert!(
        !mounts.contains(&dir.join("data").to_string_lossy().into_owned()),
        "{mounts:?}"
    );
    let seen = std::fs::read_to_string(format!(
        "/proc/{pid}/root{}",
        dir.join("data/file.txt").display()
    ));
    assert_eq!(
        seen.ok().as_deref(),
        Some("operator's file"),
        "the daemon hid the file"
    );
    lab.stop_daemon(libc::SIGTERM).unwrap();

    // A pin path that is a bpffs mount point is used as it is.
    lab.pin_path = lab.bpf_mount.clone();
    lab.start_daemon().unwrap();
    let pid = lab.daemon_pid().unwrap();
    let parent = lab
        .bpf_mount
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        !bpf_mounts_of(pid).contains(&parent),
        "bpffs mounted over {parent}"
    );
    lab.stop_daemon(libc::SIGTERM).unwrap();

    // A non-empty plain directory is never mounted over.
    let data = dir.join("data");
    refused(
        &lab,
        &[
            "run",
            "--uplink",
            "eth0",
            "--pin-path",
            data.to_str().unwrap(),
        ],
        "not empty",
    );
    assert!(data.join("file.txt").exists());
}

#[test]
fn run_checks_every_flag_before_touching_the_kernel() {
    // Pods registered, then the datapath stopped and detached: refused starts must leave
    // nothing attached.
    let mut lab = lab(LabOptions::default());
    let pod = lab.pod(0).clone();
    lab.stop_daemon(libc::SIGTERM).unwrap();
    lab.cli(&["detach"]).unwrap();
    let pin = lab.pin_path.to_string_lossy().into_owned();
    // A busy metrics port, in the node's namespace.
    let busy = within(&lab.node, || std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--sweep-interval", "inf"], "out of range"),
        (&["--sweep-interval", "NaN"], "out of range"),
        (&["--sweep-interval=-1"], "out of range"),
        (&["--flow-table-size", "0"], "out of range"),
        (&["--timeout-udp", "0"], "timeout of 0"),
        (&["--port-range", "2000-1000"], "did you mean 1000-2000"),
        (&["--port-range", "1-10"], "below 1024"),
        (&["--uplink", "lo"], "loopback"),
        (&["--gateway", "169.254.172.0"], "network address"),
        (&["--gateway", "169.254.175.255"], "broadcast address"),
        (&["--gateway", pod.ip.as_str()], "registered pod"),
        (&["--pod-cidr", "169.254.176.0/22"], "registered pod"),
        (&["--metrics-addr", busy_addr.as_str()], "in use"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["run", "--uplink", "eth0", "--pin-path", &pin];
        if extra[0] == "--uplink" {
            args.truncate(1);
            args.extend(["--pin-path", &pin]);
        }
        args.extend_from_slice(extra);
        let err = refused(&lab, &args, expected);
        assert_eq!(err.matches(expected).count(), 1, "{args:?}: {err}");
    }
    assert!(
        !lab.pin_path.join("links").exists()
            || std::fs::read_dir(lab.pin_path.join("links"))
                .unwrap()
                .next()
                .is_none(),
        "a refused start attached programs"
    );
    // Pinned maps of another size are kept, with a word; a pod whose veth is gone is named
    // by its address and ifindex.
    let gone = lab.pod(1).clone();
    let ifindex = lab.node_ifindex(&gone.host_veth).unwrap().to_string();
    exec(&lab.node, &["ip", "link", "del", &gone.host_veth]).unwrap();
    lab.opts.run_args = s(&["--flow-table-size", "1024"]);
    lab.start_daemon().unwrap();
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    assert!(log.contains("holds 524288 flows"), "{log}");
    assert!(
        log.contains(&format!(
            "pod {} (default/pod-1): its veth (ifindex {ifindex}) is gone; unregistering it",
            gone.ip
        )),
        "{log}"
    );
}

#[test]
fn pod_add_refuses_another_pods_address_and_what_is_not_a_pod() {
    let lab = lab(LabOptions::default());
    let (p0, p1) = (lab.pod(0).clone(), lab.pod(1).clone());
    let pin = lab.pin_path.to_string_lossy().into_owned();
    let add = |ip: &str, veth: &str| {
        vec![
            "pod",
            "add",
            "--ip",
            ip,
            "--host-veth",
            veth,
            "--pin-path",
            &pin,
        ]
        .into_iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
    };
    let cases = [
        (add(&p1.ip, &p0.host_veth), "already registered on"),
        (add("169.254.172.0", &p0.host_veth), "network address"),
        (add("169.254.172.1", &p0.host_veth), "gateway"),
        (add("169.254.175.255", &p0.host_veth), "broadcast address"),
        (add("169.254.176.2", &p0.host_veth), "outside the pod range"),
        (add("169.254.172.9", "lo"), "loopback"),
        (add("169.254.172.9", "eth0"), "uplink"),
    ];
    for (args, expected) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&lab, &args, expected);
    }
    let long = format!("default/{}", "a".repeat(57));
    let mut args = add("169.254.172.9", &p0.host_veth);
    args.extend(["--name".into(), long]);
    refused(
        &lab,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "64 bytes",
    );
    let mut args = add("169.254.172.9", &p0.host_veth);
    args.extend(["--name".into(), "web-0".into()]);
    refused(
        &lab,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "NAMESPACE/POD",
    );

    // The same address on the same veth again: idempotent.
    assert!(lab.register_pod(&p1).unwrap().contains("attached"));
    // Pod 1 kept its veth and its egress.
    let pods: serde_json::Value =
        serde_json::from_str(&lab.cli(&["pod", "list", "-o", "json"]).unwrap()).unwrap();
    let listed = pods
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == p1.ip.as_str())
        .unwrap();
    assert_eq!(listed["host_veth"], p1.host_veth.as_str());
    assert!(ping(&p1.ns, SERVER_IP), "pod 1 lost egress");
    assert_eq!(lab.counter("drop_spoofed_source").unwrap(), 0);
    let wide = lab.cli(&["pod", "list", "-o", "wide"]).unwrap();
    assert!(
        wide.contains("ATTACHED") && wide.contains("FLOWS"),
        "{wide}"
    );
}

#[test]
fn flows_options_say_what_they_do() {
    let lab = lab(LabOptions::default());
    let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let p0 = lab.pod(0).clone();
    traffic::udp_request(&p0.ns, SERVER_IP, 5353, 41000, b"q").unwrap();
    let pin = lab.pin_path.to_string_lossy().into_owned();
    let quick = |lab: &Lab, args: &[&str]| run_pinned(lab, args, Duration::from_secs(10));

    // A bare destination address is one host; states in any case.
    let out = quick(
        &lab,
        &[
            "flows", "--dst", SERVER_IP, "--state", "REPLIED", "-o", "json",
        ],
    );
    assert!(out.status.unwrap().success(), "{}", out.stderr);
    let flows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(flows.len(), 1, "{}", out.stdout);
    assert_eq!(out.stderr.trim(), "1 flow");
    for (args, expected) in [
        (&["flows", "--watch", "inf"][..], "out of range"),
        (
            &["flows", "--follow", "--interval", "inf"][..],
            "out of range",
        ),
        (&["flows", "--interval", "1"][..], "--follow"),
    ] {
        refused(&lab, &[args, &["--pin-path", &pin]].concat(), expected);
    }
    let out = quick(&lab, &["flows", "--pod", "nosuch/pod"]);
    assert!(out.stderr.contains("no registered pod"), "{}", out.stderr);

    // --watch with JSON: arrays only, no terminal escapes.
    let out = run_pinned(
        &lab,
        &["flows", "--watch", "0.2", "-o", "json"],
        Duration::from_millis(900),
    );
    assert!(out.status.is_none());
    assert!(!out.stdout.contains('\x1b'), "{:?}", out.stdout);
    let arrays: Vec<Vec<serde_json::Value>> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(arrays.len() >= 2, "{:?}", out.stdout);

    // --follow: a CLOSE after `pod del` keeps the pod's name, and events carry their time.
    let lab_ref = &lab;
    let follow = std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            run_pinned(
                lab_ref,
                &["flows", "--follow", "-o", "json", "--interval", "0.05"],
                Duration::from_secs(3),
            )
        });
        std::thread::sleep(Duration::from_millis(800));
        lab_ref.cli(&["pod", "del", "--ip", &p0.ip]).unwrap();
        handle.join().unwrap()
    });
    let close: serde_json::Value = follow
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "close")
        .unwrap_or_else(|| panic!("no close event: {}", follow.stdout));
    assert_eq!(close["pod"], "default/pod-0", "{close}");
    assert!(
        close["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{close}"
    );
}

#[test]
fn stats_and_flows_errors_are_one_line_with_a_hint() {
    let mut lab = lab(LabOptions::default());
    let pin = lab.pin_path.to_string_lossy().into_owned();
    let quick = |lab: &Lab, args: &[&str]| run_pinned(lab, args, Duration::from_secs(10));

    // Without privileges: one permission error with a hint, not the syscall twice.
    let out = lab.cli_as_nobody(&["stats", "--pin-path", &pin]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("run as root"), "{err}");
    assert!(err.matches("BPF_OBJ_GET").count() <= 1, "{err}");

    // With the daemon stopped, stats and flows say so on stderr.
    assert!(!quick(&lab, &["stats"])
        .stderr
        .contains("no `datapath-user run`"));
    lab.stop_daemon(libc::SIGTERM).unwrap();
    for args in [&["stats"][..], &["flows"][..]] {
        let out = quick(&lab, args);
        assert!(out.status.unwrap().success(), "{}", out.stderr);
        assert!(
            out.stderr.contains("no `datapath-user run` serves"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// nf_conntrack keeps a UDP flow whose only inbound packet was an ICMP port unreachable
/// unreplied (30 s), not replied (120 s).
#[test]
fn udp_answered_only_by_port_unreachable_stays_unreplied() {
    let lab = lab(LabOptions::default());
    let p0 = lab.pod(0).clone();
    // Nothing listens on the server's port 5999: the server answers port unreachable.
    assert!(traffic::udp_request(&p0.ns, SERVER_IP, 5999, 41500, b"q").is_err());
    std::thread::sleep(Duration::from_millis(200));
    let flows = lab.flows().unwrap();
    let udp = flows
        .iter()
        .find(|f| f["proto"] == "udp" && f["dst_port"] == 5999)
        .expect("udp flow");
    assert_eq!(udp["state"], "unreplied", "{udp}");
    assert!(udp["expires_s"].as_u64().unwrap() <= 30, "{udp}");
}
