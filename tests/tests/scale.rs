//! A million flows: the table fills, `flows` lists them in under 5 s.

use std::time::Instant;

use datapath_common::flow::{Flow, FlowKey, FlowState, PROTO_TCP};
use datapath_tests::testrun::{with_harness, HarnessOptions};

const FLOWS: u32 = 1_000_000;

#[test]
fn a_million_flows_list_in_under_five_seconds() {
    let opts = HarnessOptions {
        flow_table_size: 1 << 20,
        ..HarnessOptions::default()
    };
    with_harness(opts, |h| {
        let start = Instant::now();
        let now = datapath_user::maps::monotonic_coarse_ns();
        for i in 0..FLOWS {
            // 1,024 pods x ~977 destinations each.
            let key = FlowKey::new(PROTO_TCP, 0xa9fe_ac00 | (i % 1024), 10_000 + (i / 1024) as u16, 0xcb00_7100 | (i % 251), 443);
            let flow = Flow {
                created_ns: now,
                last_seen_ns: now,
                nat_ip: 0xc000_020a,
                nat_port: (1024 + i % 30_000) as u16,
                state: FlowState::Established as u8,
                packets_out: u64::from(i),
                ..Flow::default()
            };
            h.maps.conntrack.insert(key, flow, 0).unwrap();
        }
        let fill = start.elapsed();

        let pin = h.maps.path.clone();
        let start = Instant::now();
        let out = std::process::Command::new(datapath_tests::datapath_user_bin())
            .args(["flows", "-o", "json", "--pin-path"])
            .arg(&pin)
            .output()
            .unwrap();
        let list = start.elapsed();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let flows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(flows.len(), FLOWS as usize);
        let start = Instant::now();
        let table = std::process::Command::new(datapath_tests::datapath_user_bin())
            .args(["flows", "--pin-path"])
            .arg(&pin)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let list_table = start.elapsed();
        assert!(table.success());
        eprintln!(
            "1M flows: filled in {fill:.2?}; `flows -o json` {list:.2?} ({} MB), table {list_table:.2?}",
            out.stdout.len() >> 20
        );
        assert!(list.as_secs_f64() < 5.0, "flows -o json took {list:.2?}");
        assert!(list_table.as_secs_f64() < 5.0, "flows took {list_table:.2?}");
    })
    .unwrap();
}
