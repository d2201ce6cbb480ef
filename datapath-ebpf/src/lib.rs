//! The eBPF programs live in the `datapath` binary target (`src/main.rs`), built for
//! `bpfel-unknown-none` by `datapath-user`'s build script.
#![no_std]
