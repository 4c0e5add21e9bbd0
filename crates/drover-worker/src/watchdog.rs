//! A process beside the worker that stops the worker's jobs when the worker itself cannot:
//! frozen (SIGSTOP, a debugger, a host under memory pressure) or gone. A frozen worker
//! cannot fence: its jobs would run on past their lease while the control plane runs the
//! attempts again elsewhere (invariant 7). So the worker starts `drover worker-watchdog`
//! with a pipe on its stdin and writes to it: `beat` every [`BEAT`] from a thread of its
//! own, `watch PGID` / `forget PGID` as jobs start and end, `timeout MS` when it learns its
//! lease. When no beat has come for the timeout (half a lease, as for fencing), the
//! watchdog kills every process group it watches; when the pipe closes (the worker died),
//! it kills them and exits.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the worker beats.
pub const BEAT: Duration = Duration::from_millis(100);

struct Watchdog {
    pipe: Mutex<ChildStdin>,
    _child: Child,
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();

/// Starts the watchdog (`program worker-watchdog`), once per process, and the thread that
/// beats for it.
pub fn start(program: &Path, timeout: Duration) -> std::io::Result<()> {
    if WATCHDOG.get().is_some() {
        return Ok(());
    }
    let mut child = Command::new(program)
        .args(["worker-watchdog", "--timeout-ms"])
        .arg(timeout.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // Nothing of the worker's: its environment carries the labels by which a local
        // provider finds its workers, and the watchdog is none.
        .env_clear()
        .env("DROVER_LOG", "warn")
        .spawn()?;
    let pipe = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the watchdog has no stdin"))?;
    let _ = WATCHDOG.set(Watchdog {
        pipe: Mutex::new(pipe),
        _child: child,
    });
    std::thread::Builder::new()
        .name("drover-watchdog-beat".into())
        .spawn(|| {
            loop {
                tell("beat");
                std::thread::sleep(BEAT);
            }
        })?;
    Ok(())
}

/// Writes one line to the watchdog, if there is one; a watchdog gone is logged once by
/// nothing (its absence only takes away a safety net).
fn tell(line: &str) {
    if let Some(w) = WATCHDOG.get() {
        let mut pipe = w.pipe.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(pipe, "{line}");
    }
}

/// From now on, kill this process group if the worker freezes or dies.
pub fn watch(pgid: i32) {
    tell(&format!("watch {pgid}"));
}

/// The group ended: not this worker's any more.
pub fn forget(pgid: i32) {
    tell(&format!("forget {pgid}"));
}

/// Half the lease the control plane gave this worker.
pub fn set_timeout(timeout: Duration) {
    tell(&format!("timeout {}", timeout.as_millis()));
}

#[derive(Debug)]
struct Watched {
    last_beat: Instant,
    timeout: Duration,
    groups: HashSet<i32>,
    worker_gone: bool,
}

fn kill_all(groups: &mut HashSet<i32>, why: &str) {
    if groups.is_empty() {
        return;
    }
    tracing::warn!(
        groups = groups.len(),
        "{why}: killing the worker's job process groups"
    );
    for pgid in groups.drain() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The watchdog process: reads the worker's lines from stdin until it closes.
pub fn run(timeout: Duration) {
    let watched = Arc::new(Mutex::new(Watched {
        last_beat: Instant::now(),
        timeout,
        groups: HashSet::new(),
        worker_gone: false,
    }));
    let reading = watched.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let mut w = reading.lock().unwrap_or_else(|p| p.into_inner());
            let mut words = line.split_whitespace();
            match (
                words.next(),
                words.next().and_then(|n| n.parse::<i64>().ok()),
            ) {
                (Some("beat"), _) => w.last_beat = Instant::now(),
                (Some("watch"), Some(pgid)) if pgid > 1 => {
                    w.groups.insert(pgid as i32);
                }
                (Some("forget"), Some(pgid)) => {
                    w.groups.remove(&(pgid as i32));
                }
                (Some("timeout"), Some(ms)) if ms > 0 => {
                    w.timeout = Duration::from_millis(ms as u64)
                }
                _ => {}
            }
        }
        reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .worker_gone = true;
    });
    loop {
        std::thread::sleep(BEAT / 2);
        let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
        if w.worker_gone {
            kill_all(&mut w.groups, "the worker is gone");
            return;
        }
        if w.last_beat.elapsed() > w.timeout {
            let why = format!(
                "no beat from the worker for {} ms (frozen?)",
                w.last_beat.elapsed().as_millis()
            );
            kill_all(&mut w.groups, &why);
        }
    }
}
