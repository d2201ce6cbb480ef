//! End-to-end tests of the datapath on the namespace lab: real programs on real veths, real
//! traffic, the FORWARD REJECT rule installed, no iptables NAT. One binary, a module per
//! theme.

mod counters;
mod flows;
mod refusals;
mod restart;
mod traffic;

use datapath_tests::{Lab, LabOptions};

fn lab(opts: LabOptions) -> Lab {
    Lab::new(opts).expect("lab")
}
