//! The `wpfs` subcommands other than `mount` (see `daemon`): creating a
//! node's data directory, printing its token, and showing its status.

use std::path::Path;

use serde_json::{json, Value};
use wpfs_consensus::raft_log::RaftLog;
use wpfs_consensus::{Namespace, Store};

use crate::config::{db_path, prepare_new_dir, NodeConfig, JOINING_FILE, SOCKET_FILE};
use crate::http;

/// `wpfs init`: a new cluster whose only voter is this node.
pub fn init(dir: &Path, node_id: u64, listen: &str, admin: Option<&str>) -> Result<String, String> {
    check_node_id(node_id)?;
    check_addr(listen, "--listen")?;
    if let Some(a) = admin {
        check_addr(a, "--admin")?;
    }
    prepare_new_dir(dir)?;
    let config = NodeConfig::new(node_id, listen.to_string(), admin.map(str::to_string));
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    wpfs_consensus::bootstrap(
        &db_path(dir),
        node_id,
        listen,
        wpfs_fs::core::now_ns(),
        uid,
        gid,
    )?;
    config.create(dir)?;
    Ok(config.join_token())
}

/// `wpfs join`: records which cluster this node will join on first mount.
pub fn join(
    dir: &Path,
    node_id: u64,
    listen: &str,
    peer: &str,
    token: &str,
    witness: bool,
    admin: Option<&str>,
) -> Result<(), String> {
    check_node_id(node_id)?;
    check_addr(listen, "--listen")?;
    check_addr(peer, "--peer")?;
    if let Some(a) = admin {
        check_addr(a, "--admin")?;
    }
    let parts: Vec<&str> = token.splitn(4, '.').collect();
    let ["wpfs1", cluster_id, secret, _addr] = parts[..] else {
        return Err(
            "that is not a wpfs join token: copy the last line `wpfs init` printed \
             (or run `wpfs token --data DIR` on a member)"
                .into(),
        );
    };
    prepare_new_dir(dir)?;
    let mut config = NodeConfig::new(node_id, listen.to_string(), admin.map(str::to_string));
    config.cluster_id = cluster_id.to_string();
    config.secret = secret.to_string();
    config.peer = Some(peer.to_string());
    config.witness = witness;
    config.create(dir)
}

/// `wpfs config --admin`: sets (or, with `none`, clears) the node's HTTP
/// admin address. A running daemon keeps its listener until it is mounted
/// again; the answer says so.
pub fn set_admin(dir: &Path, admin: &str) -> Result<String, String> {
    let mut config = NodeConfig::load(dir)?;
    let admin = match admin {
        "none" => None,
        addr => {
            check_addr(addr, "--admin")?;
            Some(addr.to_string())
        }
    };
    config.admin = admin.clone();
    config.save(dir)?;
    let what = match &admin {
        Some(a) => format!(
            "node {} serves /health, /metrics and /status on http://{a}",
            config.node_id
        ),
        None => format!("node {} serves no HTTP admin address", config.node_id),
    };
    Ok(match http::query(&dir.join(SOCKET_FILE), "/status") {
        Some(_) => format!(
            "{what} from its next mount (it is running now: unmount and mount it again to apply)\n"
        ),
        None => format!("{what} once mounted\n"),
    })
}

pub fn token(dir: &Path) -> Result<String, String> {
    Ok(NodeConfig::load(dir)?.join_token())
}

/// `wpfs status`: from the running daemon, or from the store when stopped
/// (or still joining: the daemon's admin endpoint comes up after that).
pub fn status(dir: &Path) -> Result<Value, String> {
    let config = NodeConfig::load(dir)?;
    if let Some(body) = http::query(&dir.join(SOCKET_FILE), "/status") {
        return serde_json::from_str(&body)
            .map_err(|e| format!("the daemon answered garbage: {e}"));
    }
    let joining = joining(dir);
    let db = db_path(dir);
    // Prepared by `wpfs join`: its first mount makes the store.
    let prepared = config.peer.is_some() && !db.join("CURRENT").exists();
    let mut status = json!({
        "node_id": config.node_id,
        "cluster_id": config.cluster_id,
        "listen": config.listen,
        "running": joining.is_some(),
        "role": if joining.is_some() { "joining" } else { "stopped" },
        "mounted": false,
        "mountpoint": null,
        "health": match (&joining, prepared) {
            (Some(line), _) => format!("joining the cluster: {line} (its first `wpfs mount` shows the same)"),
            (None, true) => "not a member yet: its first `wpfs mount DIR MOUNTPOINT` joins the cluster".into(),
            (None, false) => "not running: start it with `wpfs mount DIR MOUNTPOINT`".into(),
        },
    });
    if prepared {
        return Ok(status);
    }
    let from_store = match stored_status(&db) {
        Ok(fields) => fields,
        // The joining daemon is making its store: nothing to read yet.
        Err(_) if joining.is_some() => return Ok(status),
        Err(e) => return Err(e),
    };
    if let (Some(all), Value::Object(more)) = (status.as_object_mut(), from_store) {
        all.extend(more);
    }
    Ok(status)
}

/// What a stopped node's store says of it, for `wpfs status`.
fn stored_status(db: &Path) -> Result<Value, String> {
    let store = Store::open_read_only(db).map_err(|e| e.to_string())?;
    let namespace = Namespace::new(store.clone());
    let (applied, _) = namespace.applied().map_err(|e| e.to_string())?;
    let log = RaftLog::open(store.clone()).map_err(|e| e.to_string())?;
    Ok(json!({
        "leader": 0,
        "term": log.hard_state().term,
        "commit_index": log.hard_state().commit,
        "applied_index": applied,
        "first_log_index": log.first_index_now(),
        "last_log_index": log.last_index_now(),
        "voters": log.conf_state().voters,
        "learners": log.conf_state().learners,
        "members": namespace.members().unwrap_or_default().iter().map(|m| json!({
            "id": m.node_id,
            "address": m.addr,
            "witness": m.witness,
            "role": if log.conf_state().voters.contains(&m.node_id) { "voter" } else { "learner" },
            "reachable": null,
            "match_index": null,
        })).collect::<Vec<_>>(),
        "store_bytes": store.size_bytes(),
        "inodes": namespace.inode_count().unwrap_or(0),
    }))
}

/// The progress of a first mount joining the cluster, while its daemon
/// runs (`JOINING_FILE`); None when no join is under way.
fn joining(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(JOINING_FILE)).ok()?;
    let (pid, line) = text.split_once('\n')?;
    // A join killed midway leaves the file behind.
    Path::new(&format!("/proc/{pid}"))
        .exists()
        .then(|| line.to_string())
}

/// `wpfs leave`: the running node leaves its cluster and unmounts.
pub fn leave(dir: &Path) -> Result<String, String> {
    change(dir, "/leave")
}

/// `wpfs remove`: the running node asks the leader to remove node `id`.
pub fn remove(dir: &Path, id: u64) -> Result<String, String> {
    check_node_id(id)?;
    change(dir, &format!("/remove/{id}"))
}

fn change(dir: &Path, path: &str) -> Result<String, String> {
    let config = NodeConfig::load(dir)?;
    match http::request(&dir.join(SOCKET_FILE), "POST", path) {
        Some((200, body)) => Ok(body),
        Some((_, why)) => Err(why.trim().to_string()),
        None => Err(format!(
            "node {} is not running: mount it first (`wpfs mount {} MOUNTPOINT`), \
             or run this on another member's data directory",
            config.node_id,
            dir.display()
        )),
    }
}

/// The status as the human-readable lines `wpfs status` prints.
pub fn status_text(s: &Value) -> String {
    let field = |k: &str| match &s[k] {
        Value::String(v) => v.clone(),
        Value::Null => "-".into(),
        Value::Number(n) if k == "store_bytes" => {
            format!("{:.1} MiB", n.as_f64().unwrap_or(0.0) / (1 << 20) as f64)
        }
        v => v.to_string(),
    };
    [
        ("node", "node_id"),
        ("cluster", "cluster_id"),
        ("role", "role"),
        ("leader", "leader"),
        ("term", "term"),
        ("applied index", "applied_index"),
        ("commit index", "commit_index"),
        ("voters", "voters"),
        ("learners", "learners"),
        ("store size", "store_bytes"),
        ("inodes", "inodes"),
        ("mounted", "mounted"),
        ("mountpoint", "mountpoint"),
        ("health", "health"),
    ]
    .iter()
    .map(|(label, key)| format!("{label:<14} {}\n", field(key)))
    .chain(
        s["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(member_line),
    )
    .collect()
}

fn member_line(m: &Value) -> String {
    let text = |k: &str| match &m[k] {
        Value::String(v) => v.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    format!(
        "member {:<7} {:<22} {:<8} reachable={:<5} match={:<8} version={}\n",
        text("id"),
        text("address"),
        text("role"),
        text("reachable"),
        text("match_index"),
        text("version")
    )
}

fn check_node_id(id: u64) -> Result<(), String> {
    if id == 0 {
        return Err("--node-id must be a positive number, unique in the cluster".into());
    }
    Ok(())
}

fn check_addr(addr: &str, flag: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{flag} {addr}: expected HOST:PORT, e.g. 10.0.0.5:7400"
        )),
    }
}
