//! The clsact attachment (kernels before 6.6, no TCX), forced on this kernel: programs stay
//! attached when the daemon exits, the next `run` replaces ours in place without a gap, and
//! `detach` removes exactly our filters, not another tool's on the same hooks.

use std::process::{Command, Stdio};

use datapath_tests::{
    lab::SERVER_IP,
    netns::{exec, ping},
    Lab, LabOptions,
};
use datapath_user::loader::{FORCE_CLSACT_ENV, TC_HANDLE, TC_PRIORITY};

/// Our filters on a hook: the `tc filter show` lines in our slot.
fn ours(ns: &str, dev: &str, dir: &str) -> Vec<String> {
    let out = exec(ns, &["tc", "filter", "show", "dev", dev, dir]).unwrap();
    out.lines()
        .filter(|l| {
            l.contains(&format!("pref {TC_PRIORITY} "))
                && l.contains(&format!("handle {TC_HANDLE:#x} "))
        })
        .map(str::to_string)
        .collect()
}

/// The program id a filter line names.
fn prog_id(line: &str) -> String {
    line.split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn clsact_filters_survive_exit_are_replaced_in_place_and_detach_removes_only_ours() {
    // SAFETY: the only test in this binary; set before any thread or child starts.
    unsafe { std::env::set_var(FORCE_CLSACT_ENV, "1") };
    // Builds where exiting detaches unless told otherwise need --keep-attached; where the
    // programs always stay attached the flag may be gone.
    let help = Command::new(datapath_tests::datapath_user_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let run_args = if String::from_utf8_lossy(&help.stdout).contains("--keep-attached") {
        vec!["--keep-attached".into()]
    } else {
        Vec::new()
    };
    let mut lab = Lab::new(LabOptions {
        pods: 1,
        run_args,
        ..LabOptions::default()
    })
    .expect("lab");
    let pod = lab.pod(0).clone();
    let node = lab.node.clone();
    let hooks = [
        ("eth0", "ingress"),
        ("eth0", "egress"),
        (pod.host_veth.as_str(), "ingress"),
    ];
    for (dev, dir) in hooks {
        let lines = ours(&node, dev, dir);
        assert_eq!(lines.len(), 1, "{dev} {dir}: one filter of ours: {lines:?}");
        assert!(lines[0].contains("direct-action"), "{lines:?}");
    }
    assert!(ping(&pod.ns, SERVER_IP), "translation through clsact");
    let before = prog_id(&ours(&node, "eth0", "ingress")[0]);

    // Another tool's filter on the same hook, in another slot.
    exec(
        &node,
        &[
            "tc",
            "filter",
            "add",
            "dev",
            "eth0",
            "ingress",
            "prio",
            "7",
            "protocol",
            "ip",
            "u32",
            "match",
            "ip",
            "dst",
            "203.0.113.99/32",
            "classid",
            "1:1",
        ],
    )
    .unwrap();

    // Exit: the programs stay and keep translating.
    lab.stop_daemon(libc::SIGTERM).unwrap();
    assert_eq!(ours(&node, "eth0", "ingress").len(), 1, "left attached");
    assert!(ping(&pod.ns, SERVER_IP), "translation with no daemon");

    // Restart under a ping flood: the new programs replace ours in place, no packet lost.
    let flood = Command::new("ip")
        .args([
            "netns", "exec", &pod.ns, "ping", "-q", "-i", "0.01", "-c", "300", "-W", "1",
        ])
        .arg(SERVER_IP)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    lab.start_daemon().unwrap();
    let out = flood.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        summary.contains(" 0% packet loss"),
        "gap on restart: {summary}"
    );
    for (dev, dir) in hooks {
        assert_eq!(
            ours(&node, dev, dir).len(),
            1,
            "{dev} {dir}: still one filter of ours"
        );
    }
    let after = prog_id(&ours(&node, "eth0", "ingress")[0]);
    assert_ne!(
        before, after,
        "the new daemon's program replaced the old one"
    );

    // Uninstall: ours go, the other tool's stays.
    lab.stop_daemon(libc::SIGTERM).unwrap();
    lab.cli(&["detach"]).unwrap();
    for (dev, dir) in hooks {
        assert!(
            ours(&node, dev, dir).is_empty(),
            "{dev} {dir}: ours removed"
        );
    }
    let rest = exec(&node, &["tc", "filter", "show", "dev", "eth0", "ingress"]).unwrap();
    assert!(
        rest.contains("pref 7 u32"),
        "another tool's filter kept:\n{rest}"
    );
    assert!(!ping(&pod.ns, SERVER_IP), "no translation once detached");
}
