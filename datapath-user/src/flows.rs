//! The flow view: flow-table entries joined with their bindings' reply counters and with pod
//! names, filtered and sorted.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use datapath_common::{
    flow::{proto_name, Flow, FlowKey, FLAG_NODE, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    ipv4::Cidr,
};
use serde::Serialize;

use crate::{
    error::Result,
    maps::{monotonic_coarse_ns, Maps},
};

/// One flow as `flows` prints it (the JSON field names are part of the CLI contract).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRecord {
    pub proto: &'static str,
    /// Shared by every flow of the pod: a million flows need not a million name copies.
    pub pod: Option<Arc<str>>,
    pub pod_ip: Ipv4Addr,
    pub pod_port: u16,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    pub nat_ip: Ipv4Addr,
    pub nat_port: u16,
    pub state: &'static str,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub age_s: u64,
    pub expires_s: u64,
    /// Host veth the pod's packets arrive on.
    pub ifindex: u32,
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Pod name (`namespace/pod`, or just the pod part) or pod IPv4.
    pub pod: Option<String>,
    pub proto: Option<u8>,
    pub dst: Option<Cidr>,
    pub state: Option<String>,
    /// Matches the pod, destination or NAT port.
    pub port: Option<u16>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.pod.is_none()
            && self.proto.is_none()
            && self.dst.is_none()
            && self.state.is_none()
            && self.port.is_none()
    }

    fn matches(&self, r: &FlowRecord) -> bool {
        if let Some(pod) = &self.pod {
            let by_ip = pod.parse::<Ipv4Addr>().is_ok_and(|ip| ip == r.pod_ip);
            let by_name = r.pod.as_deref().is_some_and(|name| {
                name == pod || name.rsplit_once('/').is_some_and(|(_, short)| short == pod)
            });
            if !by_ip && !by_name {
                return false;
            }
        }
        if self.proto.is_some_and(|p| proto_name(p) != r.proto) {
            return false;
        }
        if self.dst.is_some_and(|c| !c.contains(u32::from(r.dst_ip))) {
            return false;
        }
        if self.state.as_deref().is_some_and(|s| s != r.state) {
            return false;
        }
        if self
            .port
            .is_some_and(|p| p != r.pod_port && p != r.dst_port && p != r.nat_port)
        {
            return false;
        }
        true
    }
}

/// Sort rank of a protocol, in the order their names compare.
fn proto_rank(proto: u8) -> u8 {
    match proto {
        PROTO_ICMP => 0,
        PROTO_TCP => 1,
        PROTO_UDP => 2,
        _ => 3,
    }
}

/// The listing order as one integer: pod address, protocol, destination, port, pod port.
fn sort_key(key: &FlowKey) -> u128 {
    (u128::from(key.src_ip) << 96)
        | (u128::from(proto_rank(key.proto)) << 80)
        | (u128::from(key.dst_ip) << 32)
        | (u128::from(key.dst_port) << 16)
        | u128::from(key.src_port)
}

/// Builds the record for one entry at monotonic time `now`.
#[must_use]
pub fn record(
    key: &FlowKey,
    flow: &Flow,
    pod: Option<Arc<str>>,
    now: u64,
    timeouts: &datapath_common::config::Timeouts,
) -> FlowRecord {
    let expires_at = flow.expires_at_ns(key.proto, timeouts);
    FlowRecord {
        proto: proto_name(key.proto),
        pod,
        pod_ip: Ipv4Addr::from(key.src_ip),
        pod_port: key.src_port,
        dst_ip: Ipv4Addr::from(key.dst_ip),
        dst_port: key.dst_port,
        nat_ip: Ipv4Addr::from(flow.nat_ip),
        nat_port: flow.nat_port,
        state: flow.state().map_or("unknown", |s| s.name()),
        packets_out: flow.packets_out,
        bytes_out: flow.bytes_out,
        packets_in: flow.packets_in,
        bytes_in: flow.bytes_in,
        age_s: now.saturating_sub(flow.created_ns) / 1_000_000_000,
        expires_s: expires_at.saturating_sub(now).div_ceil(1_000_000_000),
        ifindex: flow.pod_ifindex,
    }
}

/// Every flow matching `filter`, sorted by pod, protocol, destination and port.
pub fn collect(maps: &Maps, filter: &Filter) -> Result<Vec<FlowRecord>> {
    let timeouts = maps.config()?.timeouts;
    let names: HashMap<u32, Arc<str>> = maps
        .pods()?
        .into_iter()
        .filter(|(_, pod)| !pod.name().is_empty())
        .map(|(ip, pod)| (u32::from(ip), Arc::from(pod.name())))
        .collect();
    let now = monotonic_coarse_ns();
    let name = |ip: u32| names.get(&ip).cloned();
    // Raw entries are kept and sorted through (key, index) pairs, and the records built
    // once, in order: at a million flows, moving ~130-byte records during a sort cost more
    // than the rest of the listing. Replies are counted in the flows' bindings: those are
    // read at the same time, on another thread, sorted the same way and merged in.
    let everything = filter.is_empty();
    let (entries, replies) = std::thread::scope(|scope| {
        let replies = scope.spawn(|| replies(maps));
        let mut entries = Vec::new();
        let flows = maps.for_each_flow(|key, flow| {
            // The node's own connections are tracked only to keep NAT ports off them
            // (`stats` counts them); they are not translations.
            if flow.flags & FLAG_NODE != 0 {
                return;
            }
            // The filter looks at nothing the binding adds (pod, tuple, state, ports).
            if everything || filter.matches(&record(key, flow, name(key.src_ip), now, &timeouts)) {
                entries.push((*key, *flow));
            }
        });
        let replies = replies.join().expect("the bindings reader does not panic");
        flows.and(replies).map(|replies| (entries, replies))
    })?;
    let mut order: Vec<(u128, u32)> = entries
        .iter()
        .zip(0u32..)
        .map(|((key, _), i)| (sort_key(key), i))
        .collect();
    order.sort_unstable();
    let mut replies = replies.iter().peekable();
    // Consecutive records mostly share a pod: one name lookup per run of them.
    let mut last: Option<(u32, Option<Arc<str>>)> = None;
    Ok(order
        .iter()
        .map(|&(rank, i)| {
            let (key, flow) = &entries[i as usize];
            let mut flow = *flow;
            while replies.next_if(|r| r.rank < rank).is_some() {}
            while let Some(r) = replies.next_if(|r| r.rank == rank) {
                // The binding under the flow's own reply tuple (an old one may linger).
                if r.nat == (flow.nat_ip, flow.nat_port) {
                    flow = flow.with_reply_counts(r.packets, r.bytes, r.last_seen_ns);
                }
            }
            let pod = match &last {
                Some((ip, pod)) if *ip == key.src_ip => pod.clone(),
                _ => {
                    let pod = name(key.src_ip);
                    last = Some((key.src_ip, pod.clone()));
                    pod
                }
            };
            record(key, &flow, pod, now, &timeouts)
        })
        .collect())
}

/// What a binding counted for its owner, placed for the merge with the flows: the owner's
/// listing rank, then the NAT address and port of the binding's tuple.
struct Replies {
    rank: u128,
    nat: (u32, u16),
    packets: u64,
    bytes: u64,
    last_seen_ns: u64,
}

/// The bindings that counted replies, in their owners' listing order.
fn replies(maps: &Maps) -> Result<Vec<Replies>> {
    let mut replies = Vec::new();
    maps.for_each_binding(|tuple, binding| {
        if binding.packets != 0 {
            replies.push(Replies {
                rank: sort_key(&binding.owner),
                nat: (tuple.dst_ip, tuple.dst_port),
                packets: binding.packets,
                bytes: binding.bytes,
                last_seen_ns: binding.last_seen_ns,
            });
        }
    })?;
    replies.sort_unstable_by_key(|r| r.rank);
    Ok(replies)
}

/// Writes `records` as the JSON array `serde_json` would write for them, byte for byte,
/// several times faster: `flows -o json` of a million flows is ~250 MB, and formatting
/// addresses and numbers through `fmt` dominated its time.
pub fn write_json(records: &[FlowRecord], out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    buf.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_record(&mut buf, r);
        if buf.len() >= (1 << 20) - 512 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    buf.push(b']');
    out.write_all(&buf)
}

fn write_record(buf: &mut Vec<u8>, r: &FlowRecord) {
    let mut num = itoa::Buffer::new();
    buf.extend_from_slice(b"{\"proto\":\"");
    buf.extend_from_slice(r.proto.as_bytes());
    buf.extend_from_slice(b"\",\"pod\":");
    match &r.pod {
        // Pod names are Kubernetes names (no character that needs escaping), but the
        // escaping is serde_json's all the same.
        Some(name) => {
            let _ = serde_json::to_writer(&mut *buf, &**name);
        }
        None => buf.extend_from_slice(b"null"),
    }
    let mut field = |name: &[u8], value: &[u8], quoted: bool| {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name);
        buf.extend_from_slice(if quoted { b"\":\"" } else { b"\":" });
        buf.extend_from_slice(value);
        if quoted {
            buf.push(b'"');
        }
    };
    let mut addr = [0u8; 15];
    field(b"pod_ip", ipv4_text(r.pod_ip, &mut addr), true);
    field(b"pod_port", num.format(r.pod_port).as_bytes(), false);
    field(b"dst_ip", ipv4_text(r.dst_ip, &mut addr), true);
    field(b"dst_port", num.format(r.dst_port).as_bytes(), false);
    field(b"nat_ip", ipv4_text(r.nat_ip, &mut addr), true);
    field(b"nat_port", num.format(r.nat_port).as_bytes(), false);
    field(b"state", r.state.as_bytes(), true);
    field(b"packets_out", num.format(r.packets_out).as_bytes(), false);
    field(b"bytes_out", num.format(r.bytes_out).as_bytes(), false);
    field(b"packets_in", num.format(r.packets_in).as_bytes(), false);
    field(b"bytes_in", num.format(r.bytes_in).as_bytes(), false);
    field(b"age_s", num.format(r.age_s).as_bytes(), false);
    field(b"expires_s", num.format(r.expires_s).as_bytes(), false);
    field(b"ifindex", num.format(r.ifindex).as_bytes(), false);
    buf.push(b'}');
}

/// Dotted-quad text of `ip` in `out`, returned as the slice used.
fn ipv4_text(ip: Ipv4Addr, out: &mut [u8; 15]) -> &[u8] {
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        let mut digits = itoa::Buffer::new();
        for &d in digits.format(octet).as_bytes() {
            out[len] = d;
            len += 1;
        }
    }
    &out[..len]
}

/// True when `pod` (as `Filter::pod` takes it) names or addresses a registered pod.
pub fn pod_is_registered(maps: &Maps, pod: &str) -> Result<bool> {
    let by_ip = pod.parse::<Ipv4Addr>().ok();
    Ok(maps.pods()?.iter().any(|(ip, info)| {
        let name = info.name();
        Some(*ip) == by_ip
            || (!name.is_empty()
                && (name == pod || name.rsplit_once('/').is_some_and(|(_, short)| short == pod)))
    }))
}

/// `secs.millis` since the Unix epoch as RFC 3339 UTC (`2026-12-01T13:11:47.250Z`).
#[must_use]
pub fn rfc3339_utc(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian, 400-year eras).
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_utc(now.as_secs(), now.subsec_millis())
}

/// A change in the flow table seen by `flows --follow`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowEvent {
    /// When the change was seen (RFC 3339, UTC).
    pub time: String,
    /// `open`, `state` (the state changed) or `close` (the flow left the table: it expired,
    /// was evicted or its pod was removed; its counters are the last ones seen).
    pub event: &'static str,
    #[serde(flatten)]
    pub flow: FlowRecord,
    /// For `close`: how long the flow lived, in seconds.
    pub duration_s: Option<u64>,
}

type Tuple = (&'static str, Ipv4Addr, u16, Ipv4Addr, u16);

fn tuple(r: &FlowRecord) -> Tuple {
    (r.proto, r.pod_ip, r.pod_port, r.dst_ip, r.dst_port)
}

/// Turns successive snapshots of the flow table into open/state/close events.
#[derive(Default)]
pub struct Follower {
    seen: HashMap<Tuple, FlowRecord>,
}

impl Follower {
    /// Starts from `initial` without reporting its flows as opened.
    #[must_use]
    pub fn new(initial: Vec<FlowRecord>) -> Self {
        Self {
            seen: initial.into_iter().map(|r| (tuple(&r), r)).collect(),
        }
    }

    /// The events between the previous snapshot and `current`, stamped with the time now.
    pub fn step(&mut self, current: Vec<FlowRecord>) -> Vec<FlowEvent> {
        self.step_at(current, &now_rfc3339())
    }

    fn step_at(&mut self, current: Vec<FlowRecord>, time: &str) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        let mut next = HashMap::with_capacity(current.len());
        for mut r in current {
            let key = tuple(&r);
            let old = self.seen.remove(&key);
            // `pod del` removes the pod before its flows: keep the name seen earlier.
            if r.pod.is_none() {
                r.pod = old.as_ref().and_then(|o| o.pod.clone());
            }
            match old {
                None => events.push(FlowEvent {
                    time: time.to_string(),
                    event: "open",
                    flow: r.clone(),
                    duration_s: None,
                }),
                Some(old) if old.state != r.state => {
                    events.push(FlowEvent {
                        time: time.to_string(),
                        event: "state",
                        flow: r.clone(),
                        duration_s: None,
                    });
                }
                Some(_) => {}
            }
            next.insert(key, r);
        }
        let mut closed: Vec<FlowRecord> = self.seen.drain().map(|(_, r)| r).collect();
        closed.sort_by_key(tuple);
        events.extend(closed.into_iter().map(|r| FlowEvent {
            time: time.to_string(),
            event: "close",
            duration_s: Some(r.age_s),
            flow: r,
        }));
        self.seen = next;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(port: u16, state: &'static str, packets: u64) -> FlowRecord {
        FlowRecord {
            proto: "tcp",
            pod: Some("default/web-0".into()),
            pod_ip: Ipv4Addr::new(169, 254, 172, 2),
            pod_port: port,
            dst_ip: Ipv4Addr::new(192, 0, 2, 20),
            dst_port: 80,
            nat_ip: Ipv4Addr::new(192, 0, 2, 10),
            nat_port: 20000,
            state,
            packets_out: packets,
            bytes_out: 0,
            packets_in: 0,
            bytes_in: 0,
            age_s: 7,
            expires_s: 1,
            ifindex: 3,
        }
    }

    #[test]
    fn follower_reports_open_state_and_close_with_last_counters() {
        let mut f = Follower::new(vec![rec(1, "established", 1)]);
        assert!(f.step(vec![rec(1, "established", 2)]).is_empty());
        let e = f.step(vec![rec(1, "established", 3), rec(2, "syn_sent", 1)]);
        assert_eq!((e.len(), e[0].event, e[0].flow.pod_port), (1, "open", 2));
        let e = f.step(vec![rec(1, "closing", 9), rec(2, "syn_sent", 1)]);
        assert_eq!((e.len(), e[0].event), (1, "state"));
        let e = f.step(vec![rec(2, "established", 4)]);
        assert_eq!(
            e.iter().map(|e| e.event).collect::<Vec<_>>(),
            ["state", "close"]
        );
        assert_eq!((e[1].flow.packets_out, e[1].duration_s), (9, Some(7)));
        assert!(e[1].time.ends_with('Z'));
    }

    #[test]
    fn close_after_pod_removal_keeps_the_name() {
        let mut f = Follower::new(vec![rec(1, "established", 1)]);
        // The pod entry went first: the flow is read once without its name, then is gone.
        let mut nameless = rec(1, "established", 2);
        nameless.pod = None;
        assert!(f.step_at(vec![nameless], "t1").is_empty());
        let e = f.step_at(vec![], "t2");
        assert_eq!(e[0].event, "close");
        assert_eq!(e[0].flow.pod.as_deref(), Some("default/web-0"));
        assert_eq!(e[0].time, "t2");
    }

    #[test]
    fn listing_orders_by_pod_then_protocol_destination_and_ports() {
        let key =
            |proto, src, sport, dst, dport| sort_key(&FlowKey::new(proto, src, sport, dst, dport));
        let mut keys = [
            key(PROTO_UDP, 2, 1, 1, 1),
            key(PROTO_TCP, 1, 9, 2, 1),
            key(PROTO_TCP, 1, 9, 1, 2),
            key(PROTO_TCP, 1, 1, 1, 2),
            key(PROTO_ICMP, 1, 9, 9, 9),
            key(99, 1, 0, 0, 0),
        ];
        let sorted = [keys[4], keys[3], keys[2], keys[1], keys[5], keys[0]];
        keys.sort_unstable();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn fast_json_is_serde_json_byte_for_byte() {
        let mut odd = rec(65535, "established", u64::MAX);
        odd.pod = Some("ns/\"quoted\"\\name".into());
        odd.pod_ip = Ipv4Addr::UNSPECIFIED;
        odd.dst_ip = Ipv4Addr::BROADCAST;
        odd.bytes_in = 10_000_000_000;
        let mut nameless = rec(0, "syn_sent", 0);
        nameless.pod = None;
        for records in [vec![], vec![rec(1, "closing", 9)], vec![odd, nameless]] {
            let mut fast = Vec::new();
            write_json(&records, &mut fast).unwrap();
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                serde_json::to_string(&records).unwrap()
            );
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_700_000_000, 5), "2023-11-14T22:13:20.005Z");
        assert_eq!(rfc3339_utc(951_782_400, 999), "2000-02-29T00:00:00.999Z");
    }
}
