//! nmvm: a minimal virtual machine monitor with one virtio-net device whose
//! backend is hard-wired to netmap rings.
//!
//! The binary `nmvm` is a thin command line over this library: [`vm::run`]
//! boots a guest and returns how its run ended.

pub mod affinity;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod console;
pub mod demo;
pub mod dpdk;
pub mod frame;
pub mod hypervisor;
pub mod metrics;
pub mod monitor;
pub mod pktgen;
pub mod report;
pub mod seccomp;
pub mod sigbus;
pub mod signal;
pub mod verdict;
pub mod vm;
