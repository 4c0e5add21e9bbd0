//! Runs one job as a process in its own process group, so that a timeout or a cancel
//! reaches every process it started. Output is read line by line, as bytes.

use crate::spawn::{JobProcess, Launch, Spawned};
use drover_core::{Isolation, JobSpec, RunId, RunOutcome, Timestamp};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Semaphore, TryAcquireError, watch};

/// Longer lines are cut into entries of this size.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// After the main process ends, how long its output pipes may stay open.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutStream {
    Stdout,
    Stderr,
}

#[derive(Debug)]
pub enum ExecEvent {
    Started {
        run_id: RunId,
    },
    Output {
        run_id: RunId,
        stream: OutStream,
        timestamp: Timestamp,
        data: Vec<u8>,
    },
    Exited {
        run_id: RunId,
        outcome: RunOutcome,
        exit_code: Option<i32>,
        error: Option<String>,
        /// What the run produced, for runs that produce one (inference).
        result: Option<serde_json::Value>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop it and report it CANCELLED.
    Cancel,
    /// Stop it and report it FAILED: the worker lost the control plane for so long that
    /// the attempt may be running elsewhere by now.
    Fence,
}

pub const FENCED: &str = "worker lost contact with the control plane for half its lease; stopped so that it never runs twice";

pub struct Execution {
    pub run_id: RunId,
    pub job_id: String,
    pub attempt: u32,
    pub spec: JobSpec,
    /// Created for the run when the job names no working directory; removed after it.
    pub scratch_dir: PathBuf,
    pub kill_grace: Duration,
    /// The node running it: job containers carry it, to be found after a crash.
    pub node_id: String,
    /// The node's inference API on a Unix socket, when it serves models: handed to the job
    /// (bound into a sandbox, which has no network) as DROVER_INFERENCE_URL.
    pub inference_socket: Option<PathBuf>,
    /// Output read and not yet stored by the control plane, bounded: see [`output_cost`].
    pub output_credit: Arc<Semaphore>,
}

/// Output entries (weighted by [`output_cost`]) a run may have read and not yet had stored
/// by the control plane. When they are all taken the worker stops reading the job's pipes
/// and the job's writes block, as with Docker's default blocking log mode: a job that
/// prints faster than the control plane stores waits, instead of the lines queueing (their
/// delay to a live follower growing with the queue) and the worker's memory growing —
/// during a lost connection too. At two to three million lines a second stored, the queue
/// stays within fifteen milliseconds.
pub const OUTPUT_CREDIT: usize = 1 << 15;

/// What an entry takes of [`OUTPUT_CREDIT`]: one, plus one per KiB, so that long lines are
/// bounded by bytes (32 MiB) as short ones are by count.
pub fn output_cost(data_len: usize) -> u32 {
    1 + (data_len / 1024) as u32
}

/// Where a sandboxed job finds the node's inference socket.
// Under the sandbox's own /tmp (a tmpfs): the rest of its root is read-only.
const SANDBOX_INFERENCE_SOCKET: &str = "/tmp/drover/inference.sock";

/// `http+unix://` with the socket path percent-encoded, as requests-unixsocket and similar
/// clients expect.
fn unix_url(path: &str) -> String {
    format!(
        "http+unix://{}",
        path.replace('%', "%25").replace('/', "%2F")
    )
}

fn signal_group(pgid: i32, signal: Signal) {
    // ESRCH (group already gone) is the expected end; nothing to do about it.
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// Sends SIGTERM to the group, then SIGKILL after the grace period if the main process is
/// still there.
async fn stop_group(child: &mut JobProcess, pgid: i32, grace: Duration) {
    signal_group(pgid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, Signal::SIGKILL);
    }
}

pub async fn execute(
    exec: Execution,
    events: UnboundedSender<ExecEvent>,
    mut control: UnboundedReceiver<Control>,
) {
    let run_id = exec.run_id;
    let exited = |outcome, exit_code, error: Option<String>| ExecEvent::Exited {
        result: None,
        run_id,
        outcome,
        exit_code,
        error,
    };
    // Every run gets a scratch directory (the only writable place in a sandbox); it is the
    // working directory unless the job names one.
    let scratch = exec.scratch_dir.clone();
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        let _ = events.send(exited(
            RunOutcome::Failed,
            None,
            Some(format!(
                "cannot create the scratch directory {}: {e}",
                scratch.display()
            )),
        ));
        return;
    }
    let dir = match &exec.spec.working_dir {
        Some(d) => PathBuf::from(d),
        None => scratch.clone(),
    };
    let Some(mut cmd) = command(&exec, &dir) else {
        let _ = events.send(exited(
            RunOutcome::Failed,
            None,
            Some("the job has neither command nor program".into()),
        ));
        return;
    };
    cmd.envs(&exec.spec.env)
        .env("DROVER_JOB_ID", &exec.job_id)
        .env("DROVER_RUN_ID", run_id.to_string())
        .env("DROVER_ATTEMPT", exec.attempt.to_string())
        .env("DROVER_SCRATCH", &scratch);
    // In its own process group, stdin /dev/null, and killed if the worker dies (see spawn.rs).
    let Spawned {
        process: mut child,
        stdout,
        stderr,
    } = match cmd.spawn() {
        Ok(spawned) => spawned,
        Err(e) => {
            let what = match exec.spec.isolation {
                Isolation::Sandbox => "bwrap",
                Isolation::Container => "docker",
                Isolation::Process => exec.spec.program.as_deref().unwrap_or("/bin/sh"),
            };
            let _ = events.send(exited(
                RunOutcome::Failed,
                Some(127),
                Some(format!("cannot start {what}: {e}")),
            ));
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    };
    let pgid = child.id();
    let _ = events.send(ExecEvent::Started { run_id });
    let (draining, draining_rx) = watch::channel(false);
    let sink = |stream| OutputSink {
        run_id,
        stream,
        events: events.clone(),
        credit: exec.output_credit.clone(),
        draining: draining_rx.clone(),
    };
    let readers = [
        tokio::spawn(read_lines(stdout, sink(OutStream::Stdout))),
        tokio::spawn(read_lines(stderr, sink(OutStream::Stderr))),
    ];

    let timeout = exec
        .spec
        .timeout_ms
        .map(|ms| Duration::from_millis(ms.max(0) as u64));
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut stopped: Option<(RunOutcome, String)> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = &mut deadline, if stopped.is_none() => {
                let t = timeout.unwrap_or_default();
                stopped = Some((RunOutcome::TimedOut, format!("timed out after {}", humanize(t))));
                stop_group(&mut child, pgid, exec.kill_grace).await;
            }
            c = control.recv(), if stopped.is_none() => {
                // A closed control channel means the worker forgot the run: stop it too.
                stopped = Some(match c {
                    Some(Control::Cancel) => (RunOutcome::Cancelled, "cancelled".to_string()),
                    Some(Control::Fence) => (RunOutcome::Failed, FENCED.to_string()),
                    None => (RunOutcome::Cancelled, "forgotten".to_string()),
                });
                stop_group(&mut child, pgid, exec.kill_grace).await;
            }
        }
    };
    // Whatever the main process left behind in its group goes with it.
    signal_group(pgid, Signal::SIGKILL);
    if exec.spec.isolation == Isolation::Container {
        remove_container(run_id).await;
    }
    // What is left in the pipes is read without waiting for credit: the limit below is for
    // the pipes to close, and a control plane out of reach must not cut the job's last lines.
    let _ = draining.send(true);
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN_LIMIT, reader).await.is_err() {
            abort.abort();
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let event = match (status, stopped) {
        (_, Some((outcome, why))) => exited(outcome, None, Some(why)),
        (Ok(s), None) => match (s.code(), s.signal()) {
            (Some(0), _) => exited(RunOutcome::Succeeded, Some(0), None),
            (Some(code), _) => exited(
                RunOutcome::Failed,
                Some(code),
                Some(format!("exited with code {code}")),
            ),
            (None, Some(sig)) => exited(
                RunOutcome::Failed,
                Some(128 + sig),
                Some(format!("killed by signal {sig}")),
            ),
            (None, None) => exited(
                RunOutcome::Failed,
                None,
                Some("ended with no status".into()),
            ),
        },
        (Err(e), None) => exited(
            RunOutcome::Failed,
            None,
            Some(format!("cannot wait for the process: {e}")),
        ),
    };
    let _ = events.send(event);
}

/// The command line for the job's isolation mode; None when the spec names nothing to run.
fn command(exec: &Execution, dir: &std::path::Path) -> Option<Launch> {
    let argv: Vec<&str> = match (&exec.spec.command, &exec.spec.program) {
        (Some(command), _) => vec!["/bin/sh", "-c", command],
        (None, Some(program)) => std::iter::once(program.as_str())
            .chain(exec.spec.args.iter().map(String::as_str))
            .collect(),
        (None, None) => return None,
    };
    let mut cmd = match exec.spec.isolation {
        Isolation::Sandbox => {
            let mut c = Launch::new("bwrap");
            c.args(SANDBOX_ARGS)
                .arg("--bind")
                .arg(&exec.scratch_dir)
                .arg(&exec.scratch_dir);
            if let Some(socket) = &exec.inference_socket {
                c.arg("--bind")
                    .arg(socket)
                    .arg(SANDBOX_INFERENCE_SOCKET)
                    .env("DROVER_INFERENCE_URL", unix_url(SANDBOX_INFERENCE_SOCKET))
                    .env("DROVER_INFERENCE_SOCKET", SANDBOX_INFERENCE_SOCKET);
            }
            c.arg("--chdir")
                .arg(dir)
                .arg("--")
                .args(&argv)
                .current_dir(&exec.scratch_dir);
            c
        }
        Isolation::Container => {
            // `docker run` attaches: the container's output and exit code are its own.
            let mut c = Launch::new("docker");
            c.args(["run", "--rm", "--network", "none", "--name"])
                .arg(container_name(exec.run_id))
                .args(["--label", "drover.managed=true", "--label"])
                .arg(format!("drover.run={}", exec.run_id))
                .arg("--label")
                .arg(format!("drover.node={}", exec.node_id));
            for (k, v) in &exec.spec.env {
                c.arg("--env").arg(format!("{k}={v}"));
            }
            if let Some(wd) = &exec.spec.working_dir {
                c.arg("--workdir").arg(wd);
            }
            c.arg(exec.spec.image.as_deref().unwrap_or_default())
                .args(&argv)
                .current_dir(&exec.scratch_dir);
            c
        }
        Isolation::Process => {
            let mut c = Launch::new(argv[0]);
            c.args(&argv[1..]).current_dir(dir);
            if let Some(socket) = &exec.inference_socket {
                let path = socket.display().to_string();
                c.env("DROVER_INFERENCE_URL", unix_url(&path))
                    .env("DROVER_INFERENCE_SOCKET", path);
            }
            c
        }
    };
    cmd.env("DROVER_ISOLATION", exec.spec.isolation.as_str());
    Some(cmd)
}

/// No network but a loopback of its own, its own pid (and every other) namespace, a
/// read-only view of the host's files, private /dev, /proc and /tmp, and death with the
/// worker. The run's scratch directory is bound writable on top.
const SANDBOX_ARGS: &[&str] = &[
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
    "--tmpfs",
    "/tmp",
];

pub fn container_name(run_id: RunId) -> String {
    format!("drover-run-{run_id}")
}

/// Removes the run's container, running or not: the docker client going away (cancel,
/// timeout) does not stop the container by itself.
async fn remove_container(run_id: RunId) {
    let _ = Command::new("docker")
        .args(["rm", "--force"])
        .arg(container_name(run_id))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Removes every job container labelled with this node, running or not.
pub async fn remove_containers_of_node(node_id: &str) {
    let listed = Command::new("docker")
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("label=drover.node={node_id}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    let Ok(listed) = listed else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return;
    }
    tracing::warn!(
        containers = ids.len(),
        "removing job containers left by an earlier run of this node"
    );
    let _ = Command::new("docker")
        .args(["rm", "--force"])
        .args(&ids)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// True when a Docker engine answers here.
pub fn docker_available() -> bool {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when bubblewrap is installed and can build a sandbox here.
pub fn sandbox_available() -> bool {
    std::process::Command::new("bwrap")
        .args(SANDBOX_ARGS)
        .args(["--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Where one of a run's output streams goes: entries to the agent, within the run's credit.
struct OutputSink {
    run_id: RunId,
    stream: OutStream,
    events: UnboundedSender<ExecEvent>,
    credit: Arc<Semaphore>,
    /// True once the job's main process has ended.
    draining: watch::Receiver<bool>,
}

impl OutputSink {
    /// Hands an entry on once the run has credit for it, or at once after the main process
    /// ended (the agent then gives back credit nobody took: harmless for a run that is over).
    /// False when nobody takes entries any more (the run was forgotten).
    async fn send(&self, data: Vec<u8>) -> bool {
        let cost = output_cost(data.len());
        match self.credit.try_acquire_many(cost) {
            // Given back by the agent when the control plane has stored the entry.
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::Closed) => return false,
            Err(TryAcquireError::NoPermits) => {
                let mut draining = self.draining.clone();
                tokio::select! {
                    permit = self.credit.acquire_many(cost) => match permit {
                        Ok(permit) => permit.forget(),
                        Err(_) => return false,
                    },
                    _ = draining.wait_for(|ended| *ended) => {}
                }
            }
        }
        self.events
            .send(ExecEvent::Output {
                run_id: self.run_id,
                stream: self.stream,
                // When the worker takes the line in (after any wait for credit).
                timestamp: Timestamp::now(),
                data,
            })
            .is_ok()
    }
}

/// Sends each line (without its newline) as an entry; lines longer than
/// [`MAX_ENTRY_BYTES`] become several entries. Bytes are passed on as they are.
async fn read_lines(pipe: impl AsyncRead + Unpin, sink: OutputSink) {
    let mut reader = BufReader::with_capacity(MAX_ENTRY_BYTES, pipe);
    let mut line = Vec::new();
    while let Ok(buf) = reader.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let room = MAX_ENTRY_BYTES - line.len();
        let window = &buf[..buf.len().min(room)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&window[..i]);
                reader.consume(i + 1);
                if !sink.send(std::mem::take(&mut line)).await {
                    return;
                }
            }
            None => {
                let n = window.len();
                line.extend_from_slice(window);
                reader.consume(n);
                if line.len() >= MAX_ENTRY_BYTES && !sink.send(std::mem::take(&mut line)).await {
                    return;
                }
            }
        }
    }
    if !line.is_empty() {
        sink.send(line).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_waits_for_credit_and_resumes_when_it_is_given_back() {
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(2));
        let (_running, draining) = watch::channel(false);
        let sink = OutputSink {
            run_id: RunId::new(),
            stream: OutStream::Stdout,
            events,
            credit: credit.clone(),
            draining,
        };
        let reader = tokio::spawn(read_lines(&b"one\ntwo\nthree\nfour"[..], sink));
        let mut lines = Vec::new();
        while lines.len() < 2 {
            if let Some(ExecEvent::Output { data, .. }) = received.recv().await {
                lines.push(String::from_utf8(data).expect("utf-8"));
            }
        }
        // The reader runs on this thread: after these turns it can only be waiting.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            received.try_recv().is_err(),
            "a third line came without credit"
        );
        assert!(!reader.is_finished());

        credit.add_permits(2);
        reader.await.expect("reader");
        while let Ok(ExecEvent::Output { data, .. }) = received.try_recv() {
            lines.push(String::from_utf8(data).expect("utf-8"));
        }
        assert_eq!(lines, ["one", "two", "three", "four"]);
        assert_eq!(credit.available_permits(), 0);
    }

    #[tokio::test]
    async fn a_closed_credit_stops_the_reader() {
        let (events, _received) = tokio::sync::mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(0));
        credit.close();
        let (_running, draining) = watch::channel(false);
        let sink = OutputSink {
            run_id: RunId::new(),
            stream: OutStream::Stderr,
            events,
            credit,
            draining,
        };
        // An endless stream: only the closed credit can end the reader.
        let endless = tokio::io::repeat(b'\n');
        read_lines(endless, sink).await;
    }

    #[tokio::test]
    async fn once_the_main_process_ended_output_drains_without_credit() {
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let (ended, draining) = watch::channel(false);
        let sink = OutputSink {
            run_id: RunId::new(),
            stream: OutStream::Stdout,
            events,
            credit: Arc::new(Semaphore::new(0)),
            draining,
        };
        let reader = tokio::spawn(read_lines(&b"last\nwords\n"[..], sink));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(received.try_recv().is_err(), "a line came without credit");
        ended.send(true).expect("reader listening");
        reader.await.expect("reader");
        let mut lines = Vec::new();
        while let Ok(ExecEvent::Output { data, .. }) = received.try_recv() {
            lines.push(String::from_utf8(data).expect("utf-8"));
        }
        assert_eq!(lines, ["last", "words"]);
    }

    #[test]
    fn long_lines_cost_by_the_kibibyte() {
        assert_eq!(output_cost(0), 1);
        assert_eq!(output_cost(1023), 1);
        assert_eq!(output_cost(MAX_ENTRY_BYTES), 65);
    }
}
