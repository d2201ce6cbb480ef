//! `datapath-user detach`: remove the programs a `run --keep-attached` left attached.

use datapath_user::loader;

use super::PinArgs;

/// Detach the programs a `run --keep-attached` left attached.
///
/// Removes every link pinned under --pin-path (uplink and pods); the maps stay, so a later
/// `run` continues every flow.
///
/// Example: datapath-user detach
#[derive(clap::Args)]
pub struct DetachArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// Also remove the derived DIR/05-datapath.conflist (`run --cni-conf-dir`), handing the
    /// node's pods back to the VPC CNI's own chain.
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<std::path::PathBuf>,
}

pub fn execute(args: &DetachArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.cni_conf_dir {
        // The chain first: no new pod may be wired for a datapath about to go.
        if datapath_user::conflist::remove(dir)? {
            println!(
                "removed {}",
                dir.join(datapath_user::conflist::DERIVED_NAME).display()
            );
        }
    }
    let detached = loader::detach_all(&args.pin.pin_path)?;
    println!(
        "detached {detached} programs; maps kept at {}",
        args.pin.pin_path.display()
    );
    Ok(())
}
