//! `wpfs`: create, run and inspect a wpfs node (see `wpfs --help`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wpfs_mount_helpers::{commands, daemon, mount_helper, options};

#[derive(Parser)]
#[command(
    name = "wpfs",
    version,
    about = "A replicated filesystem for WordPress wp-content"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new cluster with this node as its only voter; prints the join token last.
    Init {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        listen: String,
        /// HTTP address for /health, /metrics and /status (e.g. 127.0.0.1:7401).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Prepare a node that joins an existing cluster when it is first mounted.
    Join {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        peer: String,
        #[arg(long)]
        token: String,
        /// Vote without storing file contents (a third vote for two web nodes).
        #[arg(long)]
        witness: bool,
        /// HTTP address for /health, /metrics and /status (e.g. 127.0.0.1:7401).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Change a node's settings; they apply from its next mount.
    Config {
        #[arg(long, default_value = "/var/lib/wpfs")]
        data: PathBuf,
        /// HOST:PORT for /health, /metrics and /status, or `none`.
        #[arg(long)]
        admin: String,
    },
    /// Run the node and mount its tree (daemonizes unless --foreground).
    Mount {
        dir: PathBuf,
        mountpoint: PathBuf,
        #[arg(short = 'o')]
        options: Vec<String>,
        #[arg(long)]
        foreground: bool,
    },
    /// Members, leader, indexes, store size, mount state and health.
    Status {
        #[arg(long, default_value = "/var/lib/wpfs")]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the join token of this node's cluster again.
    Token {
        #[arg(long, default_value = "/var/lib/wpfs")]
        data: PathBuf,
    },
    /// This node leaves the cluster cleanly.
    Leave {
        #[arg(long)]
        data: PathBuf,
    },
    /// Remove a dead node from the cluster.
    Remove {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        node_id: u64,
    },
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Init {
            data,
            node_id,
            listen,
            admin,
        } => {
            let token = commands::init(&data, node_id, &listen, admin.as_deref())?;
            println!(
                "created node {node_id} of a new cluster in {}",
                data.display()
            );
            println!(
                "mount it with: wpfs mount {} /var/www/html/wp-content",
                data.display()
            );
            println!("join token (for `wpfs join --token`):");
            println!("{token}");
            Ok(())
        }
        Command::Join {
            data,
            node_id,
            listen,
            peer,
            token,
            witness,
            admin,
        } => {
            commands::join(
                &data,
                node_id,
                &listen,
                &peer,
                &token,
                witness,
                admin.as_deref(),
            )?;
            let what = if witness { "witness node" } else { "node" };
            println!(
                "prepared {what} {node_id} in {} to join via {peer}",
                data.display()
            );
            Ok(())
        }
        Command::Mount {
            dir,
            mountpoint,
            options,
            foreground,
        } => daemon::mount(daemon::MountRequest {
            dir,
            mountpoint,
            options: options::parse(&options)?,
            foreground,
        }),
        Command::Config { data, admin } => {
            print!("{}", commands::set_admin(&data, &admin)?);
            Ok(())
        }
        Command::Status { data, json } => {
            let s = commands::status(&data)?;
            if json {
                println!("{s:#}");
            } else {
                print!("{}", commands::status_text(&s));
            }
            Ok(())
        }
        Command::Token { data } => {
            println!("{}", commands::token(&data)?);
            Ok(())
        }
        Command::Leave { data } => {
            print!("{}", commands::leave(&data)?);
            Ok(())
        }
        Command::Remove { data, node_id } => {
            print!("{}", commands::remove(&data, node_id)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    let called_as = args.next().unwrap_or_default();
    // mount(8) runs `mount.wpfs` for fstab type `wpfs`, `mount.fuse.wpfs` for `fuse.wpfs`.
    if let Some("mount.wpfs" | "mount.fuse.wpfs") = called_as.rsplit('/').next() {
        return mount_helper::main(&args.collect::<Vec<_>>());
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wpfs: {e}");
            ExitCode::FAILURE
        }
    }
}
