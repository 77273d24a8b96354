//! Server processes the test bed owns: spawn, signal (with every descendant), reap.
//!
//! Servers run in the foreground as direct children, so the PID held is the server
//! itself (not a wrapper or a daemonising shell). Signals go to the server and to each
//! descendant one by one, because PostgreSQL puts every backend in its own process
//! group: stopping only the postmaster would leave open sessions working.
//!
//! Linux only: descendants are found through `/proc/*/stat`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::{Gid, Pid, Uid};

use crate::error::{Result, TestkitError};
use crate::wait::POLL_INTERVAL;

/// The OS user a server runs as when the test bed itself runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
}

/// Name of the file, in a node's folder, that records the server's PID so that a
/// later run can clean up after an aborted one.
pub(crate) const PID_FILE: &str = "server.pid";

/// Whether `pid` names a live (not zombie) process.
pub fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some('Z' | 'X') | None),
        Err(_) => false,
    }
}

/// State letter and parent PID from the text of `/proc/PID/stat`.
fn stat_fields(stat: &str) -> Option<(char, i32)> {
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn stat_state(stat: &str) -> Option<char> {
    stat_fields(stat).map(|(state, _)| state)
}

/// Makes this process adopt orphaned descendants (`PR_SET_CHILD_SUBREAPER`). When a
/// server is SIGKILLed its children are orphaned; adopted, they can be reaped here
/// instead of lingering as zombies under an init that does not reap (as in some
/// containers).
fn adopt_orphans() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::debug!(%err, "could not become a child subreaper");
        }
    });
}

/// Whether `pid` is alive and a child of this process.
fn adopted_and_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    matches!(stat_fields(&stat), Some((state, ppid))
        if !matches!(state, 'Z' | 'X') && u32::try_from(ppid).ok() == Some(std::process::id()))
}

/// Reaps whichever of `pids` are zombies adopted by this process; true once none of
/// them is alive or waiting to be reaped here.
pub(crate) fn reap(pids: &[i32]) -> bool {
    let me = std::process::id();
    pids.iter().all(|&pid| {
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => match stat_fields(&stat) {
                Some(('Z' | 'X', ppid)) => u32::try_from(ppid).ok() != Some(me),
                Some(_) => false,
                None => true,
            },
        }
    })
}

/// Every descendant of `pid` (children, grandchildren, ...), parents first. Zombies
/// are included, so that they can be reaped once their parent is gone; signalling
/// them is harmless.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            if let Some((_, ppid)) = stat_fields(&stat) {
                children.entry(ppid).or_default().push(child);
            }
        }
    }
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(parent) = next.pop() {
        for &child in children.get(&parent).into_iter().flatten() {
            found.push(child);
            next.push(child);
        }
    }
    found
}

fn send(pid: i32, signal: Signal) -> Result<()> {
    match kill(Pid::from_raw(pid), signal) {
        // Gone already: for our purposes the signal has done its job.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(TestkitError::Signal {
            signal: signal.as_str().to_owned(),
            pid,
            source,
        }),
    }
}

/// Sends `signal` to `pid` and then to each of its descendants individually, and
/// returns the descendants signalled.
///
/// For `SIGKILL` the root is stopped first, so that it cannot fork a child between
/// the scan and the kill; every process found is then killed.
pub fn signal_tree(pid: i32, signal: Signal) -> Result<Vec<i32>> {
    match signal {
        Signal::SIGKILL => {
            send(pid, Signal::SIGSTOP)?;
            let tree = descendants(pid);
            send(pid, Signal::SIGKILL)?;
            for &child in &tree {
                send(child, Signal::SIGKILL)?;
            }
            Ok(tree)
        }
        Signal::SIGCONT => {
            // Children first, so nothing wakes to find a still-stopped parent.
            let tree = descendants(pid);
            for &child in tree.iter().rev() {
                send(child, signal)?;
            }
            send(pid, signal)?;
            Ok(tree)
        }
        Signal::SIGSTOP => {
            send(pid, signal)?;
            let tree = descendants(pid);
            for &child in &tree {
                send(child, signal)?;
            }
            // A stop is delivered asynchronously, thread by thread: wait until it
            // has taken, so that nothing the caller sends next is answered.
            wait_stopped(std::iter::once(pid).chain(tree.iter().copied()))?;
            Ok(tree)
        }
        _ => {
            send(pid, signal)?;
            let tree = descendants(pid);
            for &child in &tree {
                send(child, signal)?;
            }
            Ok(tree)
        }
    }
}

/// Waits (up to 5 s) until every thread of every process in `pids` is stopped
/// or gone.
fn wait_stopped(pids: impl Iterator<Item = i32> + Clone) -> Result<()> {
    let running = |pid: i32| {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().any(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| stat_state(&stat))
                .is_some_and(|state| !matches!(state, 'T' | 't' | 'Z' | 'X'))
        })
    };
    let started = Instant::now();
    while let Some(pid) = pids.clone().find(|&pid| running(pid)) {
        if started.elapsed() > Duration::from_secs(5) {
            return Err(TestkitError::Timeout {
                what: format!("process {pid} to stop after SIGSTOP"),
                elapsed: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Looks for an executable called `name` in `dirs`, then on `PATH`.
pub(crate) fn find_binary(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(path_dirs.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file with an execute bit.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `max` bytes of a log file, for error messages.
pub(crate) fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim_end().to_owned()
}

/// Runs a one-shot helper (initdb, pg_basebackup, pg_ctl, cp) to completion.
pub(crate) async fn run_command(
    program: &Path,
    args: &[OsString],
    run_as: Option<RunAs>,
    cwd: &Path,
) -> Result<()> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let shown = describe_command(program, args);
    let output = command
        .output()
        .await
        .map_err(TestkitError::io(format!("running `{shown}`")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    Err(TestkitError::Command {
        command: shown,
        status: output.status.to_string(),
        output: text[start..].trim().to_owned(),
    })
}

fn describe_command(program: &Path, args: &[OsString]) -> String {
    let mut shown = program.display().to_string();
    for arg in args.iter().take(6) {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

/// How to (re)start one server process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// Human label for errors, e.g. `postgres 127.0.0.1:5432`.
    pub(crate) label: String,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    /// Working folder; also where the PID file goes.
    pub(crate) dir: PathBuf,
    /// stdout and stderr are appended here.
    pub(crate) log: PathBuf,
    pub(crate) run_as: Option<RunAs>,
}

/// One long-running server the test bed owns. Dropping it kills the server and
/// every descendant.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    launch: Launch,
    /// Arguments added after the launch's own from the next start on (a
    /// Redis node's `--replicaof`, which an operator may change).
    extra_args: Mutex<Vec<OsString>>,
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    /// Spawns the server described by `launch`.
    pub(crate) fn spawn(launch: Launch) -> Result<Self> {
        Self::spawn_with(launch, Vec::new())
    }

    /// Spawns the server described by `launch` with `extra_args` added (see
    /// [`set_extra_args`](Self::set_extra_args)).
    pub(crate) fn spawn_with(launch: Launch, extra_args: Vec<OsString>) -> Result<Self> {
        let process = Self {
            launch,
            extra_args: Mutex::new(extra_args),
            child: Mutex::new(None),
        };
        process.start()?;
        Ok(process)
    }

    /// Replaces the arguments added to the launch's own from the next start on.
    pub(crate) fn set_extra_args(&self, extra_args: Vec<OsString>) {
        *self.extra_args.lock().unwrap_or_else(|e| e.into_inner()) = extra_args;
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.launch.log
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process again (after it was killed or exited).
    pub(crate) fn start(&self) -> Result<()> {
        adopt_orphans();
        let mut slot = self.lock();
        if let Some(child) = slot.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let launch = &self.launch;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .map_err(TestkitError::io(format!(
                "opening {}",
                launch.log.display()
            )))?;
        let log_err = log
            .try_clone()
            .map_err(TestkitError::io("duplicating a log handle"))?;
        let extra = self
            .extra_args
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .args(&extra)
            .current_dir(&launch.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(user) = launch.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        let child = command.spawn().map_err(TestkitError::io(format!(
            "starting {}",
            describe_command(&launch.program, &launch.args)
        )))?;
        let _ = std::fs::write(launch.dir.join(PID_FILE), child.id().to_string());
        tracing::debug!(server = %launch.label, pid = child.id(), "server process started");
        *slot = Some(child);
        Ok(())
    }

    /// The PID while the process runs (or is stopped); `None` once it exited.
    pub(crate) fn pid(&self) -> Option<i32> {
        let mut slot = self.lock();
        let child = slot.as_mut()?;
        match child.try_wait() {
            Ok(None) => i32::try_from(child.id()).ok(),
            _ => None,
        }
    }

    /// The exit status if the process has exited.
    pub(crate) fn exit_status(&self) -> Option<String> {
        let mut slot = self.lock();
        match slot.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            None => Some("not started".into()),
            Some(Ok(None)) => None,
        }
    }

    fn running_pid(&self, operation: &'static str) -> Result<i32> {
        self.pid().ok_or_else(|| TestkitError::NotRunning {
            operation,
            server: self.launch.label.clone(),
        })
    }

    /// Polls `ready` until it answers `true`; fails early if the process exits.
    pub(crate) async fn wait_ready<F, Fut>(&self, timeout: Duration, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Err(TestkitError::Exited {
                    server: self.launch.label.clone(),
                    status,
                    log_tail: tail(&self.launch.log, 1500),
                });
            }
            if ready().await {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(TestkitError::Timeout {
                    what: format!(
                        "{} to accept connections; log tail:\n{}",
                        self.launch.label,
                        tail(&self.launch.log, 1500)
                    ),
                    elapsed: started.elapsed(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGSTOPs the server and each descendant: it keeps its sockets but answers
    /// nothing.
    pub(crate) fn pause(&self) -> Result<()> {
        let pid = self.running_pid("pause")?;
        signal_tree(pid, Signal::SIGSTOP).map(drop)
    }

    /// SIGCONTs the server and each descendant.
    pub(crate) fn resume(&self) -> Result<()> {
        let pid = self.running_pid("resume")?;
        signal_tree(pid, Signal::SIGCONT).map(drop)
    }

    /// SIGKILLs the server and every descendant and waits until all are gone, so
    /// that new connections are refused when this returns. A no-op when the server
    /// is not running.
    pub(crate) async fn kill(&self) -> Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let tree = signal_tree(pid, Signal::SIGKILL)?;
        let started = Instant::now();
        while self.pid().is_some() || !reap(&tree) {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(TestkitError::Timeout {
                    what: format!("{} to die after SIGKILL", self.launch.label),
                    elapsed: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Blocking stop for `Drop`: wakes a paused server, sends `polite` (if any) and
    /// gives it `grace` to exit, then SIGKILLs whatever is left and reaps the child.
    pub(crate) fn stop_blocking(&self, polite: Option<Signal>, grace: Duration) {
        let Some(pid) = self.pid() else {
            return;
        };
        let mut tree = signal_tree(pid, Signal::SIGCONT).unwrap_or_default();
        if let Some(signal) = polite {
            let _ = send(pid, signal);
            let started = Instant::now();
            while self.pid().is_some() && started.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if let Some(pid) = self.pid() {
            tree.extend(signal_tree(pid, Signal::SIGKILL).unwrap_or_default());
        }
        // Descendants orphaned by the root's exit now have this process as parent
        // (see `adopt_orphans`); any other PID in `tree` may have been recycled.
        for &p in tree.iter().filter(|&&p| adopted_and_alive(p)) {
            let _ = send(p, Signal::SIGKILL);
        }
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let started = Instant::now();
        while !reap(&tree) && started.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop_blocking(None, Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "1234 (a (weird) name) S 42 1234 1234 0 -1";
        assert_eq!(stat_fields(stat), Some(('S', 42)));
    }

    #[tokio::test]
    async fn kills_a_process_tree() {
        let dir = tempfile::tempdir().unwrap();
        let process = ServerProcess::spawn(Launch {
            label: "sh tree".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 60 & sleep 60 & wait".into()],
            dir: dir.path().to_owned(),
            log: dir.path().join("log"),
            run_as: None,
        })
        .unwrap();
        let pid = process.pid().unwrap();
        crate::wait::wait_until(Duration::from_secs(5), || async {
            descendants(pid).len() == 2
        })
        .await
        .unwrap();
        let children = descendants(pid);
        process.pause().unwrap();
        process.resume().unwrap();
        process.kill().await.unwrap();
        assert!(process.pid().is_none());
        assert!(children.iter().all(|&c| !is_alive(c)));
    }
}
