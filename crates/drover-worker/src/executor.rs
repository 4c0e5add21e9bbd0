//! Runs one job as a process in its own process group, so that a timeout or a cancel
//! reaches every process it started. Output is read line by line, as bytes.

use crate::spawn::{JobProcess, Launch, Spawned};
use drover_core::{Isolation, JobSpec, RunId, RunOutcome, Timestamp};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
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
    /// Paths a sandbox must not show even where it shows the host's system directories
    /// (the node's state, drover's data directory).
    pub hidden_paths: Vec<PathBuf>,
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
    // 0700: the run's own (a root worker's sit in /run, which other users can walk).
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&scratch);
    if let Err(e) = made {
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
    let cmd = match command(&exec, &dir) {
        Ok(cmd) => cmd,
        Err(why) => {
            let _ = events.send(exited(RunOutcome::Failed, None, Some(why)));
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    };
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
    crate::watchdog::watch(pgid);
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
    crate::watchdog::forget(pgid);
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

/// The command line for the job's isolation mode, with the job's environment: never the
/// worker's own (which may hold a database URL, an admin password or an API key).
fn command(exec: &Execution, dir: &Path) -> Result<Launch, String> {
    let argv: Vec<&str> = match (&exec.spec.command, &exec.spec.program) {
        (Some(command), _) => vec!["/bin/sh", "-c", command],
        (None, Some(program)) => std::iter::once(program.as_str())
            .chain(exec.spec.args.iter().map(String::as_str))
            .collect(),
        (None, None) => return Err("the job has neither command nor program".into()),
    };
    Ok(match exec.spec.isolation {
        Isolation::Sandbox => sandbox_command(exec, dir, &argv)?,
        Isolation::Container => container_command(exec, &argv),
        Isolation::Process => {
            let mut c = Launch::new(argv[0]);
            c.args(&argv[1..]).current_dir(dir).env_clear();
            let socket = exec
                .inference_socket
                .as_ref()
                .map(|s| s.display().to_string());
            c.envs(job_environment(exec, &exec.scratch_dir, socket.as_deref()));
            c
        }
    })
}

/// What every job finds in its environment: a PATH, its HOME (the scratch directory), the
/// spec's variables, then drover's (which the spec cannot override).
pub fn job_environment(
    exec: &Execution,
    scratch: &Path,
    inference_socket: Option<&str>,
) -> Vec<(String, String)> {
    let scratch = scratch.display().to_string();
    let mut env = vec![
        ("PATH".to_string(), JOB_PATH.to_string()),
        ("HOME".to_string(), scratch.clone()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ];
    env.extend(exec.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend([
        ("DROVER_JOB_ID".to_string(), exec.job_id.clone()),
        ("DROVER_RUN_ID".to_string(), exec.run_id.to_string()),
        ("DROVER_ATTEMPT".to_string(), exec.attempt.to_string()),
        ("DROVER_SCRATCH".to_string(), scratch),
        (
            "DROVER_ISOLATION".to_string(),
            exec.spec.isolation.as_str().to_string(),
        ),
    ]);
    if let Some(socket) = inference_socket {
        env.push(("DROVER_INFERENCE_URL".to_string(), unix_url(socket)));
        env.push(("DROVER_INFERENCE_SOCKET".to_string(), socket.to_string()));
    }
    env
}

const JOB_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The user sandboxed jobs run as when the worker runs as root: `nobody`. bubblewrap is then
/// started as that user, so the job's user namespace maps to it and not to root (whose
/// files a job mapped to root could read: the kernel checks file access against the
/// outside uid). Under any other worker user, bubblewrap runs as that user and the job as
/// uid 65534 inside, mapped to it.
pub const SANDBOX_UID: u32 = 65534;

/// Where a node's runs get their scratch directories and its inference socket lives: under
/// the node's state directory, unless the worker runs as root. Sandboxed jobs then run as
/// [`SANDBOX_UID`], and bubblewrap, started as that user, must walk to what it binds, which
/// it cannot through a private state directory (or through /root). So a root worker keeps
/// them in `/run/drover/node-<hash of the state directory>`: /run is writable by root only,
/// and these directories are mode 0711 (walked through, not listed). Scratch directories
/// left by an earlier life of the node (killed with -9) are removed.
pub fn jobs_dir(state_dir: &Path) -> std::io::Result<PathBuf> {
    use sha2::Digest;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let (dir, mode) = if running_as_root() && Path::new("/run").is_dir() {
        let digest = hex::encode(sha2::Sha256::digest(state_dir.as_os_str().as_bytes()));
        let dir = Path::new("/run/drover").join(format!("node-{}", &digest[..16]));
        (dir, 0o711)
    } else {
        (state_dir.join("runs"), 0o700)
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(&dir)?;
    for made in [Some(dir.as_path()), dir.parent().filter(|_| mode == 0o711)]
        .into_iter()
        .flatten()
    {
        std::fs::set_permissions(made, std::fs::Permissions::from_mode(mode))?;
    }
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(dir)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// bubblewrap: every namespace of its own (no network but loopback, own pids), an
/// unprivileged user with no capabilities that cannot make user namespaces, and a root of
/// the host's system directories only (/usr, /etc and the library and binary links), read-
/// only: no home directories, /run, /var, drover's data or the node's state. A private
/// /dev, /proc and /tmp; the run's scratch directory bound writable at its own path.
fn sandbox_command(exec: &Execution, dir: &Path, argv: &[&str]) -> Result<Launch, String> {
    let mut c = Launch::new("bwrap");
    c.env_clear()
        .env("PATH", JOB_PATH)
        .args(sandbox_root_args());
    for hidden in &exec.hidden_paths {
        if SANDBOX_SYSTEM_DIRS.iter().any(|d| hidden.starts_with(d)) {
            c.arg("--tmpfs").arg(hidden);
        }
    }
    let root = running_as_root();
    if root {
        c.user(SANDBOX_UID, SANDBOX_UID);
        std::os::unix::fs::chown(&exec.scratch_dir, Some(SANDBOX_UID), Some(SANDBOX_UID))
            .map_err(|e| format!("cannot hand the scratch directory to the sandbox user: {e}"))?;
    }
    // Bound through descriptors the worker opened: the sandbox user need not be able to
    // walk to them (the state directory is the worker's own, mode 0700).
    let scratch = open_path(&exec.scratch_dir)
        .map_err(|e| format!("cannot open the scratch directory: {e}"))?;
    let fd = c.pass_fd(scratch);
    c.arg("--bind-fd")
        .arg(fd.to_string())
        .arg(&exec.scratch_dir);
    let mut socket_inside = None;
    if let Some(socket) = &exec.inference_socket
        && let Ok(socket) = open_path(socket)
    {
        let fd = c.pass_fd(socket);
        c.arg("--bind-fd")
            .arg(fd.to_string())
            .arg(SANDBOX_INFERENCE_SOCKET);
        socket_inside = Some(SANDBOX_INFERENCE_SOCKET);
    }
    c.arg("--chdir").arg(dir).arg("--clearenv");
    for (k, v) in job_environment(exec, &exec.scratch_dir, socket_inside) {
        c.arg("--setenv").arg(k).arg(v);
    }
    c.arg("--").args(argv);
    Ok(c)
}

/// The host directories a sandbox sees, read-only.
const SANDBOX_SYSTEM_DIRS: &[&str] = &["/usr", "/etc"];
/// Links into /usr on merged-/usr systems, directories elsewhere.
const SANDBOX_SYSTEM_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Namespaces, user, capabilities, and the read-only system root; the same for the
/// availability probe as for jobs.
fn sandbox_root_args() -> Vec<String> {
    let mut args: Vec<String> = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
    ]
    .map(String::from)
    .to_vec();
    for dir in SANDBOX_SYSTEM_DIRS {
        if Path::new(dir).is_dir() {
            args.extend(["--ro-bind".into(), dir.to_string(), dir.to_string()]);
        }
    }
    for link in SANDBOX_SYSTEM_LINKS {
        match std::fs::read_link(link) {
            Ok(target) => args.extend([
                "--symlink".into(),
                target.display().to_string(),
                link.to_string(),
            ]),
            Err(_) if Path::new(link).is_dir() => {
                args.extend(["--ro-bind".into(), link.to_string(), link.to_string()])
            }
            Err(_) => {}
        }
    }
    args.extend(["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"].map(String::from));
    args
}

/// A descriptor naming a file or directory without opening it for reading (works for a
/// socket), closed on exec unless passed.
fn open_path(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; the answer is a new descriptor or -1.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `docker run`, attached (the container's output and exit code are the job's): no network,
/// no capabilities, no privilege gain, an unprivileged user, a read-only root with a
/// private /tmp as scratch. The image is validated as a reference (drover-core) and comes
/// after `--`, so that nothing the job names is read as an option of `docker run`.
fn container_command(exec: &Execution, argv: &[&str]) -> Launch {
    let mut c = Launch::new("docker");
    c.env_clear().env("PATH", JOB_PATH);
    // The docker client's own settings (which engine, its config), not the job's.
    for (k, v) in std::env::vars_os() {
        if k == "HOME" || k.to_string_lossy().starts_with("DOCKER_") {
            c.env(k, v);
        }
    }
    c.args(["run", "--rm", "--network", "none", "--name"])
        .arg(container_name(exec.run_id))
        .args(["--label", "drover.managed=true", "--label"])
        .arg(format!("drover.run={}", exec.run_id))
        .arg("--label")
        .arg(format!("drover.node={}", exec.node_id))
        .args([
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--user",
            "65534:65534",
            "--read-only",
            "--tmpfs",
            "/tmp:exec",
            "--pids-limit",
            "4096",
        ]);
    for (k, v) in job_environment(exec, Path::new(CONTAINER_SCRATCH), None) {
        if k != "PATH" {
            c.arg("--env").arg(format!("{k}={v}"));
        }
    }
    c.arg("--workdir").arg(
        exec.spec
            .working_dir
            .as_deref()
            .unwrap_or(CONTAINER_SCRATCH),
    );
    c.arg("--")
        .arg(exec.spec.image.as_deref().unwrap_or_default())
        .args(argv)
        .current_dir(&exec.scratch_dir);
    c
}

/// A container job's scratch directory (a tmpfs inside the container).
const CONTAINER_SCRATCH: &str = "/tmp";

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

/// Why sandboxed jobs cannot run here, in words that say what to do; `None` when they can.
pub fn sandbox_unavailable_reason() -> Option<String> {
    if sandbox_available() {
        return None;
    }
    // Jobs find bwrap on their own PATH, so that is where to look.
    let installed = std::env::split_paths(JOB_PATH).any(|dir| dir.join("bwrap").is_file());
    Some(if installed {
        "bubblewrap (bwrap) is installed but cannot build a sandbox here (user namespaces \
         disabled? see `sysctl kernel.unprivileged_userns_clone`, or AppArmor's \
         `kernel.apparmor_restrict_unprivileged_userns`)"
            .into()
    } else {
        "bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap; \
         Fedora: dnf install bubblewrap)"
            .into()
    })
}

/// True when bubblewrap is installed and can build a sandbox here, as jobs get it (as the
/// sandbox user when the worker is root).
pub fn sandbox_available() -> bool {
    let mut probe = std::process::Command::new("bwrap");
    probe
        .args(sandbox_root_args())
        .args(["--", "/bin/true"])
        .env_clear()
        .env("PATH", JOB_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if running_as_root() {
        // std drops the supplementary groups too when root sets a uid.
        use std::os::unix::process::CommandExt;
        probe.uid(SANDBOX_UID).gid(SANDBOX_UID);
    }
    probe.status().is_ok_and(|s| s.success())
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
