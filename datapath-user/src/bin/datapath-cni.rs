//! `datapath-cni`: the CNI plugin (see `datapath_user::cni`). Chained after the primary
//! IPv6 plugin; reads the network configuration on stdin and CNI_* from the environment.

use std::io::Read as _;

use datapath_user::cni::{self, CniError, Env, ErrorCode, NetConf};

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("datapath-cni {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(String::from))
        .unwrap_or_else(|| "1.0.0".into());
    match execute(&stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("datapath-cni: {}: {}", e.msg, e.details);
            std::process::ExitCode::FAILURE
        }
    }
}

fn execute(stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    let env = Env::from_process()?;
    if env.command == "VERSION" {
        return Ok(Some(cni::version()));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command.as_str() {
        "ADD" => cni::add(&conf, &env).map(Some),
        "DEL" => cni::del(&conf, &env).map(|()| None),
        "CHECK" => cni::check(&conf, &env).map(|()| None),
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "unknown CNI_COMMAND",
            other,
        )),
    }
}
