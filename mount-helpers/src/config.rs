//! A node's data directory: `wpfs.json` (who this node is, which cluster
//! it belongs to, its secret) next to `db/` (the RocksDB store). The file
//! is written by `wpfs init`/`join`, changed only by `wpfs config`, and
//! read by every other command.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "wpfs.json";
pub const DB_DIR: &str = "db";
pub const SOCKET_FILE: &str = "wpfs.sock";
pub const LOG_FILE: &str = "wpfs.log";
/// The running daemon's pid, for logrotate's SIGHUP.
pub const PID_FILE: &str = "wpfs.pid";
/// While a first mount joins the cluster (before the admin socket is up):
/// the mounting daemon's pid and its latest progress line, for `wpfs status`.
pub const JOINING_FILE: &str = "joining";
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NodeConfig {
    pub format: u32,
    pub cluster_id: String,
    pub node_id: u64,
    pub listen: String,
    pub admin: Option<String>,
    /// Shared by the cluster's nodes; carried by the join token.
    pub secret: String,
    /// Where a joining node finds the cluster (empty for the first node).
    pub peer: Option<String>,
    /// A voter that stores no file contents (the third vote of a two-web-node site).
    #[serde(default)]
    pub witness: bool,
}

impl NodeConfig {
    pub fn new(node_id: u64, listen: String, admin: Option<String>) -> Self {
        NodeConfig {
            format: FORMAT,
            cluster_id: random_hex(8),
            node_id,
            listen,
            admin,
            secret: random_hex(32),
            peer: None,
            witness: false,
        }
    }

    /// The token a joining node needs: cluster id, secret and an address.
    pub fn join_token(&self) -> String {
        format!("wpfs1.{}.{}.{}", self.cluster_id, self.secret, self.listen)
    }

    pub fn load(dir: &Path) -> Result<NodeConfig, String> {
        if !dir.is_dir() {
            return Err(format!(
                "{} does not exist: create a node there with `wpfs init --data {}` (or `wpfs join`)",
                dir.display(),
                dir.display()
            ));
        }
        let path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{} is not a wpfs data directory (no {CONFIG_FILE}): run `wpfs init --data {}` first",
                    dir.display(),
                    dir.display()
                )
            } else {
                format!("cannot read {}: {e}", path.display())
            }
        })?;
        let config: NodeConfig = serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is damaged ({e}): restore it from a backup",
                path.display()
            )
        })?;
        if config.format != FORMAT {
            return Err(format!(
                "{} has format {}, this wpfs reads format {FORMAT}: use a matching wpfs version",
                path.display(),
                config.format
            ));
        }
        Ok(config)
    }

    /// Writes the config into a new data directory (mode 0600: it holds the secret).
    pub fn create(&self, dir: &Path) -> Result<(), String> {
        self.write_to(&dir.join(CONFIG_FILE))
    }

    /// Replaces the config of an existing data directory: written beside
    /// it, synced, then renamed over it, so a crash leaves the old file or
    /// the new one, never half of either.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(CONFIG_FILE);
        let next = dir.join(format!("{CONFIG_FILE}.new"));
        let _ = fs::remove_file(&next); // left by a crash mid-save
        self.write_to(&next)?;
        fs::rename(&next, &path)
            .and_then(|()| fs::File::open(dir)?.sync_all())
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))
    }

    fn write_to(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join(DB_DIR)
}

/// Makes `dir` ready to hold a new store, refusing one that holds any.
pub fn prepare_new_dir(dir: &Path) -> Result<(), String> {
    if dir.join(CONFIG_FILE).exists() || db_path(dir).exists() {
        return Err(format!(
            "{} already holds a wpfs store: pick an empty directory, or remove it if it is no longer needed",
            dir.display()
        ));
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot set permissions on {}: {e}", dir.display()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
