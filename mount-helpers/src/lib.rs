//! The `wpfs` command and `mount.wpfs`: operator-facing entry points.
//!
//! - `config`: the data directory and its `wpfs.json`;
//! - `options`: mount options (`-o`, fstab);
//! - `daemon`: `wpfs mount`, the running node;
//! - `cluster`: peers, joining, leaving, removing;
//! - `admin`: what the node's status, health and metrics endpoint answers;
//! - `metrics`: the Prometheus text of `/metrics`;
//! - `http`: serving that endpoint (hyper on a tokio thread), and asking it;
//! - `commands`: init, join, token, status;
//! - `mount_helper`: `mount.wpfs`, for mount(8) and /etc/fstab.

pub mod admin;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod http;
pub mod metrics;
pub mod mount_helper;
pub mod options;
