//! `datapath-user pod add|del|list`: the per-pod map.

use std::{collections::HashMap, net::Ipv4Addr};

use datapath_user::{loader, maps::Maps, netdev, pods};
use serde::Serialize;

use super::{output::print_table, Format, PinArgs};

/// Register, remove and list pods.
#[derive(clap::Subcommand)]
pub enum PodCommand {
    /// Register a pod's IPv4 on its host veth and attach the pod-side program there.
    ///
    /// Refused while the datapath is not attached (`datapath-user run` has never started, or
    /// `detach` removed it): the pod's IPv4 would leave the node untranslated.
    ///
    /// Example: datapath-user pod add --ip 169.254.172.2 --host-veth veth1a2b3c4d --name default/web-0
    Add {
        /// The pod's node-local IPv4 (in the pod range).
        #[arg(long, value_name = "169.254.172.N")]
        ip: Ipv4Addr,
        /// Host side of the pod's IPv4 veth.
        #[arg(long, value_name = "IFACE")]
        host_veth: String,
        /// NAMESPACE/POD (at most 64 bytes), shown by `flows` and `pod list`.
        #[arg(long, value_name = "NAMESPACE/POD", value_parser = parse_pod_name)]
        name: Option<String>,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Remove a pod and its flows (succeeds when it is not registered).
    ///
    /// Example: datapath-user pod del --ip 169.254.172.2
    Del {
        /// The pod's node-local IPv4, as given to `pod add`.
        #[arg(long, value_name = "169.254.172.N")]
        ip: Ipv4Addr,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// List registered pods.
    List {
        /// Output format (wide adds the pod's flow count and whether its program is
        /// attached).
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        pin: PinArgs,
    },
}

fn parse_pod_name(name: &str) -> Result<String, String> {
    datapath_common::pod::check_name(name)
        .map(|()| name.to_string())
        .map_err(|problem| format!("pod name {name:?} {problem}"))
}

#[derive(Serialize)]
struct PodRow {
    ip: Ipv4Addr,
    name: Option<String>,
    host_veth: Option<String>,
    ifindex: u32,
    /// The pod-side program is attached to its host veth.
    attached: bool,
    flows: usize,
}

pub fn execute(cmd: PodCommand) -> anyhow::Result<()> {
    match cmd {
        PodCommand::Add {
            ip,
            host_veth,
            name,
            pin,
        } => {
            let ifindex = netdev::ifindex(&host_veth)?;
            let name_str = name.as_deref().unwrap_or("");
            pods::register(&pin.pin_path, ip, ifindex, name_str)?;
            println!(
                "pod {ip}{} on {host_veth} (ifindex {ifindex}): registered and attached; its IPv4 is translated from now on",
                name.map(|n| format!(" ({n})")).unwrap_or_default()
            );
        }
        PodCommand::Del { ip, pin } => match pods::unregister(&pin.pin_path, ip)? {
            Some(flows) => println!(
                "pod {ip}: removed with {flows} {}",
                if flows == 1 { "flow" } else { "flows" }
            ),
            None => println!("pod {ip}: not registered"),
        },
        PodCommand::List { format, pin } => {
            let maps = Maps::open(&pin.pin_path)?;
            let mut flows: HashMap<u32, usize> = HashMap::new();
            maps.for_each_flow(|key, _| *flows.entry(key.src_ip).or_default() += 1)?;
            let rows: Vec<PodRow> = maps
                .pods()?
                .into_iter()
                .map(|(ip, p)| PodRow {
                    ip,
                    name: (!p.name().is_empty()).then(|| p.name().to_string()),
                    host_veth: netdev::ifname(p.host_ifindex),
                    ifindex: p.host_ifindex,
                    attached: loader::pod_attached(&pin.pin_path, p.host_ifindex),
                    flows: flows.get(&u32::from(ip)).copied().unwrap_or(0),
                })
                .collect();
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let wide = format == Format::Wide;
                let table: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| {
                        let mut row = vec![
                            r.ip.to_string(),
                            r.name.clone().unwrap_or_else(|| "-".into()),
                            r.host_veth.clone().unwrap_or_else(|| "(gone)".into()),
                            r.ifindex.to_string(),
                        ];
                        if wide {
                            row.push(if r.attached { "yes" } else { "no" }.into());
                            row.push(r.flows.to_string());
                        }
                        row
                    })
                    .collect();
                let mut header = vec!["IP", "NAME", "HOST VETH", "IFINDEX"];
                if wide {
                    header.extend(["ATTACHED", "FLOWS"]);
                }
                print_table(&header, &table);
            }
        }
    }
    Ok(())
}
