//! Simulated workers: many gRPC sessions in one process, each taking assignments and
//! reporting them done at once, for the control plane's own throughput.

use super::*;

/// A worker simulated inside the bench: registers, keeps its stream, heartbeats, and
/// completes every assignment at once.
pub(super) async fn simulated_worker(
    server: String,
    token: String,
    name: String,
) -> anyhow::Result<()> {
    use drover_proto::v1::{self, server_message::Body as In, worker_message::Body as Out};
    let channel = tonic::transport::Endpoint::from_shared(server)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = v1::worker_service_client::WorkerServiceClient::new(channel);
    let caps = v1::Capabilities {
        hostname: name.clone(),
        cpus: 1,
        slots: 4,
        isolation_modes: vec!["process".into()],
        ..Default::default()
    };
    let reg = client
        .register(v1::RegisterRequest {
            token,
            name,
            capabilities: Some(caps.clone()),
        })
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let send = |body| {
        let _ = tx.send(v1::WorkerMessage { body: Some(body) });
    };
    send(Out::Hello(v1::Hello {
        capabilities: Some(caps),
        active_run_ids: Vec::new(),
    }));
    let mut request = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", reg.credential).parse()?,
    );
    let mut inbound = client.session(request).await?.into_inner();
    let mut beat = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            msg = inbound.message() => match msg? {
                Some(v1::ServerMessage { body: Some(In::Welcome(w)) }) => {
                    beat = tokio::time::interval(Duration::from_millis(w.heartbeat_interval_ms.max(100)));
                }
                Some(v1::ServerMessage { body: Some(In::Assignment(a)) }) => {
                    send(Out::Started(v1::RunStarted { run_id: a.run_id.clone(), accepts: true }));
                    send(Out::Finished(v1::RunFinished {
                        run_id: a.run_id,
                        outcome: v1::RunOutcome::Succeeded as i32,
                        exit_code: Some(0),
                        error: None,
                        last_seq: 0,
                        result_json: None,
                    }));
                }
                Some(_) => {}
                None => return Ok(()),
            },
            _ = beat.tick() => send(Out::Heartbeat(v1::Heartbeat {})),
        }
    }
}

pub(super) async fn simulated_workers(
    workers: usize,
    idle: Duration,
    jobs: usize,
    setup: &Setup,
) -> anyhow::Result<Figures> {
    let mut none = setup.clone();
    none.workers = 0;
    let fleet = fleet(&none, crate::serve::Executor::Noop).await?;
    let server = fleet.client.server().trim_end_matches('/').to_string();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..workers {
        let token = fleet
            .client
            .create_node_token(Duration::from_secs(600))
            .await?
            .token;
        tasks.push(tokio::spawn(simulated_worker(
            server.clone(),
            token,
            format!("sim-{i}"),
        )));
    }
    while fleet
        .client
        .list_nodes()
        .await
        .map(|n| n.iter().filter(|n| n.connected).count())
        .unwrap_or(0)
        < workers
    {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the simulated workers did not all connect");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed();
    let (_, cpu_before) = process_usage(fleet.server_pid);
    tokio::time::sleep(idle).await;
    let (_, cpu_after) = process_usage(fleet.server_pid);
    let mut figures = vec![
        ("simulated workers".into(), workers.to_string()),
        (
            "all connected after".into(),
            format!("{:.1} s", connect_time.as_secs_f64()),
        ),
    ];
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        figures.push((
            format!("control plane CPU while idle ({} s)", idle.as_secs()),
            format!("{:.1} % of one core", (b - a) / idle.as_secs_f64() * 100.0),
        ));
    }
    let spec = JobSpec {
        command: Some("true".into()),
        max_attempts: Some(1),
        ..Default::default()
    };
    figures.extend(probe(&fleet.client, &spec, jobs, "").await?);
    usage_figures(&fleet, &mut figures);
    for t in tasks {
        t.abort();
    }
    Ok(Figures {
        scenario: "workers".into(),
        database: database_name(setup),
        figures: figures
            .into_iter()
            .map(|(name, value)| Figure { name, value })
            .collect(),
    })
}
