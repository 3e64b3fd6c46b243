//! Mount options as mount(8), /etc/fstab and `wpfs mount -o` give them.
//!
//! Standard options that make no difference to wpfs (`_netdev`, `noauto`,
//! `x-systemd.*`, `defaults`…) are accepted and ignored, as mount(8) users
//! expect; an option nobody knows is an error that names it.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub read_only: bool,
    pub allow_other: bool,
    /// Kernel entry/attribute cache lifetime.
    pub cache_ttl: Duration,
    /// How long a write waits for Raft before failing.
    pub write_timeout: Duration,
    pub threads: usize,
    /// Nodes that hold new contents before close() returns (where reachable).
    pub copies: usize,
    /// Bytes of the store's disk kept free; new contents get ENOSPC below.
    pub min_free: u64,
    /// The daemon's log filter (`log=debug`, `log=wpfs_fs=trace`); None
    /// leaves it to `WPFS_LOG`, then `RUST_LOG`, then `info`.
    pub log: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            allow_other: false,
            cache_ttl: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
            threads: 8,
            copies: 2,
            min_free: wpfs_fs::space::DEFAULT_MIN_FREE,
            log: None,
        }
    }
}

/// Options mount(8) and systemd pass that change nothing here.
const IGNORED: &[&str] = &[
    "defaults",
    "rw",
    "_netdev",
    "auto",
    "noauto",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "async",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "default_permissions",
    "comment",
    "loud",
    "silent",
];

pub fn parse(list: &[String]) -> Result<Options, String> {
    let mut opts = Options::default();
    for item in list
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let number = |what: &str| -> Result<u64, String> {
            value.and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                format!("mount option {key} needs a number of {what} (e.g. {key}=5)")
            })
        };
        match key {
            "ro" => opts.read_only = true,
            "rw" => opts.read_only = false,
            "allow_other" | "allow_root" => opts.allow_other = true,
            "cache_ttl" => opts.cache_ttl = Duration::from_secs(number("seconds")?),
            "write_timeout" => opts.write_timeout = Duration::from_secs(number("seconds")?.max(1)),
            "copies" => opts.copies = number("nodes")?.clamp(1, 20) as usize,
            "threads" => opts.threads = number("threads")?.clamp(1, 64) as usize,
            "min_free" => opts.min_free = number("MiB")?.saturating_mul(1 << 20),
            "log" => match value.map(tracing_subscriber::EnvFilter::try_new) {
                Some(Ok(_)) => opts.log = value.map(str::to_string),
                _ => {
                    return Err(format!(
                        "mount option `{item}`: log needs a level (error, warn, info, debug, trace) \
                         or a RUST_LOG-style filter without commas"
                    ))
                }
            },
            k if IGNORED.contains(&k) || k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => {
                return Err(format!(
                    "unknown mount option `{item}` (wpfs knows ro, rw, allow_other, cache_ttl=S, \
                     write_timeout=S, threads=N, copies=N, min_free=MiB, log=LEVEL and ignores mount(8)'s \
                     generic ones)"
                ))
            }
        }
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Options, String> {
        parse(&[s.to_string()])
    }

    #[test]
    fn fstab_defaults_are_accepted() {
        let o = p("defaults,_netdev,allow_other,x-systemd.requires=network-online.target").unwrap();
        assert!(o.allow_other);
        assert!(!o.read_only);
    }

    #[test]
    fn unknown_option_is_named() {
        let e = p("rw,bogus_opt").unwrap_err();
        assert!(e.contains("bogus_opt"), "{e}");
    }

    #[test]
    fn values_are_parsed_and_checked() {
        assert_eq!(
            p("ro,write_timeout=7").unwrap().write_timeout,
            Duration::from_secs(7)
        );
        assert!(p("ro").unwrap().read_only);
        assert!(p("write_timeout=soon")
            .unwrap_err()
            .contains("write_timeout"));
        assert_eq!(p("log=debug").unwrap().log.as_deref(), Some("debug"));
        assert!(p("log").unwrap_err().contains("log needs a level"));
        assert!(p("log=[[").unwrap_err().contains("log needs a level"));
    }
}
