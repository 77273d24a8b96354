//! Scratch folders for server data, and clean-up after aborted runs.
//!
//! Every node gets its own folder under one root: `/dev/shm/switchyard-testkit` when
//! `/dev/shm` is writable (tmpfs makes initdb and WAL much faster), else the system
//! temporary folder. Folder names start with `p<owner pid>-`, and each server writes
//! its PID into the folder. Normally `Drop` removes everything; if a test run was
//! killed before it could, the first start in a later run kills the leftover servers
//! and removes their folders.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::error::{Result, TestkitError};
use crate::process::{is_alive, signal_tree, RunAs, PID_FILE};

const ROOT_NAME: &str = "switchyard-testkit";

fn candidate_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        roots.push(shm.join(ROOT_NAME));
    }
    roots.push(std::env::temp_dir().join(ROOT_NAME));
    roots
}

/// Creates `root` (world-writable and sticky, like /tmp, so that other users and the
/// `postgres` user can share it) and checks that a folder can be made in it.
fn usable(root: &Path) -> bool {
    if !root.is_dir() {
        if std::fs::create_dir_all(root).is_err() {
            return false;
        }
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o1777));
    }
    tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(root)
        .is_ok()
}

/// The root folder for all scratch folders of this process.
fn root() -> Result<&'static Path> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = candidate_roots().into_iter().find(|r| usable(r))?;
        sweep(&root);
        Some(root)
    })
    .as_deref()
    .ok_or_else(|| {
        TestkitError::Environment(
            "neither /dev/shm nor the temporary folder is writable for scratch folders".into(),
        )
    })
}

/// A fresh folder for one node, removed when the returned guard drops. When the
/// server will run as another user, the folder is handed to that user.
pub(crate) fn node_dir(kind: &str, owner: Option<RunAs>) -> Result<TempDir> {
    let root = root()?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("p{}-{kind}-", std::process::id()))
        .tempdir_in(root)
        .map_err(TestkitError::io(format!(
            "creating a scratch folder in {}",
            root.display()
        )))?;
    if let Some(user) = owner {
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).map_err(|e| {
            TestkitError::Io {
                context: format!("handing {} to uid {}", dir.path().display(), user.uid),
                source: e.into(),
            }
        })?;
    }
    Ok(dir)
}

/// Removes folders left by test processes that no longer exist, killing any server
/// still running from them.
fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix('p'))
            .and_then(|n| n.split('-').next())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if is_alive(owner) {
            continue;
        }
        let dir = entry.path();
        kill_leftover(&dir);
        crate::postgres::release_shared_memory(&dir.join("data"));
        if std::fs::remove_dir_all(&dir).is_ok() {
            tracing::info!(folder = %dir.display(), "removed a scratch folder left by an aborted run");
        }
    }
}

fn kill_leftover(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    if !is_alive(pid) || !belongs_to(pid, dir) {
        return;
    }
    tracing::warn!(pid, folder = %dir.display(), "killing a server left by an aborted run");
    let _ = signal_tree(pid, Signal::SIGKILL);
}

/// Whether process `pid` runs from `dir` (working folder or command line), so a
/// recycled PID is never killed by mistake.
fn belongs_to(pid: i32, dir: &Path) -> bool {
    let cwd_inside = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map(|cwd| cwd.starts_with(dir))
        .unwrap_or(false);
    let cmdline_mentions = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| {
            let needle = dir.as_os_str().as_encoded_bytes();
            cmd.windows(needle.len()).any(|w| w == needle)
        })
        .unwrap_or(false);
    cwd_inside || cmdline_mentions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_dirs_are_named_after_the_owner() {
        let dir = node_dir("unit", None).unwrap();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(&format!("p{}-unit-", std::process::id())));
    }

    #[test]
    fn sweep_removes_folders_of_dead_owners() {
        let root = root().unwrap();
        // PIDs are below 2^22 on Linux, so this owner cannot be alive.
        let stale = root.join("p99999999-unit-stale");
        std::fs::create_dir_all(stale.join("data")).unwrap();
        std::fs::write(stale.join(PID_FILE), "99999999").unwrap();
        sweep(root);
        assert!(!stale.exists());
    }
}
