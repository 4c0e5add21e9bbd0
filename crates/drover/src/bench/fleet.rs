//! The fleet a benchmark runs on: a control plane and workers started as processes of
//! this binary, and what CPU each used.

use super::*;

/// The control plane and workers a bench started.
pub(super) struct Fleet {
    pub(super) client: Client,
    pub(super) server_pid: Option<u32>,
    pub(super) worker_pids: Vec<u32>,
    pub(super) _children: Children,
    pub(super) _dir: Option<tempfile::TempDir>,
}

/// Child processes, killed when the bench ends, however it ends (a failed start too).
#[derive(Default)]
pub(super) struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn spawn(args: &[String], log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the drover binary")?;
    let log = std::fs::File::create(log)?;
    Ok(Command::new(exe)
        .args(args)
        .env("DROVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

pub(super) async fn fleet(
    setup: &Setup,
    executor: crate::serve::Executor,
) -> anyhow::Result<Fleet> {
    if let Some(url) = &setup.target {
        return Ok(Fleet {
            client: crate::login::client(url).await?,
            server_pid: None,
            worker_pids: Vec::new(),
            _children: Children::default(),
            _dir: None,
        });
    }
    let dir = tempfile::Builder::new().prefix("drover-bench-").tempdir()?;
    let data = dir.path().join("server");
    // A throwaway control plane on loopback: 74 random bits of a UUIDv7 are plenty.
    let admin_password = drover_core::JobId::new().to_string();
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--admin-password".into(),
        admin_password.clone(),
    ];
    if let Some(db) = &setup.database_url {
        args.extend(["--database-url".into(), db.clone()]);
    }
    std::fs::create_dir_all(&data)?;
    let server = spawn(&args, &dir.path().join("server.log"))?;
    let server_pid = server.id();
    let mut children = Children(vec![server]);
    let addr_file = data.join("api.addr");
    let started = Instant::now();
    let url = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file)
            && text.ends_with('\n')
        {
            break text.trim().to_string();
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the control plane did not start; see {}",
                dir.path().join("server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = Client::new(&url)?;
    let tokens = match client.login("admin", &admin_password).await {
        Ok(tokens) => tokens,
        Err(e) if setup.database_url.is_some() => bail!(
            "cannot sign in to the control plane the bench started ({e}): the bench needs an \
             empty database (it creates its own admin), and --database-url names one in use"
        ),
        Err(e) => return Err(e.into()),
    };
    let client = client.with_token(tokens.access_token);
    let mut worker_pids = Vec::new();
    for i in 0..setup.workers {
        let token = client
            .create_node_token(Duration::from_secs(600))
            .await?
            .token;
        let executor_name = match executor {
            crate::serve::Executor::Noop => "noop",
            crate::serve::Executor::Process => "process",
        };
        let args: Vec<String> = [
            "worker",
            "--server",
            &url,
            "--token",
            &token,
            "--name",
            &format!("bench-{i}"),
            "--slots",
            &setup.slots(executor).to_string(),
            "--executor",
            executor_name,
            "--state-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([dir.path().join(format!("worker-{i}")).display().to_string()])
        .collect();
        let worker = spawn(&args, &dir.path().join(format!("worker-{i}.log")))?;
        worker_pids.push(worker.id());
        children.0.push(worker);
    }
    while client
        .list_nodes()
        .await
        .map(|n| n.iter().filter(|n| n.connected).count())
        .unwrap_or(0)
        < setup.workers
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the workers did not connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Fleet {
        client,
        server_pid: Some(server_pid),
        worker_pids,
        _children: children,
        _dir: Some(dir),
    })
}

/// Peak resident memory (MiB) and CPU seconds of a process, from /proc.
pub(super) fn process_usage(pid: Option<u32>) -> (Option<f64>, Option<f64>) {
    let Some(pid) = pid else { return (None, None) };
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0);
    let cpu = process_cpu(&pid.to_string(), false);
    (peak, cpu)
}

/// CPU seconds a process has used (`pid` a number or `self`), with those of the children
/// it has waited for when `with_children` (a worker's job processes), from /proc.
pub(super) fn process_cpu(pid: &str, with_children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17 of stat, 12 to 15 after the
    // name; Linux reports them in USER_HZ, which is 100.
    let count = if with_children { 4 } else { 2 };
    let mut ticks = 0.0;
    for field in fields.get(11..11 + count)? {
        ticks += field.parse::<f64>().ok()?;
    }
    Some(ticks / 100.0)
}

/// CPU seconds used so far: by the control plane, the workers (with their jobs) and the
/// bench itself, and by the whole machine (busy, and busy plus idle, over its `cores`).
#[derive(Clone, Copy)]
pub(super) struct CpuReading {
    pub(super) control_plane: f64,
    pub(super) workers: f64,
    pub(super) bench: f64,
    pub(super) machine_busy: f64,
    pub(super) machine_all: f64,
    pub(super) cores: usize,
}

impl CpuReading {
    /// None for a control plane the bench did not start, or without /proc.
    pub(super) fn take(fleet: &Fleet) -> Option<Self> {
        let control_plane = process_cpu(&fleet.server_pid?.to_string(), false)?;
        let mut workers = 0.0;
        for pid in &fleet.worker_pids {
            workers += process_cpu(&pid.to_string(), true)?;
        }
        let bench = process_cpu("self", false)?;
        // The first line of /proc/stat: user nice system idle iowait irq softirq steal
        // (guest time is counted in user already), in USER_HZ.
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks: Vec<f64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|t| t.parse::<f64>().ok())
            .collect::<Option<_>>()?;
        let all: f64 = ticks.iter().sum();
        let idle = ticks.get(3)? + ticks.get(4)?;
        // The cores that line sums (`cpu0`, `cpu1`, …), which a container's CPU limit
        // does not change.
        let cores = stat
            .lines()
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Some(Self {
            control_plane,
            workers,
            bench,
            machine_busy: (all - idle) / 100.0,
            machine_all: all / 100.0,
            cores,
        })
    }

    /// Where the CPU went between `before` and `self`, per job, and how busy the machine
    /// was: at 100 % the run was bound by CPU; below, by waits (a serial stage, hand-offs).
    pub(super) fn figures(self, before: Self, jobs: usize) -> Vec<(String, String)> {
        let per_job = |after: f64, before: f64| per_job_us(after - before, jobs);
        let busy = (self.machine_busy - before.machine_busy)
            / (self.machine_all - before.machine_all).max(f64::MIN_POSITIVE);
        let control_plane = per_job(self.control_plane, before.control_plane);
        let workers = per_job(self.workers, before.workers);
        let bench = per_job(self.bench, before.bench);
        // The database server (PostgreSQL on this host), the kernel's threads, anything else.
        let rest =
            per_job(self.machine_busy, before.machine_busy) - control_plane - workers - bench;
        vec![
            (
                "CPU per job: control plane · workers · bench client · rest of the machine".into(),
                format!(
                    "{control_plane:.0} µs · {workers:.0} µs · {bench:.0} µs · {:.0} µs",
                    rest.max(0.0)
                ),
            ),
            (
                "machine busy during the run".into(),
                format!("{:.0} % of {} cores", busy * 100.0, self.cores),
            ),
        ]
    }
}
