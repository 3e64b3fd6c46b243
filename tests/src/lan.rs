//! A private network whose hosts can be cut off: the partition half of
//! the fault suite.
//!
//! Every node of a cluster on a `Lan` runs in its own network namespace
//! (its own "host", with its own address), plugged by a veth pair into one
//! bridge. Cutting a host takes its side of the veth down: packets to and
//! from it vanish, as on a real network whose switch port died, while the
//! process keeps running and its FUSE mount stays usable (only the network
//! namespace differs; `nsenter --net` leaves the mount namespace alone,
//! which `ip netns exec` would not).
//!
//! Everything is made with iproute2 under names that carry this process's
//! id and the network's number within the process (tests run in threads,
//! so one process holds several networks at once), and removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Lan {
    /// Prefix of every name this network made: `wl<pid>n<k>`, short
    /// enough that `<prefix>p<id>` fits Linux's 15 bytes of a link name.
    prefix: String,
    /// 10.<a>.<b>.0/24: each host sits in a namespace of its own, so the
    /// subnet only has to look different in `ip` listings.
    subnet: String,
    hosts: std::sync::Mutex<Vec<u64>>,
}

/// How many networks this process has made.
static LANS_MADE: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// The bridge; None, with the reason printed, where network
    /// namespaces cannot be made (not root, no iproute2).
    pub fn new() -> Option<Lan> {
        let pid = std::process::id();
        let k = LANS_MADE.fetch_add(1, Ordering::Relaxed);
        let lan = Lan {
            prefix: format!("wl{pid}n{k}"),
            subnet: format!("10.{}.{}", 100 + (pid >> 8) % 100, (pid + k) & 0xff),
            hosts: Default::default(),
        };
        let bridge = lan.bridge();
        match ip(&["link", "add", &bridge, "type", "bridge"])
            .and_then(|_| ip(&["link", "set", &bridge, "up"]))
        {
            Ok(()) => Some(lan),
            Err(e) => {
                eprintln!(
                    "SKIPPED: cannot make a network for partitions ({e}); needs root and iproute2"
                );
                None
            }
        }
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The namespace of host `id`, as `nsenter --net=` takes it.
    pub fn netns_path(&self, id: u64) -> String {
        format!("/run/netns/{}", self.netns(id))
    }

    fn netns(&self, id: u64) -> String {
        format!("{}h{id}", self.prefix)
    }

    /// The host end of host `id`'s cable, in the bridge.
    fn port(&self, id: u64) -> String {
        format!("{}p{id}", self.prefix)
    }

    /// Host `id`'s address.
    pub fn address(&self, id: u64) -> String {
        format!("{}.{id}", self.subnet)
    }

    /// Makes host `id`: a namespace with loopback and `eth0` plugged into
    /// the bridge at `address(id)/24`.
    pub fn add_host(&self, id: u64) {
        let (ns, port) = (self.netns(id), self.port(id));
        let addr = format!("{}/24", self.address(id));
        let steps: [&[&str]; 7] = [
            &["netns", "add", &ns],
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
            &["link", "set", &port, "master", &self.bridge()],
            &["link", "set", &port, "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
            &["-n", &ns, "addr", "add", &addr, "dev", "eth0"],
            &["-n", &ns, "link", "set", "eth0", "up"],
        ];
        self.hosts.lock().unwrap().push(id);
        for step in steps {
            ip(step).unwrap_or_else(|e| panic!("making host {id} of the test network: {e}"));
        }
    }

    /// Unplugs host `id`: nothing goes in or out until `heal`.
    pub fn cut(&self, id: u64) {
        ip(&["-n", &self.netns(id), "link", "set", "eth0", "down"])
            .unwrap_or_else(|e| panic!("cutting host {id} off: {e}"));
    }

    /// Slows everything sent to host `id` down to `mbit` megabits a
    /// second (a token bucket on its cable), as the link of a node far
    /// away would; `slow` again changes the rate.
    pub fn slow(&self, id: u64, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let args = [
            "qdisc",
            "replace",
            "dev",
            &self.port(id),
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            "64kb",
            "latency",
            "2s",
        ];
        run("tc", &args).unwrap_or_else(|e| panic!("slowing host {id}'s link: {e}"));
    }

    /// Plugs host `id` back in.
    pub fn heal(&self, id: u64) {
        ip(&["-n", &self.netns(id), "link", "set", "eth0", "up"])
            .unwrap_or_else(|e| panic!("healing host {id}: {e}"));
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // A namespace outlives `netns del` while a process is still in it,
        // and its cable with it: delete the cable first (its peer goes too).
        for id in self.hosts.lock().unwrap().iter() {
            let _ = ip(&["link", "del", &self.port(*id)]);
            let _ = ip(&["netns", "del", &self.netns(*id)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

/// Runs one of iproute2's `program`s.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
