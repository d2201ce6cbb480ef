//! NAT port candidates stay inside the configured range for any mode, seed and range.
#![no_main]

use datapath_common::{
    config::PortRandomisation,
    flow::FlowKey,
    port::{candidate, max_probes, probe_seed},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, u32, u16, u16, u16, [u32; 2], [u16; 2], u8)| {
    let (mode, random, pod_port, min, span, ips, ports, proto) = input;
    let mode = PortRandomisation::from_u8(mode % 3);
    let count = u32::from(span).min(65536 - u32::from(min));
    let key = FlowKey::new(proto, ips[0], ports[0], ips[1], ports[1]);
    let seed = probe_seed(mode, &key, random);
    for attempt in 0..max_probes(count).min(256) {
        let port = candidate(mode, seed, attempt, pod_port, min, count);
        if count == 0 {
            assert_eq!(port, min);
        } else {
            assert!(u32::from(port) >= u32::from(min) && u32::from(port) < u32::from(min) + count);
        }
    }
});
