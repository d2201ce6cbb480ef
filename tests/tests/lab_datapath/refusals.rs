//! What `run` and the CLI refuse: bad input, pinned maps of another layout.

use datapath_tests::{netns::exec_output, LabOptions};

use crate::lab;

#[test]
fn bad_input_gets_one_clear_line() {
    let lab = lab(LabOptions {
        start_daemon: false,
        ..LabOptions::default()
    });
    let pin = lab.pin_path.to_str().unwrap().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--uplink", "nope0"], "does not exist"),
        (
            &["run", "--uplink", "eth0", "--pod-cidr", "169.254.172.1/22"],
            "host bits",
        ),
        (
            &["run", "--uplink", "eth0", "--node-ip", "192.0.2.99"],
            "not an address of",
        ),
        (&["run", "--uplink", "eth0", "--port-range", "9-3"], "empty"),
        (&["flows"], "no datapath maps"),
    ];
    for (args, expected) in cases {
        let mut full = args.to_vec();
        full.extend(["--pin-path", &pin]);
        let out = lab.cli_output(&full).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let mut lab = lab(LabOptions::default());
    lab.stop_daemon(libc::SIGTERM).unwrap();
    // Overwrite the pinned layout record as an incompatible version would have written it.
    let layout = lab.pin_path.join("LAYOUT");
    let out = exec_output(
        &lab.node,
        &[
            "bpftool",
            "map",
            "update",
            "pinned",
            layout.to_str().unwrap(),
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
            "99",
            "0",
            "0",
            "0",
            "16",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = lab.start_daemon().unwrap_err().to_string();
    assert!(err.contains("layout"), "{err}");
}
