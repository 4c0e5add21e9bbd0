//! Starts a job's process the way `posix_spawn` does — `clone(CLONE_VM | CLONE_VFORK)`, the
//! child sharing the worker's memory until it execs — but with a step `posix_spawn` cannot
//! take: the child asks for SIGKILL when the worker dies (`PR_SET_PDEATHSIG`), so a worker
//! killed with `kill -9` leaves no job running unseen while the control plane retries it
//! elsewhere.
//!
//! std's `Command` can set that only through a `pre_exec` hook, which makes it `fork`: the
//! worker's page tables are copied and each of its pages turns copy-on-write until the child
//! execs. At a thousand short jobs a second that copying and the faults after it took a fifth
//! of the machine (`perf record -a`, `drover bench throughput --executor process`).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// The child's own stack until it execs: it runs a few system calls and nothing else.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// What to run: a program, its arguments, its environment (the worker's own with changes, or
/// only what is given after [`Launch::env_clear`]), the working directory, and optionally
/// the user it runs as and descriptors it inherits. Built like `std::process::Command`.
#[derive(Debug)]
pub struct Launch {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    inherit_env: bool,
    current_dir: Option<PathBuf>,
    /// (uid, gid) to switch to before exec, with no supplementary groups.
    user: Option<(u32, u32)>,
    /// Descriptors the child gets as 3, 4, … in this order (every other one closes on exec).
    pass_fds: Vec<OwnedFd>,
}

/// A started process with its output pipes. Stdin is /dev/null; the process leads a new
/// process group (its pid is the group id).
pub struct Spawned {
    pub process: JobProcess,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

impl Launch {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
            inherit_env: true,
            current_dir: None,
            user: None,
            pass_fds: Vec::new(),
        }
    }

    /// The child gets only the variables given with [`Launch::env`], none of the worker's.
    pub fn env_clear(&mut self) -> &mut Self {
        self.inherit_env = false;
        self.env.clear();
        self
    }

    /// Runs the child as this user and group, without supplementary groups (the worker must
    /// be allowed to switch: root, or the same ids).
    pub fn user(&mut self, uid: u32, gid: u32) -> &mut Self {
        self.user = Some((uid, gid));
        self
    }

    /// Hands the child this descriptor as the next of 3, 4, …; returns its number there.
    pub fn pass_fd(&mut self, fd: OwnedFd) -> i32 {
        self.pass_fds.push(fd);
        2 + self.pass_fds.len() as i32
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .insert(key.as_ref().to_owned(), value.as_ref().to_owned());
        self
    }

    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.current_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Starts the process. Errors are those of the step that failed (program not found,
    /// working directory missing, …), as `Command::spawn` gives them.
    pub fn spawn(&self) -> io::Result<Spawned> {
        let env = self.environment();
        let program = resolve_program(&self.program, &env)?;
        let argv = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(c_string)
            .collect::<io::Result<Vec<_>>>()?;
        let envp = env
            .into_iter()
            .map(|(mut k, v)| {
                k.push("=");
                k.push(v);
                c_string(&k)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let cwd = self
            .current_dir
            .as_deref()
            .map(|d| c_string(d.as_os_str()))
            .transpose()?;

        let stdin = above_stdio(open_dev_null()?)?;
        // Above every number they are placed on, so that placing one cannot close another.
        let passed = self
            .pass_fds
            .iter()
            .map(|fd| dup_at_least(fd.as_raw_fd(), PASSED_FDS_FROM))
            .collect::<io::Result<Vec<_>>>()?;
        let passed_raw: Vec<RawFd> = passed.iter().map(AsRawFd::as_raw_fd).collect();
        let (stdout_read, stdout_write) = pipe_pair()?;
        let (stderr_read, stderr_write) = pipe_pair()?;

        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);
        let mut setup = ChildSetup {
            program: program.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: envp_ptrs.as_ptr(),
            cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            stdio: [
                stdin.as_raw_fd(),
                stdout_write.as_raw_fd(),
                stderr_write.as_raw_fd(),
            ],
            passed: passed_raw.as_ptr(),
            passed_len: passed_raw.len(),
            user: self.user.map_or([-1, -1], |(u, g)| [u as i64, g as i64]),
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() },
            errno: 0,
        };
        let mut stack = vec![0u8; CHILD_STACK_BYTES];
        // SAFETY: see `child_main` for what the child does with the shared memory. Every
        // signal is blocked around clone so that no handler of the worker's runs in the
        // child before it has reset them; the parent's mask is restored right after.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut worker_mask: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut worker_mask);
            let stack_top = stack.as_mut_ptr().add(stack.len());
            let stack_top = stack_top.sub(stack_top as usize % 16);
            let pid = libc::clone(
                child_main,
                stack_top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&raw mut setup).cast::<c_void>(),
            );
            let clone_error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &worker_mask, std::ptr::null_mut());
            if pid == -1 {
                return Err(clone_error);
            }
            pid
        };
        drop((stdin, stdout_write, stderr_write, passed));
        // SAFETY: the child wrote it, if at all, before it exited; CLONE_VFORK held this
        // thread until then.
        let child_errno = unsafe { std::ptr::read_volatile(&raw const setup.errno) };
        if child_errno != 0 {
            reap_blocking(pid);
            return Err(io::Error::from_raw_os_error(child_errno));
        }
        let process = JobProcess::watch(pid)?;
        Ok(Spawned {
            process,
            stdout: pipe::Receiver::from_owned_fd(stdout_read)?,
            stderr: pipe::Receiver::from_owned_fd(stderr_read)?,
        })
    }

    /// The worker's environment with this launch's changes, or only those.
    fn environment(&self) -> BTreeMap<OsString, OsString> {
        let mut env: BTreeMap<OsString, OsString> = if self.inherit_env {
            std::env::vars_os().collect()
        } else {
            BTreeMap::new()
        };
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }
}

/// What the child needs, prepared by the parent: the child must not allocate (another
/// thread of the worker may hold the allocator's lock), so it only reads this.
#[repr(C)]
struct ChildSetup {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// Null: stay in the worker's directory.
    cwd: *const c_char,
    /// Stdin, stdout and stderr to be; each above 2, so placing one cannot close another.
    stdio: [RawFd; 3],
    /// Descriptors to place at 3, 4, …; each at or above [`PASSED_FDS_FROM`].
    passed: *const RawFd,
    passed_len: usize,
    /// (uid, gid) to switch to, or -1s to stay.
    user: [i64; 2],
    parent: libc::pid_t,
    /// Set by the child when a step fails; it then exits with 127.
    errno: c_int,
}

/// Runs in the child, on its own stack, sharing the worker's memory: only system calls
/// until execve.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's ChildSetup, alive while the parent is held by
    // CLONE_VFORK; only async-signal-safe calls follow.
    unsafe {
        let setup = &mut *arg.cast::<ChildSetup>();
        let fail = |setup: &mut ChildSetup| -> c_int {
            setup.errno = *libc::__errno_location();
            if setup.errno == 0 {
                setup.errno = libc::EINVAL;
            }
            libc::_exit(127)
        };
        // The worker's handlers (tokio's SIGCHLD, std's SIGSEGV) must not run in a child
        // that shares its memory; ignored signals stay ignored across exec, as they would.
        for signal in 1..=64 {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) == 0
                && action.sa_sigaction != libc::SIG_DFL
                && action.sa_sigaction != libc::SIG_IGN
            {
                action.sa_sigaction = libc::SIG_DFL;
                action.sa_flags = 0;
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        // Rust programs ignore SIGPIPE; a job gets the default, as std's Command gives it.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Raw system calls: glibc's setuid would tell every thread of the worker (this child
        // shares its memory) to switch too. Before PR_SET_PDEATHSIG, which a change of
        // credentials clears.
        if let [uid, gid] = setup.user
            && uid >= 0
            && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0)
        {
            return fail(setup);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return fail(setup);
        }
        // The worker may have died before the line above: then nobody would kill this one.
        if libc::getppid() != setup.parent {
            libc::_exit(127);
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(setup);
        }
        for (target, fd) in setup.stdio.into_iter().enumerate() {
            if libc::dup2(fd, target as c_int) == -1 {
                return fail(setup);
            }
        }
        for i in 0..setup.passed_len {
            // dup2 leaves the new number open across exec.
            if libc::dup2(*setup.passed.add(i), 3 + i as c_int) == -1 {
                return fail(setup);
            }
        }
        if !setup.cwd.is_null() && libc::chdir(setup.cwd) != 0 {
            return fail(setup);
        }
        // The job starts with no signal blocked, as std's Command starts it.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(setup.program, setup.argv, setup.envp);
        fail(setup)
    }
}

/// A started process: wait for it, or drop it to kill it.
pub struct JobProcess {
    pid: libc::pid_t,
    /// Readable once the process has exited.
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
}

impl JobProcess {
    fn watch(pid: libc::pid_t) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags; the answer is a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            kill_and_reap(pid);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot watch the process (pidfd_open needs Linux 5.3 or later): {e}"),
            ));
        }
        // SAFETY: a descriptor pidfd_open has just returned, owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the descriptor is owned by the AsyncFd and closed only when it is dropped.
        match unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) } {
            Ok(pidfd) => Ok(Self {
                pid,
                pidfd,
                status: None,
            }),
            Err(e) => {
                kill_and_reap(pid);
                Err(e.into())
            }
        }
    }

    /// The process id, which is also its process group id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Waits for the process to exit and reaps it. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            self.pidfd.readable().await?.clear_ready();
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: our own child; WNOHANG never blocks.
        match unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) } {
            0 => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            _ => {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                Ok(Some(status))
            }
        }
    }
}

impl Drop for JobProcess {
    /// A process nobody waits for any more is killed and reaped, not left a zombie.
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: our own child, not yet reaped, so the pid is still ours.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let pid = self.pid;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || reap_blocking(pid))),
            Err(_) => reap_blocking(pid),
        }
    }
}

/// For a child that cannot be watched: it must not run on unseen.
fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: our own child, not yet reaped, so the pid is still ours.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    reap_blocking(pid);
}

fn reap_blocking(pid: libc::pid_t) {
    let mut raw = 0;
    // SAFETY: our own child; EINTR is retried.
    while unsafe { libc::waitpid(pid, &mut raw, 0) } == -1
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// The program's path: as given when it names a directory (relative to the new working
/// directory), else the first executable of that name on the job's PATH.
fn resolve_program(program: &OsStr, env: &BTreeMap<OsString, OsString>) -> io::Result<CString> {
    if program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    if program.as_bytes().contains(&b'/') {
        return c_string(program);
    }
    let path = env
        .get(OsStr::new("PATH"))
        .map(OsString::as_os_str)
        .unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(path) {
        let candidate = if dir.as_os_str().is_empty() {
            PathBuf::from(program)
        } else {
            dir.join(program)
        };
        let c = c_string(candidate.as_os_str())?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && !candidate.is_dir() {
            return Ok(c);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes().to_vec()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn open_dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// A pipe whose ends close on exec: (read, write), both above 2.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 fills two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(read)?, above_stdio(write)?))
}

/// Passed descriptors are moved to this number or above before they are placed at 3, 4, …
const PASSED_FDS_FROM: RawFd = 64;

/// A copy of `fd` numbered `min` or above, closed on exec.
fn dup_at_least(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if copy == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the new descriptor is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// A worker started with a standard descriptor closed gets new descriptors among 0–2;
/// moved above them, placing the child's stdio cannot close one before it is used.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if moved == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the new descriptor is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn run(launch: &Launch) -> (ExitStatus, String, String) {
        let Spawned {
            mut process,
            mut stdout,
            mut stderr,
        } = launch.spawn().expect("spawn");
        let (mut out, mut err) = (String::new(), String::new());
        let (o, e, status) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err),
            process.wait()
        );
        o.expect("stdout");
        e.expect("stderr");
        (status.expect("wait"), out, err)
    }

    #[tokio::test]
    async fn output_status_environment_and_directory_reach_the_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut launch = Launch::new("sh");
        launch
            .args(["-c", "echo \"$GREETING\"; pwd; echo oops >&2; exit 3"])
            .env("GREETING", "hello")
            .current_dir(dir.path());
        let (status, out, err) = run(&launch).await;
        assert_eq!(status.code(), Some(3));
        let canonical = dir.path().canonicalize().expect("canonical");
        assert_eq!(out, format!("hello\n{}\n", canonical.display()));
        assert_eq!(err, "oops\n");
    }

    #[tokio::test]
    async fn the_child_leads_its_group_with_default_signals_and_an_empty_mask() {
        let (status, out, _) = run(Launch::new("cat").arg("/proc/self/status")).await;
        assert!(status.success());
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex mask"))
                .expect(name)
        };
        assert_eq!(field("SigBlk:"), 0, "no signal blocked");
        assert_eq!(
            field("SigIgn:") & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE not ignored"
        );
        assert_eq!(field("SigCgt:"), 0, "no handler of the worker's");

        let (_, stat, _) = run(Launch::new("cat").arg("/proc/self/stat")).await;
        let pid = stat.split_whitespace().next().expect("pid");
        let after_name = stat.rsplit_once(')').expect("stat").1;
        let pgrp = after_name.split_whitespace().nth(2).expect("pgrp");
        assert_eq!(pid, pgrp, "the job leads its own process group");
    }

    #[tokio::test]
    async fn a_missing_program_or_directory_is_an_error_not_a_process() {
        let missing = Launch::new("no-such-program-drover").spawn();
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let mut launch = Launch::new("true");
        launch.current_dir("/no/such/dir/drover");
        assert_eq!(
            launch.spawn().err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let plain_file = dir.path().join("data");
        std::fs::write(&plain_file, "not a program").expect("write");
        let not_executable = Launch::new(&plain_file).spawn();
        assert_eq!(
            not_executable.err().map(|e| e.kind()),
            Some(io::ErrorKind::PermissionDenied)
        );
    }

    #[tokio::test]
    async fn dropping_a_running_process_kills_it() {
        let Spawned { process, .. } = Launch::new("sleep").arg("600").spawn().expect("spawn");
        let pid = process.id();
        drop(process);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Reaped by a blocking task: the pid disappears from /proc.
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(std::time::Instant::now() < deadline, "{pid} still exists");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
