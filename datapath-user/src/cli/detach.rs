//! `datapath-user detach`: uninstall, removing the programs from the uplink and every pod.

use datapath_user::{loader, Error};

use super::PinArgs;

/// Uninstall: detach every program of the datapath (uplink and pods).
///
/// The programs stay attached when `datapath-user run` exits, so that restarts and upgrades
/// never leave pods untranslated; this is how they are removed. Refused while a daemon serves
/// the pin path, unless --force. The pinned maps stay, so a later `run` continues every flow.
/// Once detached, pod IPv4 is no longer translated.
///
/// Examples:
///   datapath-user detach
///   datapath-user detach --pin-path /sys/fs/bpf/datapath --force
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct DetachArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// Detach even though a daemon serves the pin path (it then reports itself not ready).
    #[arg(long)]
    force: bool,
    /// Also remove the derived DIR/05-datapath.conflist (`run --cni-conf-dir`), handing the
    /// node's pods back to the VPC CNI's own chain (first, before the programs go).
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<std::path::PathBuf>,
}

pub fn execute(args: &DetachArgs) -> anyhow::Result<()> {
    let pin_path = &args.pin.pin_path;
    if let Some(pid) = loader::daemon_pid(pin_path) {
        if !args.force {
            return Err(Error::DaemonRunning {
                path: pin_path.clone(),
                pid,
            }
            .into());
        }
        eprintln!("warning: detaching under the running daemon (pid {pid}) (--force)");
    }
    if let Some(dir) = &args.cni_conf_dir {
        // The chain first: no new pod may be wired for a datapath about to go.
        if datapath_user::conflist::remove(dir)? {
            println!(
                "removed {}",
                dir.join(datapath_user::conflist::DERIVED_NAME).display()
            );
        }
    }
    let detached = loader::detach_all(pin_path)?;
    let what = match detached {
        0 => "nothing was attached".to_string(),
        1 => "detached 1 program".to_string(),
        n => format!("detached {n} programs"),
    };
    if pin_path.join(datapath_common::maps::CONNTRACK).exists() {
        println!(
            "{what}; pod IPv4 is no longer translated; maps kept at {}",
            pin_path.display()
        );
    } else {
        println!("{what}; no maps at {}", pin_path.display());
    }
    Ok(())
}
