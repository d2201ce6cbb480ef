//! NAT port allocation: candidates from `datapath_common::port`, each claimed in
//! `NAT_BINDINGS` unless another live flow or a node socket holds its reply tuple.

use aya_ebpf::{
    bindings::{
        __sk_buff, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        BPF_F_CURRENT_NETNS, BPF_NOEXIST,
    },
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_loop, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::map,
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use datapath_common::{
    config::{Config, PortRandomisation},
    counters::{alloc_probe_index, Counter},
    flow::{Binding, FlowKey, PROTO_TCP, PROTO_UDP},
    port::{self, PortHint},
};

use crate::{
    flow_ref::is_reclaimable,
    maps::{count, count_index, CONNTRACK, NAT_BINDINGS, PORT_HINTS},
};

/// Per-CPU working memory of the port probe (see [`ProbeScratch`]).
#[map]
static SCRATCH_PROBE: PerCpuArray<ProbeScratch> = PerCpuArray::with_max_entries(1, 0);

/// An all-clear hint, the source of new PORT_HINTS entries (never written).
#[map]
static EMPTY_HINT: Array<PortHint> = Array::with_max_entries(1, 0);

/// Mixed into the probe seed to pick the hint word a search starts from, so it does not start
/// where the scan does.
const HINT_START_SALT: u32 = 0x27d4_eb2f;

/// Finds and claims a NAT port for `key` (a pod tuple, or a node connection whose own port a
/// pod flow holds), counting the number of candidates it took.
#[inline(always)]
pub fn allocate(ctx: &TcContext, cfg: &Config, key: &FlowKey, now: u64) -> Result<u16, Counter> {
    let port_count = cfg.port_count();
    let mut search = PortSearch {
        skb: ctx.skb.skb,
        key: *key,
        // SAFETY: a helper without arguments.
        seed: port::probe_seed(cfg.randomisation(), key, unsafe { bpf_get_prandom_u32() }),
        port_count,
        node_ip: cfg.node_ip,
        port_min: cfg.port_min,
        mode: cfg.randomisation,
        found: 0,
        port: 0,
        probes: 0,
        hint_probes: 0,
        now,
    };
    // A destination with a hint (one whose range was once found busy) is searched through
    // it first: its clear bits are ports that are free unless the hint is behind.
    let hinted = PORT_HINTS.get_ptr_mut(port::hint_key(key)).is_some();
    // The probes need their working memory (they stop at once without it), and the value
    // they claim bindings with.
    let w = SCRATCH_PROBE.get_ptr_mut(0).ok_or(Counter::DropInternal)?;
    // SAFETY: this CPU's slot, used only while this program runs on it.
    unsafe {
        (*w).hint_words = 0;
        fill_claim(&raw mut (*w).claim, key);
    }
    // bpf_loop: the verifier checks a probe once instead of once per attempt.
    // SAFETY: the callbacks have bpf_loop's signature and take `ctx` as the PortSearch given
    // here, which outlives the calls.
    unsafe {
        if hinted {
            bpf_loop(
                port::HINT_ITERATIONS,
                probe_hint as *mut c_void,
                (&raw mut search).cast(),
                0,
            );
        }
        if search.found == 0 {
            search.hint_probes = search.probes;
            bpf_loop(
                port::max_probes(port_count),
                probe_port as *mut c_void,
                (&raw mut search).cast(),
                0,
            );
        }
    }
    if search.found == 0 {
        return Err(Counter::DropPortExhausted);
    }
    count_index(alloc_probe_index(search.probes));
    Ok(search.port)
}

/// State of a NAT port search, shared with the `bpf_loop` callbacks.
#[repr(C)]
struct PortSearch {
    skb: *mut __sk_buff,
    key: FlowKey,
    seed: u32,
    port_count: u32,
    node_ip: u32,
    port_min: u16,
    mode: u8,
    /// 1 once `port` is claimed.
    found: u8,
    port: u16,
    probes: u32,
    /// Steps the hint phase took (the scan's candidates are numbered after them).
    hint_probes: u32,
    now: u64,
}

/// The probe callback's working memory, in a per-CPU map: its frame counts against the
/// 512-byte stack on top of its caller's, which has none to spare.
#[repr(C)]
struct ProbeScratch {
    binding: FlowKey,
    owner: FlowKey,
    /// The binding value a claim inserts: the searching flow's, nothing counted yet.
    claim: Binding,
    tuple: bpf_sock_tuple,
    /// Full hint words passed over. Here rather than in `PortSearch`: a counter on the
    /// stack compared with a constant makes the verifier walk the loop once per value.
    hint_words: u32,
}

/// The search behind a `bpf_loop` callback's context, its step `attempt` recorded; gives the
/// destination a hint once its random candidates all failed.
#[inline(always)]
fn begin_step(attempt: u64, ctx: *mut c_void) -> &'static mut PortSearch {
    // SAFETY: bpf_loop passes back the PortSearch `allocate` gave it, alive and not otherwise
    // borrowed while the loop runs.
    let s = unsafe { &mut *ctx.cast::<PortSearch>() };
    s.probes = s.hint_probes + attempt as u32 + 1;
    if attempt == u64::from(port::RANDOM_PROBES) {
        // The random candidates all failed: this destination is busy; give it a hint.
        if let Some(empty) = EMPTY_HINT.get(0) {
            let _ = PORT_HINTS.insert(port::hint_key(&s.key), empty, u64::from(BPF_NOEXIST));
        }
    }
    s
}

/// One step of the hint phase: the next port whose hint bit is clear, claimed if it is free
/// (the bit is set either way: it is taken now). Returns 1 to stop the loop.
extern "C" fn probe_hint(attempt: u64, ctx: *mut c_void) -> i64 {
    let s = begin_step(attempt, ctx);
    let Some(scratch) = SCRATCH_PROBE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, used only while this program runs on it.
    let w = unsafe { &mut *scratch };
    w.owner = port::hint_key(&s.key);
    let Some(hint) = PORT_HINTS.get_ptr_mut(w.owner) else {
        return 1;
    };
    let words = s.port_count.div_ceil(u64::BITS);
    if w.hint_words >= port::HINT_WORDS_TRIED || w.hint_words >= words {
        return 1;
    }
    let index = ((port::mix32(s.seed ^ HINT_START_SALT) + w.hint_words) % words) as usize;
    if index >= port::HINT_WORDS {
        return 1;
    }
    // SAFETY: a PORT_HINTS value, valid while the program runs; `index` is checked above. A
    // racing CPU may lose a bit: it is only a hint.
    let word = unsafe { &mut (*hint).words[index] };
    if *word == u64::MAX {
        w.hint_words += 1;
        return 0;
    }
    let bit = port::lowest_clear_bit(*word);
    *word |= 1 << bit;
    let offset = index as u32 * u64::BITS + bit;
    if offset >= s.port_count {
        return 0;
    }
    let candidate = s.port_min + offset as u16;
    w.binding = s.key.reply_tuple(s.node_ip, candidate);
    // SAFETY: only whether the binding exists is looked at.
    if unsafe { NAT_BINDINGS.get(w.binding) }.is_some()
        || node_socket_owns(s.skb, &w.binding, &mut w.tuple)
        || NAT_BINDINGS
            .insert(w.binding, claimed_by(w), u64::from(BPF_NOEXIST))
            .is_err()
    {
        return 0;
    }
    s.found = 1;
    s.port = candidate;
    1
}

/// One probe: claims the candidate's reply tuple in NAT_BINDINGS unless it is taken (by
/// another live flow or a node socket). Returns 1 to stop the loop.
///
/// It looks before it claims: a failed insert into an LRU map costs more than a look-up
/// (the kernel takes a free node first), and most steps of a scan in a full range fail.
extern "C" fn probe_port(attempt: u64, ctx: *mut c_void) -> i64 {
    let s = begin_step(attempt, ctx);
    let candidate = port::candidate(
        PortRandomisation::from_u8(s.mode),
        s.seed,
        attempt as u32,
        s.key.src_port,
        s.port_min,
        s.port_count,
    );
    let Some(scratch) = SCRATCH_PROBE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, used only while this program runs on it.
    let w = unsafe { &mut *scratch };
    w.binding = s.key.reply_tuple(s.node_ip, candidate);
    // SAFETY: a NAT_BINDINGS value, valid while the program runs; copied out at once.
    let claim = match unsafe { NAT_BINDINGS.get(w.binding) } {
        None => Claim::Free,
        Some(taken) => {
            copy_key(&mut w.owner, &taken.owner);
            if w.owner == s.key {
                // Ours: the flow entry was evicted, the binding survived.
                Claim::Ours
            } else if is_reclaimable(&w.owner, s.now) {
                // Another connection's, over (or gone): taken over.
                Claim::Reclaim
            } else {
                return 0;
            }
        }
    };
    // No node socket (a TIME_WAIT one included) may answer to the tuple.
    if claim != Claim::Ours && node_socket_owns(s.skb, &w.binding, &mut w.tuple) {
        return 0;
    }
    if claim == Claim::Free {
        if NAT_BINDINGS
            .insert(w.binding, claimed_by(w), u64::from(BPF_NOEXIST))
            .is_err()
        {
            return 0;
        }
    } else if claim == Claim::Reclaim {
        let _ = CONNTRACK.remove(w.owner);
        if NAT_BINDINGS.insert(w.binding, claimed_by(w), 0).is_err() {
            return 0;
        }
        count(Counter::PortReclaimed);
    }
    s.found = 1;
    s.port = candidate;
    1
}

/// Copies a flow key word by word, volatile: a struct copy under the probe callback becomes a
/// call to `memmove`, a third frame that 6.1's verifier counts (with each frame rounded up to
/// 32 bytes the chain exceeds the 512-byte stack and tc_from_pod_slow is refused).
#[inline(always)]
fn copy_key(dst: &mut FlowKey, src: &FlowKey) {
    let src = core::ptr::from_ref(src).cast::<u32>();
    let dst = core::ptr::from_mut(dst).cast::<u32>();
    for i in 0..size_of::<FlowKey>() / size_of::<u32>() {
        // SAFETY: both point to whole FlowKeys (4-byte aligned plain data, a multiple of 4
        // bytes long), and `i` stays within them.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// The value a probe claims with, by reference: passed by value, the 72-byte binding would be
/// copied to the stack (with a `memmove` call) on the way to the helper.
#[inline(always)]
fn claimed_by(w: &ProbeScratch) -> &Binding {
    &w.claim
}

/// A new binding of `owner` (see [`Binding::claim`]) for `NAT_BINDINGS` inserts outside the
/// probe, in this CPU's probe scratch slot: the stack has no room for one on every path that
/// claims. The next claim or port search overwrites it.
#[inline(always)]
pub fn claim(owner: &FlowKey) -> Result<&'static Binding, Counter> {
    let w = SCRATCH_PROBE.get_ptr_mut(0).ok_or(Counter::DropInternal)?;
    // SAFETY: this CPU's slot, used only while this program runs on it; the reference given
    // out is dropped before anything else writes the slot (its users insert it at once).
    unsafe {
        fill_claim(&raw mut (*w).claim, owner);
        Ok(&(*w).claim)
    }
}

/// Makes `*slot` [`Binding::claim`]`(owner)`, word by word and volatile (as `copy_key`: a
/// struct store here becomes a `memset`/`memmove` call).
///
/// # Safety
/// `slot` must point to a `Binding` that nothing else reads or writes meanwhile.
#[inline(always)]
unsafe fn fill_claim(slot: *mut Binding, owner: &FlowKey) {
    let words = slot.cast::<u64>();
    for i in 0..size_of::<Binding>() / size_of::<u64>() {
        // SAFETY: the caller's slot, 8-byte aligned (a map value) and a multiple of 8 bytes
        // long; zero is valid for every field.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: as above.
    copy_key(unsafe { &mut (*slot).owner }, owner);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    Free,
    Ours,
    Reclaim,
}

/// True when the node itself has a socket that would take packets with this reply tuple
/// (a connected socket with the same 4-tuple or a listener on the port). `tuple` is working
/// memory for the look-up.
#[inline(always)]
pub fn node_socket_owns(skb: *mut __sk_buff, reply: &FlowKey, tuple: &mut bpf_sock_tuple) -> bool {
    if reply.proto != PROTO_TCP && reply.proto != PROTO_UDP {
        return false;
    }
    // SAFETY: writing (never reading) the IPv4 member of the union.
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = reply.src_ip.to_be();
        v4.daddr = reply.dst_ip.to_be();
        v4.sport = reply.src_port.to_be();
        v4.dport = reply.dst_port.to_be();
    }
    let size = size_of::<SockTupleV4>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = skb.cast();
    // SAFETY: `skb` is the program's context and `tuple` holds `size` initialised bytes; a
    // socket the look-up returns is released right away, as the verifier demands.
    unsafe {
        let sk = if reply.proto == PROTO_TCP {
            bpf_skc_lookup_tcp(skb, &raw mut *tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(skb, &raw mut *tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// [`node_socket_owns`] with working memory on the stack (outside the probe loop).
#[inline(always)]
pub fn node_socket_owns_reply(skb: *mut __sk_buff, reply: &FlowKey) -> bool {
    // SAFETY: plain C data, for which all zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    node_socket_owns(skb, reply, &mut tuple)
}
