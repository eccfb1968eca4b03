//! Sets `SLUICE_BUILD_VERSION`, the build a node reports to its control plane and prints for
//! `--version`: the crate version, plus the git revision it was built from when known, as
//! semver build metadata (`0.1.0+3f2a9c1d0e4b`). The revision comes from the environment's
//! `SLUICE_BUILD_REVISION` (container builds, whose context has no `.git`), else from `git`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SLUICE_BUILD_REVISION");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let revision = std::env::var("SLUICE_BUILD_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty() && r != "unknown")
        .map(|r| r.chars().take(12).collect::<String>())
        .or_else(git_revision);
    let build = match revision {
        Some(revision) => format!("{version}+{revision}"),
        None => version,
    };
    println!("cargo:rustc-env=SLUICE_BUILD_VERSION={build}");
}

/// `git rev-parse --short=12 HEAD` in the crate's repository, watching what moves HEAD so a
/// new commit sets the version again.
fn git_revision() -> Option<String> {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .args(args)
            .current_dir(&manifest_dir)
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    // Branches live in the common folder (the same one, outside linked worktrees): a commit
    // rewrites its branch's file there, or adds it when the branch was packed.
    let refs = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
        .map_or_else(|| git_dir.clone(), PathBuf::from);
    watch(&git_dir.join("HEAD"));
    watch(&refs.join("packed-refs"));
    watch(&refs.join("refs").join("heads"));
    git(&["rev-parse", "--short=12", "HEAD"]).filter(|r| !r.is_empty())
}

/// Reruns this script when `path` (a file, or anything in a folder) changes. Missing paths are
/// left out: Cargo would rerun the script on every build for them.
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
