//! The CNI chain, owned by the daemon: `DIR/05-datapath.conflist` derived from the VPC CNI's
//! conflist in DIR (aws-node renders `10-aws.conflist` on every start), with its `egress-cni`
//! entry replaced by `datapath-cni` and everything else as aws-node wrote it. Container
//! runtimes use the first conflist by name, so ours wins while it exists; removing it hands
//! the node back to egress-cni.
//!
//! The [`Watcher`] keeps the derived file in step: aws-node rewrites its file (temporary file
//! plus rename) whenever it restarts, so the directory is polled (a rename is a new inode and
//! a new content, both seen by reading it again) and the derived file rewritten when it
//! would differ.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use log::{info, warn};
use serde_json::{json, Map, Value};

/// The derived conflist's file name: sorts before aws-node's `10-aws.conflist`.
pub const DERIVED_NAME: &str = "05-datapath.conflist";
/// aws-node's file, preferred when several conflists carry an egress entry.
pub const AWS_NAME: &str = "10-aws.conflist";
/// The plugin types of the VPC CNI's IPv4 egress plugin (`egress-v4-cni` before v1.13).
const EGRESS_TYPES: &[&str] = &["egress-cni", "egress-v4-cni"];
/// Keys of the egress entry the datapath-cni entry carries over.
const CARRIED_KEYS: &[&str] = &[
    "mtu",
    "enabled",
    "randomizeSNAT",
    "nodeIP",
    "ipam",
    "dataDir",
];
/// How often the watcher reads the directory (the contract asks for 2 s at most).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{0}: not JSON: {1}")]
    Json(PathBuf, serde_json::Error),
    #[error("{0}: no \"plugins\" list")]
    NoPlugins(PathBuf),
    #[error("{0}: {1} egress-cni entries (expected one)")]
    EgressEntries(PathBuf, usize),
    #[error("no conflist with an egress-cni entry in {0}")]
    NoSource(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

type Result<T> = std::result::Result<T, ConflistError>;

/// What the derived entry adds to the egress entry's keys.
#[derive(Clone, Debug)]
pub struct DeriveOptions {
    /// The daemon's pin path (the plugin's `pinPath`).
    pub pin_path: PathBuf,
}

/// The derived conflist: `source` with its one egress entry replaced by a `datapath-cni` entry
/// carrying that entry's `mtu`, `enabled`, `randomizeSNAT`, `nodeIP`, `ipam` and `dataDir`.
pub fn derive(source: &Value, origin: &Path, opts: &DeriveOptions) -> Result<Value> {
    let plugins = source
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| ConflistError::NoPlugins(origin.into()))?;
    let egress: Vec<usize> = plugins
        .iter()
        .enumerate()
        .filter(|(_, p)| is_egress(p))
        .map(|(i, _)| i)
        .collect();
    let [index] = egress[..] else {
        return Err(ConflistError::EgressEntries(origin.into(), egress.len()));
    };
    let old = &plugins[index];
    let mut entry = Map::new();
    entry.insert("name".into(), json!("datapath-cni"));
    entry.insert("type".into(), json!("datapath-cni"));
    for key in CARRIED_KEYS {
        if let Some(v) = old.get(*key) {
            entry.insert((*key).into(), v.clone());
        }
    }
    entry.insert("pinPath".into(), json!(opts.pin_path));
    let mut out = source.clone();
    out["plugins"][index] = Value::Object(entry);
    Ok(out)
}

fn is_egress(plugin: &Value) -> bool {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| EGRESS_TYPES.contains(&t))
}

/// The VPC CNI's conflist in `dir`: `10-aws.conflist` if it has an egress entry, else the
/// first (by name) conflist that has one; never our own file.
pub fn find_source(dir: &Path) -> Result<(PathBuf, Value)> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ConflistError::Io(dir.into(), e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // The extensions container runtimes load.
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            name != DERIVED_NAME
                && !name.starts_with('.')
                && ["conflist", "conf", "json"].contains(&ext)
        })
        .collect();
    names.sort_by_key(|p| (p.file_name().is_none_or(|n| n != AWS_NAME), p.clone()));
    for path in names {
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<Value>(&text) else {
            continue;
        };
        let has_egress = value
            .get("plugins")
            .and_then(Value::as_array)
            .is_some_and(|p| p.iter().any(is_egress));
        if has_egress {
            return Ok((path, value));
        }
    }
    Err(ConflistError::NoSource(dir.into()))
}

/// The derived file's bytes for `dir`'s current source.
pub fn render(dir: &Path, opts: &DeriveOptions) -> Result<(PathBuf, Vec<u8>)> {
    let (source, value) = find_source(dir)?;
    let derived = derive(&value, &source, opts)?;
    let mut bytes =
        serde_json::to_vec_pretty(&derived).map_err(|e| ConflistError::Json(source.clone(), e))?;
    bytes.push(b'\n');
    Ok((source, bytes))
}

/// Writes `bytes` to `dir/05-datapath.conflist` through a temporary file and a rename, so a
/// runtime never reads half a file. Returns false when the file already had these bytes.
pub fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<bool> {
    use std::io::Write as _;
    let path = dir.join(DERIVED_NAME);
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    // A dot file with a suffix runtimes do not load.
    let tmp = dir.join(format!(".{DERIVED_NAME}.tmp"));
    let io = |e| ConflistError::Io(path.clone(), e);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(true)
}

/// Installs the `datapath-cni` binary that sits beside this executable into `bin_dir`
/// (temporary file, then rename: a runtime never runs half a binary). Returns its path.
pub fn install_plugin(bin_dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let source = std::env::current_exe()
        .map_err(|e| ConflistError::Io(PathBuf::from("/proc/self/exe"), e))?
        .with_file_name("datapath-cni");
    let target = bin_dir.join("datapath-cni");
    let tmp = bin_dir.join(".datapath-cni.tmp");
    let io = |e| ConflistError::Io(target.clone(), e);
    std::fs::copy(&source, &tmp).map_err(|e| ConflistError::Io(source.clone(), e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)?;
    Ok(target)
}

/// Removes the derived conflist from `dir`; false when there was none.
pub fn remove(dir: &Path) -> Result<bool> {
    let path = dir.join(DERIVED_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ConflistError::Io(path, e)),
    }
}

/// One step of the watcher: derive and write if changed; with no usable source, remove the
/// derived file (the node falls back to egress-cni rather than a stale chain).
pub fn sync(dir: &Path, opts: &DeriveOptions) -> Result<SyncOutcome> {
    match render(dir, opts) {
        Ok((source, bytes)) => Ok(if write_atomically(dir, &bytes)? {
            SyncOutcome::Written(source)
        } else {
            SyncOutcome::Unchanged
        }),
        Err(e @ (ConflistError::Io(..) | ConflistError::Json(..))) => Err(e),
        Err(e) => {
            remove(dir)?;
            Err(e)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    Written(PathBuf),
    Unchanged,
}

/// `dir` is a directory we can read (checked before the daemon touches the kernel).
pub fn check_dir(dir: &Path) -> Result<()> {
    std::fs::read_dir(dir)
        .map(drop)
        .map_err(|e| ConflistError::Io(dir.into(), e))
}

/// One poll: sync, logging what changed and each distinct problem once.
fn step(dir: &Path, opts: &DeriveOptions, last_error: &mut String) {
    match sync(dir, opts) {
        Ok(SyncOutcome::Written(source)) => {
            last_error.clear();
            info!(
                "CNI chain: wrote {} from {}",
                dir.join(DERIVED_NAME).display(),
                source.display()
            );
        }
        Ok(SyncOutcome::Unchanged) => last_error.clear(),
        Err(e) => {
            let text = e.to_string();
            if text != *last_error {
                warn!("CNI chain: {text}; no {DERIVED_NAME} until it is fixed");
                *last_error = text;
            }
        }
    }
}

/// Keeps `dir/05-datapath.conflist` in step with the VPC CNI's conflist until stopped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Writes the derived conflist now if the VPC CNI's is there, then watches `dir` in a
    /// thread. Only a directory that cannot be read is an error: on a new node aws-node
    /// often writes its conflist after the datapath is up.
    pub fn start(dir: &Path, opts: DeriveOptions) -> Result<Self> {
        check_dir(dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let dir = dir.to_path_buf();
        let mut last_error = String::new();
        step(&dir, &opts, &mut last_error);
        let thread = std::thread::Builder::new()
            .name("conflist".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL_INTERVAL);
                    step(&dir, &opts, &mut last_error);
                }
            })
            .map_err(|e| ConflistError::Io(PathBuf::from("conflist thread"), e))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops watching; the derived file stays (`datapath-user detach --cni-conf-dir` removes it).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VPC CNI template rendered as aws-node does (see testdata/README.md for the commit).
    const RENDERED: &str = include_str!("../testdata/10-aws.conflist");

    fn opts() -> DeriveOptions {
        DeriveOptions {
            pin_path: "/sys/fs/bpf/datapath".into(),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dp-conflist-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_egress_entry_is_replaced_and_nothing_else_changes() {
        let source: Value = serde_json::from_str(RENDERED).unwrap();
        let derived = derive(&source, Path::new(AWS_NAME), &opts()).unwrap();
        let entry = &derived["plugins"][1];
        assert_eq!(entry["type"], "datapath-cni");
        assert_eq!(entry["mtu"], "9001");
        assert_eq!(entry["enabled"], "true");
        assert_eq!(entry["randomizeSNAT"], "prng");
        assert_eq!(entry["nodeIP"], "192.0.2.10");
        assert_eq!(entry["ipam"], source["plugins"][1]["ipam"]);
        assert_eq!(entry["ipam"]["dataDir"], "/run/cni/v6pd/egress-v4-ipam");
        assert_eq!(entry["pinPath"], "/sys/fs/bpf/datapath");
        assert!(entry.get("pluginLogFile").is_none());
        // Everything but that entry is as aws-node wrote it.
        let mut rest = derived.clone();
        rest["plugins"][1] = source["plugins"][1].clone();
        assert_eq!(rest, source);
        // The derived entry is a configuration datapath-cni accepts.
        let mut conf = entry.clone();
        conf["cniVersion"] = derived["cniVersion"].clone();
        conf["name"] = derived["name"].clone();
        let parsed = crate::cni::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.mtu(), 9001);
        assert!(parsed.enabled);
    }

    #[test]
    fn extra_plugins_aws_node_chains_are_kept() {
        // ENABLE_BANDWIDTH_PLUGIN / DISABLE_POD_V6 append bandwidth and tuning entries.
        let mut source: Value = serde_json::from_str(RENDERED).unwrap();
        let plugins = source["plugins"].as_array_mut().unwrap();
        plugins.push(json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}));
        plugins.push(json!({"type": "tuning", "sysctl": {"net.ipv6.conf.all.disable_ipv6": "1"}}));
        let derived = derive(&source, Path::new(AWS_NAME), &opts()).unwrap();
        let types: Vec<&str> = derived["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["aws-cni", "datapath-cni", "portmap", "bandwidth", "tuning"]
        );
    }

    #[test]
    fn sources_without_one_egress_entry_are_refused() {
        let mut source: Value = serde_json::from_str(RENDERED).unwrap();
        source["plugins"].as_array_mut().unwrap().remove(1);
        assert!(matches!(
            derive(&source, Path::new("x"), &opts()),
            Err(ConflistError::EgressEntries(_, 0))
        ));
        assert!(matches!(
            derive(&json!({}), Path::new("x"), &opts()),
            Err(ConflistError::NoPlugins(_))
        ));
    }

    #[test]
    fn sync_writes_once_follows_renames_and_removes_without_a_source() {
        let dir = temp_dir("sync");
        assert!(matches!(
            sync(&dir, &opts()),
            Err(ConflistError::NoSource(_))
        ));
        std::fs::write(
            dir.join("99-other.conflist"),
            r#"{"plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        // aws-node's way: a temporary file renamed over the conflist.
        let tmp = dir.join("10-aws.conflist.tmp");
        std::fs::write(&tmp, RENDERED).unwrap();
        std::fs::rename(&tmp, dir.join(AWS_NAME)).unwrap();
        assert_eq!(
            sync(&dir, &opts()).unwrap(),
            SyncOutcome::Written(dir.join(AWS_NAME))
        );
        assert_eq!(sync(&dir, &opts()).unwrap(), SyncOutcome::Unchanged);
        let first: Value =
            serde_json::from_slice(&std::fs::read(dir.join(DERIVED_NAME)).unwrap()).unwrap();
        assert_eq!(first["plugins"][1]["mtu"], "9001");
        std::fs::write(&tmp, RENDERED.replace("9001", "1500")).unwrap();
        std::fs::rename(&tmp, dir.join(AWS_NAME)).unwrap();
        assert!(matches!(
            sync(&dir, &opts()).unwrap(),
            SyncOutcome::Written(_)
        ));
        let second: Value =
            serde_json::from_slice(&std::fs::read(dir.join(DERIVED_NAME)).unwrap()).unwrap();
        assert_eq!(second["plugins"][1]["mtu"], "1500");
        assert_eq!(second["plugins"][0]["mtu"], "1500");
        std::fs::remove_file(dir.join(AWS_NAME)).unwrap();
        assert!(sync(&dir, &opts()).is_err());
        assert!(!dir.join(DERIVED_NAME).exists());
        assert!(!remove(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_watcher_follows_the_source_within_two_seconds() {
        let dir = temp_dir("watch");
        std::fs::write(dir.join(AWS_NAME), RENDERED).unwrap();
        let watcher = Watcher::start(&dir, opts()).unwrap();
        assert!(dir.join(DERIVED_NAME).exists());
        let tmp = dir.join("10-aws.conflist.tmp");
        std::fs::write(&tmp, RENDERED.replace("\"prng\"", "\"none\"")).unwrap();
        std::fs::rename(&tmp, dir.join(AWS_NAME)).unwrap();
        let start = std::time::Instant::now();
        let followed = loop {
            let text = std::fs::read_to_string(dir.join(DERIVED_NAME)).unwrap_or_default();
            if text.contains("\"none\"") {
                break true;
            }
            if start.elapsed() > Duration::from_secs(2) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        watcher.stop();
        assert!(followed, "derived conflist not rewritten within 2 s");
        assert!(dir.join(DERIVED_NAME).exists(), "stop must leave the file");
        assert!(remove(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
