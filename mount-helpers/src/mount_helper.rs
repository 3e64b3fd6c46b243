//! `mount.wpfs DIR MOUNTPOINT [-o OPTIONS]`: what `mount -t wpfs` and an
//! /etc/fstab line run. mount(8) also passes -s (sloppy), -f (fake),
//! -n (no mtab) and -v (verbose); they are accepted.
//!
//! `mount.wpfs` is a link to the `wpfs` binary (`make build` and `make
//! install` create it: Rust cannot name a binary with a dot), which runs
//! this when called by that name.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{daemon, options};

fn parse(args: &[String]) -> Result<(PathBuf, PathBuf, Vec<String>, bool), String> {
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.push(it.next().ok_or("-o needs a list of options")?.clone()),
            "-t" => {
                it.next();
            }
            "-f" => fake = true,
            "-s" | "-n" | "-v" => {}
            s if s.starts_with("-o") => opts.push(s[2..].to_string()),
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    match <[PathBuf; 2]>::try_from(positional) {
        Ok([dir, mountpoint]) => Ok((dir, mountpoint, opts, fake)),
        Err(_) => Err("usage: mount.wpfs DIR MOUNTPOINT [-o OPTIONS]".into()),
    }
}

/// Runs `mount.wpfs` with `args` (without the program name).
pub fn main(args: &[String]) -> ExitCode {
    let result = parse(args).and_then(|(dir, mountpoint, opts, fake)| {
        let options = options::parse(&opts)?;
        if fake {
            return Ok(());
        }
        daemon::mount(daemon::MountRequest {
            dir,
            mountpoint,
            options,
            foreground: false,
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount.wpfs: {e}");
            // mount(8) reads 32 as "mount failure".
            ExitCode::from(32)
        }
    }
}
