//! Types and kernel-free logic shared by the eBPF programs (`datapath-ebpf`) and userspace
//! (`datapath-user`).
//!
//! Everything here is `no_std`, `#[repr(C)]` where it crosses the kernel boundary, and compiles
//! for the host too, so the logic the packet path depends on (checksum arithmetic, tuple
//! building, the TCP state machine, NAT port probing, timeouts) is unit- and property-tested
//! without a kernel.
#![no_std]

pub mod config;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod headers;
pub mod ipv4;
pub mod maps;
pub mod pod;
pub mod port;
pub mod scan;
pub mod skb;
pub mod tcp;

#[cfg(feature = "user")]
mod user_pod {
    // SAFETY: all of these are `#[repr(C)]` plain-old-data types with explicit padding fields,
    // valid for every bit pattern.
    unsafe impl aya::Pod for crate::config::Config {}
    unsafe impl aya::Pod for crate::flow::FlowKey {}
    unsafe impl aya::Pod for crate::flow::Flow {}
    unsafe impl aya::Pod for crate::flow::Binding {}
    unsafe impl aya::Pod for crate::flow::FragKey {}
    unsafe impl aya::Pod for crate::pod::PodInfo {}
    unsafe impl aya::Pod for crate::maps::LayoutInfo {}
    unsafe impl aya::Pod for crate::port::PortHint {}
}
