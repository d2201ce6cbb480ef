//! BPF_PROG_TEST_RUN micro-benchmarks, run by `cargo xtask bench` (ignored in `cargo test`):
//! ns per packet for each path, lookup cost as the table grows to 1M flows, memory per flow,
//! and new-flow cost with 0/50/90/99% of one destination's NAT ports held. Writes JSON to
//! `$DATAPATH_BENCH_OUT`.

use datapath_common::{
    flow::{Binding, Flow, FlowKey, FlowState, PROTO_TCP, PROTO_UDP},
    maps as names,
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        addr, pod_tcp, with_harness, Harness, HarnessOptions, NODE_IP, OTHER_POD_IP, POD_IP,
        ROUTER_IP, SERVER_IP, SERVER_MAC,
    },
};
use serde_json::json;

const RUNS: usize = 5000;

/// Flows taken in turn by the many-flow figures (first pod port).
const ROTATION: u16 = 512;
const ROTATION_FIRST_PORT: u16 = 20_000;

fn reply_to(nat_port: u16) -> Vec<u8> {
    Ipv4Packet::new(
        SERVER_IP,
        NODE_IP,
        PROTO_TCP,
        packet::tcp(SERVER_IP, NODE_IP, 80, nat_port, TCP_ACK, b"y"),
    )
    .frame(SERVER_MAC, GW_MAC)
}

/// Interquartile mean of one run for each of the `ROTATION` flows in turn (`frame(i)` is
/// flow i's packet), after a pass that refreshes them all: a flow idle for over a second
/// takes the revalidation path, which is not the figure.
fn rotation_ns(h: &mut Harness, prog: &str, ifindex: u32, frame: impl Fn(usize) -> Vec<u8>) -> f64 {
    for i in 0..usize::from(ROTATION) {
        h.run(prog, &frame(i), ifindex).unwrap();
    }
    h.run_cost(prog, ifindex, usize::from(ROTATION), frame)
        .unwrap()
        .interquartile_mean
}

/// Interquartile mean of `RUNS` single runs (see `RunCost`).
fn typical_ns(
    h: &mut Harness,
    prog: &str,
    ifindex: u32,
    frame: impl FnMut(usize) -> Vec<u8>,
) -> f64 {
    h.run_cost(prog, ifindex, RUNS, frame)
        .unwrap()
        .interquartile_mean
}

fn memlock_bytes(pinned: &std::path::Path) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(pinned)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["bytes_memlock"].as_u64().unwrap_or(0)
}

/// Lookup cost as the table grows to 1M flows: the established flow (pod port 45000) and its
/// `reply`, and `ROTATION` flows in turn; `base` is subtracted. `table` names the table size
/// in each figure's name, when it is not the default of the run (1Mi).
fn table_growth(
    h: &mut Harness,
    base: f64,
    reply: &[u8],
    targets: &[u32],
    table: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let (pod_if, up_if) = (h.pod_ifindex, h.uplink_ifindex);
    let (from_pod, ingress) = (names::PROG_FROM_POD, names::PROG_UPLINK_INGRESS);
    let net = |v: f64| (v - base).max(0.0).round();
    let mut scale = serde_json::Map::new();
    // Lookup cost as the table grows: the flow above, and `ROTATION` flows in turn.
    let rotation_nat: Vec<u16> = (0..ROTATION)
        .map(|i| {
            Parsed::parse(&h.from_pod(&pod_tcp(ROTATION_FIRST_PORT + i, 80, TCP_SYN)).1).src_port()
        })
        .collect();
    let now = datapath_user::maps::monotonic_coarse_ns();
    let mut filled = h.maps.conntrack.keys().flatten().count() as u32;
    for &target in targets {
        let start = std::time::Instant::now();
        let added = target.saturating_sub(filled);
        // Each flow with its binding, as the programs make them: a reply's lookup meets a
        // binding table as full as the flow table. (destination, NAT port) is unique per
        // flow, so every binding has a tuple of its own.
        for i in filled..target {
            let key = FlowKey::new(
                PROTO_UDP,
                0xa9fe_ac00 | (i % 1024),
                2000 + (i / 1024) as u16,
                0xcb00_7100 | (i % 251),
                53,
            );
            let nat_port = 1 + (i / 251) as u16;
            let flow = Flow {
                created_ns: now,
                last_seen_ns: now,
                nat_ip: addr(NODE_IP),
                nat_port,
                state: FlowState::Replied as u8,
                ..Flow::default()
            };
            h.maps.conntrack.insert(key, flow, 0).unwrap();
            let binding = key.reply_tuple(addr(NODE_IP), nat_port);
            h.maps
                .bindings
                .insert(binding, Binding::claim(key), 0)
                .unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        filled = target;
        let cost = net(typical_ns(h, from_pod, pod_if, |_| {
            pod_tcp(45000, 80, TCP_ACK)
        }));
        scale.insert(
            format!("established out at {target} flows{table} (ns)"),
            json!(cost),
        );
        let cost = net(typical_ns(h, ingress, up_if, |_| reply.to_vec()));
        scale.insert(
            format!("reply in at {target} flows{table} (ns)"),
            json!(cost),
        );
        let cost = net(rotation_ns(h, from_pod, pod_if, |i| {
            pod_tcp(ROTATION_FIRST_PORT + i as u16, 80, TCP_ACK)
        }));
        scale.insert(
            format!("established out at {target} flows{table}, {ROTATION} in turn (ns)"),
            json!(cost),
        );
        let cost = net(rotation_ns(h, ingress, up_if, |i| {
            reply_to(rotation_nat[i])
        }));
        scale.insert(
            format!("reply in at {target} flows{table}, {ROTATION} in turn (ns)"),
            json!(cost),
        );
        if added > 0 {
            scale.insert(
                format!("userspace insert rate to {target}{table} (flows/s)"),
                json!((f64::from(added) / secs).round()),
            );
        }
    }
    scale
}

#[test]
#[ignore = "benchmark: run by cargo xtask bench"]
fn micro_benchmarks() {
    let out_path =
        std::env::var("DATAPATH_BENCH_OUT").unwrap_or_else(|_| "/tmp/datapath-micro.json".into());
    let mut result = with_harness(HarnessOptions { flow_table_size: 1 << 20, port_range: (1024, 65535), ..HarnessOptions::default() }, |h| {
        let (pod_if, up_if) = (h.pod_ifindex, h.uplink_ifindex);
        let from_pod = names::PROG_FROM_POD;
        let ingress = names::PROG_UPLINK_INGRESS;
        let arp = packet::arp();
        let base = typical_ns(h, from_pod, pod_if, |_| arp.clone());
        // Established flow and its reply.
        let syn = Parsed::parse(&h.from_pod(&pod_tcp(45000, 80, TCP_SYN)).1);
        let nat_port = syn.src_port();
        let est_out = typical_ns(h, from_pod, pod_if, |_| pod_tcp(45000, 80, TCP_ACK));
        let reply = reply_to(nat_port);
        let est_in = typical_ns(h, ingress, up_if, |_| reply.clone());
        // A new flow each run (slow path: FIB, port allocation, flow creation).
        let new_flow = typical_ns(h, from_pod, pod_if, |i| pod_tcp(1000 + i as u16, 80, TCP_SYN));
        // Those flows go, so that the smallest table below holds the 1k flows it says.
        let made: Vec<(FlowKey, FlowKey)> = h.maps.bindings.iter().flatten()
            .map(|(tuple, binding)| (tuple, binding.owner))
            .filter(|(_, owner)| owner.dst_port == 80 && (1000..1000 + RUNS as u16).contains(&owner.src_port))
            .collect();
        for (binding, owner) in made {
            let _ = h.maps.bindings.remove(&binding);
            let _ = h.maps.conntrack.remove(&owner);
        }
        // ICMP fragmentation-needed about the established flow.
        let quoted = Parsed::parse(&pod_tcp(45000, 80, TCP_ACK));
        let mut quoted_ip = quoted.ip[..28].to_vec();
        quoted_ip[12..16].copy_from_slice(&NODE_IP);
        quoted_ip[20..22].copy_from_slice(&nat_port.to_be_bytes());
        let icmp = Ipv4Packet::new(ROUTER_IP, NODE_IP, 1, packet::icmp(3, 4, [0, 0, 5, 0], &quoted_ip)).frame(SERVER_MAC, GW_MAC);
        let icmp_in = typical_ns(h, ingress, up_if, |_| icmp.clone());
        let p2p = Ipv4Packet::new(POD_IP, OTHER_POD_IP, PROTO_UDP, packet::udp(POD_IP, OTHER_POD_IP, 1, 2, b"x", true)).frame(POD_MAC, GW_MAC);
        let drop = typical_ns(h, from_pod, pod_if, |_| p2p.clone());
        let net = |v: f64| (v - base).max(0.0).round();
        let paths = json!({
            "established out": net(est_out), "reply in": net(est_in), "new flow": net(new_flow),
            "ICMP error in": net(icmp_in), "drop (pod to pod)": net(drop), "frame passed at the first check (subtracted)": base,
        });

        let mut scale = table_growth(h, base, &reply, &[1_000, 100_000, 1_000_000], "");
        let now = datapath_user::maps::monotonic_coarse_ns();
        let pin = h.maps.path.clone();
        let per_flow = (memlock_bytes(&pin.join("CONNTRACK")) + memlock_bytes(&pin.join("NAT_BINDINGS"))) / (1 << 20);
        scale.insert("memory per flow (bytes, CONNTRACK + NAT_BINDINGS, from memlock)".into(), json!(per_flow));

        // New flows to one destination with 0/50/90/99% of the default range's 64,512 NAT
        // ports held by live connections (established flows, not reclaimable), spread over the
        // range. As in a running daemon, a sweep pass (which rebuilds the destination's port
        // hint) runs after the fill; then 200 SYNs each create a flow (timed), raising the
        // fill by 0.3 points at most; they are removed (untimed) before the next level.
        // Port 8443: a tuple space of its own (the flows above all went to port 80).
        let range = h.config.port_count();
        let mut held = 0u32;
        let mut fill_costs = serde_json::Map::new();
        for percent in [0u32, 50, 90, 99] {
            let target = range * percent / 100;
            for i in held..target {
                // A permutation of the range (a prime stride): used ports spread out.
                let port = h.config.port_min + ((u64::from(i) * 7919) % u64::from(range)) as u16;
                let owner = FlowKey::new(PROTO_TCP, addr(OTHER_POD_IP) + (i >> 16), 1 + (i & 0xffff) as u16, addr(SERVER_IP), 8443);
                let flow = Flow { created_ns: now, last_seen_ns: now, nat_ip: addr(NODE_IP), nat_port: port, state: FlowState::Established as u8, ..Flow::default() };
                h.maps.conntrack.insert(owner, flow, 0).unwrap();
                h.maps.bindings.insert(owner.reply_tuple(addr(NODE_IP), port), Binding::claim(owner), 0).unwrap();
            }
            held = target;
            // A fresh sweeper's first tick is a full scan, which rebuilds the hints.
            datapath_user::sweep::Sweeper::new(std::time::Duration::from_secs(1)).run(&mut h.maps).unwrap();
            let before = h.counter(datapath_common::counters::Counter::DropPortExhausted);
            let mut times = Vec::with_capacity(200);
            let mut created = Vec::new();
            for i in 0..200u16 {
                let sport = 30000 + i;
                let syn = Ipv4Packet::new(POD_IP, SERVER_IP, PROTO_TCP, packet::tcp(POD_IP, SERVER_IP, sport, 8443, TCP_SYN, b""))
                    .frame(POD_MAC, GW_MAC);
                let (verdict, out, took) = h.run_timed(from_pod, &syn, pod_if).unwrap();
                times.push(took.as_nanos());
                if verdict == datapath_tests::testrun::TC_ACT_REDIRECT {
                    created.push((sport, Parsed::parse(&out).src_port()));
                }
            }
            for (sport, nat_port) in created {
                let key = FlowKey::new(PROTO_TCP, addr(POD_IP), sport, addr(SERVER_IP), 8443);
                let _ = h.maps.bindings.remove(&key.reply_tuple(addr(NODE_IP), nat_port));
                let _ = h.maps.conntrack.remove(&key);
            }
            times.sort_unstable();
            // Interquartile mean, as `run_cost` reports.
            let mid = &times[times.len() / 4..times.len() * 3 / 4];
            let iqm = mid.iter().sum::<u128>() as f64 / mid.len() as f64;
            let exhausted = h.counter(datapath_common::counters::Counter::DropPortExhausted) - before;
            fill_costs.insert(format!("{percent}%"), json!({ "ns": net(iqm), "exhaustion_drops": exhausted }));
        }
        scale.insert(format!("new flow to one destination by fill of its {range} NAT ports (ns, drops in 200 new flows)"), fill_costs.into());
        scale.insert("new flow, empty range (ns)".into(), json!(net(new_flow)));
        json!({ "runs_per_figure": RUNS, "paths": paths, "scale": scale })
    })
    .unwrap();
    if let Some(scale) = result["scale"].as_object_mut() {
        scale.extend(growth_with_headroom());
    }
    std::fs::write(&out_path, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
}

/// [`table_growth`] for the same million flows in a table of twice the entries: the kernel
/// gives a hash table as many buckets as its size rounded up to a power of two, so 1M flows
/// fill the 1Mi table's buckets 95% (a lookup walks past another flow's entry every other
/// time) and this one's 48%.
fn growth_with_headroom() -> serde_json::Map<String, serde_json::Value> {
    let opts = HarnessOptions {
        flow_table_size: 1 << 21,
        port_range: (1024, 65535),
        ..HarnessOptions::default()
    };
    with_harness(opts, |h| {
        let arp = packet::arp();
        let base = typical_ns(h, names::PROG_FROM_POD, h.pod_ifindex, |_| arp.clone());
        let nat_port = Parsed::parse(&h.from_pod(&pod_tcp(45000, 80, TCP_SYN)).1).src_port();
        let reply = reply_to(nat_port);
        table_growth(h, base, &reply, &[1_000, 1_000_000], " in a 2Mi table")
    })
    .unwrap()
}
