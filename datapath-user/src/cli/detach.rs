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
}

pub fn execute(args: &DetachArgs) -> anyhow::Result<()> {
    let detached = loader::detach_all(&args.pin.pin_path)?;
    println!(
        "detached {detached} programs; maps kept at {}",
        args.pin.pin_path.display()
    );
    Ok(())
}
