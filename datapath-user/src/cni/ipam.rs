//! The delegated IPAM plugin (host-local on EKS), run as the CNI spec says: same command,
//! same container and interface, the `ipam` section on stdin.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{json, Value};

use super::conf::{CniError, Env, ErrorCode, NetConf, Result};

/// The IPAM binary named by `ipam.type`, searched in CNI_PATH; `None` when it is missing.
pub fn binary(conf: &NetConf, env: &Env) -> Result<Option<PathBuf>> {
    let ipam = conf.ipam();
    let plugin = ipam["type"]
        .as_str()
        .filter(|t| !t.is_empty() && !t.contains('/'))
        .ok_or_else(|| CniError::config("ipam.type is missing"))?
        .to_string();
    Ok(env
        .cni_path
        .split(':')
        .map(|dir| Path::new(dir).join(&plugin))
        .find(|p| p.is_file()))
}

/// Runs the IPAM plugin with `command`; returns its parsed output (`Null` for DEL).
pub fn exec(conf: &NetConf, env: &Env, command: &str) -> Result<Value> {
    let binary = binary(conf, env)?.ok_or_else(|| {
        CniError::new(
            ErrorCode::Io,
            "IPAM plugin not found",
            format!(
                "{} in CNI_PATH {}",
                conf.ipam()["type"].as_str().unwrap_or(""),
                env.cni_path
            ),
        )
    })?;
    let stdin = json!({ "cniVersion": conf.cni_version, "name": conf.name, "ipam": conf.ipam() });
    let mut child = Command::new(&binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", env.netns.as_deref().unwrap_or(""))
        .env(
            "CNI_IFNAME",
            env.ifname.as_deref().unwrap_or(conf.pod_ifname()),
        )
        .env("CNI_PATH", &env.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::io(format!("running {}: {e}", binary.display())))?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::io(format!("waiting for {}: {e}", binary.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let msg = serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| v["msg"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        return Err(CniError::new(
            ErrorCode::Io,
            format!("IPAM {command} failed"),
            msg,
        ));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .map_err(|e| CniError::new(ErrorCode::Decode, "IPAM output is not JSON", e.to_string()))
}

/// The pod's IPv4 and prefix from an IPAM result.
pub fn address(result: &Value) -> Result<(Ipv4Addr, u8)> {
    let address = result["ips"]
        .as_array()
        .and_then(|ips| ips.iter().find_map(|ip| ip["address"].as_str()))
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Io,
                "IPAM returned no address",
                result.to_string(),
            )
        })?;
    let (ip, len) = address.split_once('/').ok_or_else(|| {
        CniError::new(
            ErrorCode::Io,
            "IPAM returned a bad address",
            address.to_string(),
        )
    })?;
    match (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) {
        (Ok(ip), Ok(len)) if len <= 32 => Ok((ip, len)),
        _ => Err(CniError::new(
            ErrorCode::Io,
            "IPAM returned a bad address",
            address.to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_results_are_read() {
        let r = json!({"ips": [{"address": "169.254.172.9/22", "gateway": "169.254.172.1"}]});
        assert_eq!(address(&r).unwrap(), (Ipv4Addr::new(169, 254, 172, 9), 22));
        assert!(address(&json!({"ips": []})).is_err());
        assert!(address(&json!({"ips": [{"address": "2001:db8::1/64"}]})).is_err());
    }
}
