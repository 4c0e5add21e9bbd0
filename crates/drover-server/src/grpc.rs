//! The gRPC API: the worker service (registration and the one stream per worker) and the
//! job service, with reflection and the standard health service.

use crate::auth::{self, Caller};
use crate::run_reports::{RunReport, Written};
use crate::sessions::Held;
use crate::{ApiError, AppState, jobs, logs};
use drover_core::{Capabilities, JobId, JobSpec, RunId, RunOutcome, Timestamp, WorkerState};
use drover_proto::v1::{
    self,
    job_service_server::{JobService, JobServiceServer},
    server_message::Body as Out,
    worker_message::Body as In,
    worker_service_server::{WorkerService, WorkerServiceServer},
};
use drover_store::{JobRecord, RunEnd, WorkerRecord};
use futures::Stream;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// An entry's bytes are cut to this size; workers split longer lines themselves.
const MAX_ENTRY_BYTES: usize = 64 * 1024;

pub fn router(state: Arc<AppState>) -> axum::Router {
    // Both versions of reflection: grpcurl (1.8) and grpcio-reflection speak v1alpha; and
    // the health service is described too.
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(drover_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = described().build_v1().ok();
    let reflection_v1alpha = described().build_v1alpha().ok();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        health_reporter
            .set_serving::<WorkerServiceServer<WorkerApi>>()
            .await;
        health_reporter
            .set_serving::<JobServiceServer<JobApi>>()
            .await;
    });
    let mut routes = tonic::service::Routes::new(health)
        .add_service(WorkerServiceServer::new(WorkerApi {
            state: state.clone(),
        }))
        .add_service(JobServiceServer::new(JobApi { state }));
    if let Some(reflection) = reflection {
        routes = routes.add_service(reflection);
    }
    if let Some(reflection) = reflection_v1alpha {
        routes = routes.add_service(reflection);
    }
    routes.prepare().into_axum_router()
}

struct WorkerApi {
    state: Arc<AppState>,
}

async fn authenticate(
    state: &AppState,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<WorkerRecord, Status> {
    let credential = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("authorization: Bearer <node credential> is required")
        })?;
    Ok(state
        .store
        .authenticate_worker(credential)
        .await
        .map_err(ApiError::from)?)
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let req = request.into_inner();
        let caps: Capabilities = req.capabilities.unwrap_or_default().into();
        let name = if req.name.trim().is_empty() {
            caps.hostname.clone()
        } else {
            req.name
        };
        if name.len() > 256 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "name",
                "must be at most 256 bytes, no control characters",
            )
            .into());
        }
        let (worker, credential) = self
            .state
            .store
            .register_worker(&req.token, &name, &caps)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(worker_id = %worker.id, name = %worker.name, "worker registered");
        Ok(Response::new(v1::RegisterResponse {
            node_id: worker.id.to_string(),
            credential,
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::WorkerMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let worker = authenticate(&self.state, request.metadata()).await?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let span = tracing::info_span!("worker", worker_id = %worker.id, name = %worker.name);
        tokio::spawn(run_session(self.state.clone(), worker, inbound, tx).instrument(span));
        let out = UnboundedReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(out)))
    }
}

fn send(tx: &mpsc::UnboundedSender<v1::ServerMessage>, body: Out) {
    let _ = tx.send(v1::ServerMessage { body: Some(body) });
}

/// One worker's stream, from its Hello to its end.
async fn run_session(
    state: Arc<AppState>,
    worker: WorkerRecord,
    mut inbound: Streaming<v1::WorkerMessage>,
    tx: mpsc::UnboundedSender<v1::ServerMessage>,
) {
    let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Ok(Ok(Some(v1::WorkerMessage {
            body: Some(In::Hello(h)),
        }))) => h,
        _ => {
            tracing::warn!("stream closed: the first message must be Hello");
            return;
        }
    };
    let caps: Capabilities = hello.capabilities.unwrap_or_default().into();
    let session = format!("{}/{}", state.replica, drover_core::RunId::new());
    match reattach(&state, &worker, &caps, &session, &hello.active_run_ids, &tx).await {
        Ok(active) => {
            let (session_id, closed) = state.sessions.attach(
                worker.id,
                tx.clone(),
                &caps,
                worker.provider.clone(),
                active,
            );
            tracing::info!(slots = caps.slots, "worker connected");
            state.push_configs().await;
            state.dispatch.notify_one();
            tokio::select! {
                _ = serve_session(&state, &worker, &mut inbound, &tx) => {}
                _ = closed.notified() => tracing::warn!("stream closed: the node was revoked"),
            }
            if state.sessions.detach(worker.id, session_id) {
                tracing::info!("worker disconnected");
                if let Err(e) = state
                    .store
                    .set_worker_state(worker.id, WorkerState::Lost, None, &session)
                    .await
                {
                    tracing::error!(error = %e, "cannot record the worker's loss");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot attach the worker"),
    }
}

/// Reconciles what the worker says it holds with what the store says it holds.
async fn reattach(
    state: &AppState,
    worker: &WorkerRecord,
    caps: &Capabilities,
    session: &str,
    listed: &[String],
    tx: &mpsc::UnboundedSender<v1::ServerMessage>,
) -> Result<HashMap<RunId, Held>, ApiError> {
    state
        .store
        .set_worker_state(worker.id, WorkerState::Ready, Some(caps), session)
        .await?;
    let listed: HashSet<RunId> = listed.iter().filter_map(|s| s.parse().ok()).collect();
    let live = state.store.live_runs_of(worker.id).await?;
    let mut active = HashMap::new();
    for run in live {
        if listed.contains(&run.id) {
            state.take_recovered(run.id);
            let spec = state.store.get_job(run.job_id).await?.spec;
            let held = Held {
                resources: spec.resources,
                reservation: spec.reservation,
            };
            active.insert(run.id, held);
            continue;
        }
        // The store says the worker holds it, the worker does not: it restarted.
        let error = crate::scheduler::lost_attempt_error(
            worker.id,
            state.take_recovered(run.id),
            crate::scheduler::AttemptLost::CameBackWithout,
        );
        crate::jobs::fail_lost_run(state, run.id, error).await?;
    }
    state
        .store
        .renew_leases(&[worker.id], state.lease_until())
        .await?;
    send(
        tx,
        Out::Welcome(v1::Welcome {
            node_id: worker.id.to_string(),
            heartbeat_interval_ms: state.config.heartbeat_interval().as_millis() as u64,
            lease_ms: state.config.lease.as_millis() as u64,
        }),
    );
    for run_id in listed.iter().filter(|r| !active.contains_key(r)) {
        // Already ended here (cancelled, or failed when its lease ran out): stop it there.
        send(
            tx,
            Out::Forget(v1::ForgetRun {
                run_id: run_id.to_string(),
            }),
        );
        // A finished-but-unacknowledged run is forgotten too: its end is already stored.
    }
    Ok(active)
}

async fn serve_session(
    state: &Arc<AppState>,
    worker: &WorkerRecord,
    inbound: &mut Streaming<v1::WorkerMessage>,
    tx: &mpsc::UnboundedSender<v1::ServerMessage>,
) {
    // Heartbeats are heard and answered as they arrive, whatever the messages before them
    // wait for (a write the store is slow to take): the node fences itself when it hears
    // nothing for half a lease. Everything else is handled in arrival order.
    let (work, work_rx) = mpsc::unbounded_channel::<In>();
    let processing = process_messages(state, worker, work_rx, tx);
    tokio::pin!(processing);
    loop {
        let msg = tokio::select! {
            () = &mut processing => return,
            msg = inbound.message() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => return,
            Err(status) => {
                tracing::info!(error = %status.message(), "worker stream broke");
                return;
            }
        };
        state.sessions.heard_from(worker.id);
        let Some(body) = msg.body else { continue };
        if let In::Heartbeat(_) = body {
            send(tx, Out::HeartbeatAck(v1::HeartbeatAck {}));
        } else if work.send(body).is_err() {
            // The processing ended, and with it the session.
            return;
        }
    }
}

/// A node's messages but heartbeats, in arrival order. Returns when the session must end
/// (the store could not take what must be acknowledged) or the stream did.
async fn process_messages(
    state: &Arc<AppState>,
    worker: &WorkerRecord,
    mut work: mpsc::UnboundedReceiver<In>,
    tx: &mpsc::UnboundedSender<v1::ServerMessage>,
) {
    // Runs whose accept or start is still being written: their logs wait for it, so that
    // nobody sees a line of a job the store does not yet call RUNNING.
    let mut steps_in_flight: HashMap<RunId, oneshot::Receiver<()>> = HashMap::new();
    while let Some(body) = work.recv().await {
        if matches!(body, In::Accepted(_) | In::Started(_) | In::Finished(_)) {
            // Written in batches, in arrival order; the answer is awaited in a task of its
            // own, so the stream reads on meanwhile.
            match report_run(state, worker, body, tx) {
                Ok((run_id, Some(written))) => {
                    steps_in_flight.insert(run_id, written);
                }
                Ok((run_id, None)) => {
                    steps_in_flight.remove(&run_id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "run report refused");
                    audit_refusal(state, worker, &e).await;
                }
            }
            continue;
        }
        if let In::Logs(batch) = &body
            && let Ok(run_id) = batch.run_id.parse::<RunId>()
            && let Some(written) = steps_in_flight.remove(&run_id)
        {
            let _ = written.await;
        }
        match handle(state, worker, body, tx).await {
            Ok(()) => {}
            // Not acknowledged, and the worker resends only after a reconnect: end the
            // stream, so that it reconnects (with backoff) and sends it again.
            Err(e @ ApiError::Unavailable(_)) => {
                state
                    .store_outage
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "ending the worker's stream: it resends what was not stored");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker message refused");
                audit_refusal(state, worker, &e).await;
            }
        }
    }
}

/// A node acting on what is not its own (another node's run) is recorded.
async fn audit_refusal(state: &AppState, worker: &WorkerRecord, e: &ApiError) {
    if matches!(e, ApiError::PermissionDenied(_)) {
        state
            .audit(
                Some(&format!("node:{}", worker.id)),
                "worker.message",
                None,
                true,
                None,
                Some(e.to_string()),
            )
            .await;
    }
}

fn run_id(s: &str) -> Result<RunId, ApiError> {
    s.parse::<RunId>()
        .map_err(|e| ApiError::invalid("run_id", e.to_string()))
}

/// Queues a run's accept, start or end for writing, and follows its answer up. Returns the
/// run, and for an accept or start what resolves once it is written.
fn report_run(
    state: &Arc<AppState>,
    worker: &WorkerRecord,
    body: In,
    tx: &mpsc::UnboundedSender<v1::ServerMessage>,
) -> Result<(RunId, Option<oneshot::Receiver<()>>), ApiError> {
    let step = |m_run_id: &str, step| {
        Ok::<_, ApiError>(RunReport::Step(drover_store::StepRequest {
            run_id: run_id(m_run_id)?,
            worker_id: worker.id,
            step,
        }))
    };
    let report = match &body {
        In::Accepted(m) => step(&m.run_id, drover_store::RunStep::Accept)?,
        In::Started(m) if m.accepts => step(&m.run_id, drover_store::RunStep::AcceptAndStart)?,
        In::Started(m) => step(&m.run_id, drover_store::RunStep::Start)?,
        In::Finished(m) => RunReport::End(finish_request(worker, m.clone())?),
        _ => return Err(ApiError::Internal("not a run report".into())),
    };
    let (run_id, written) = match &report {
        RunReport::Step(s) => {
            let (done, written) = oneshot::channel();
            (s.run_id, Some((done, written)))
        }
        RunReport::End(e) => (e.run_id, None),
    };
    let (done, written) = written.unzip();
    let answer = state.run_reports.queue(report);
    let (state, worker, tx) = (state.clone(), worker.clone(), tx.clone());
    tokio::spawn(
        async move {
            let refused = match (answer.await, body) {
                (Ok(Written::Step(job_id)), In::Started(_)) => {
                    state.notify_job(job_id, drover_core::JobState::Running);
                    None
                }
                (Ok(Written::End(f)), In::Finished(m)) => {
                    let id = f.run.id;
                    state.sessions.release(worker.id, id);
                    state.logs.close(id);
                    send(&tx, Out::FinishAck(v1::FinishAck { run_id: m.run_id }));
                    let span = tracing::info_span!("job", job_id = %f.job.id, run_id = %id);
                    span.in_scope(|| tracing::info!(outcome = ?f.run.state, exit_code = ?f.run.exit_code, job_state = %f.job.state, "run finished"));
                    state.notify_job(f.job.id, f.job.state);
                    state.dispatch.notify_one();
                    state.webhooks.notify_one();
                    None
                }
                (Ok(_), _) => None,
                (
                    Err(e),
                    In::Accepted(v1::RunAccepted { run_id })
                    | In::Started(v1::RunStarted {
                        run_id,
                        accepts: true,
                    }),
                ) => {
                    // Cancelled between assignment and acceptance: stop it there.
                    send(
                        &tx,
                        Out::Cancel(v1::CancelRun {
                            run_id,
                            reason: e.to_string(),
                        }),
                    );
                    Some(e)
                }
                (Err(e), _) => Some(e),
            };
            if let Some(done) = done {
                let _ = done.send(());
            }
            if let Some(e) = refused {
                let e = ApiError::from(e);
                tracing::warn!(error = %e, "run report refused");
                audit_refusal(&state, &worker, &e).await;
            }
        }
        .in_current_span(),
    );
    Ok((run_id, written))
}

/// A run end as the store takes it.
fn finish_request(
    worker: &WorkerRecord,
    m: v1::RunFinished,
) -> Result<drover_store::FinishRequest, ApiError> {
    let outcome = v1::RunOutcome::try_from(m.outcome)
        .map_err(|_| ApiError::invalid("outcome", "unknown value"))
        .and_then(|o| {
            RunOutcome::try_from(o).map_err(|e| ApiError::invalid("outcome", e.to_string()))
        })?;
    let result = match m.result_json.as_deref() {
        Some(text) => Some(
            serde_json::from_str(text)
                .map_err(|e| ApiError::invalid("result_json", format!("not JSON: {e}")))?,
        ),
        None => None,
    };
    Ok(drover_store::FinishRequest {
        run_id: run_id(&m.run_id)?,
        worker_id: Some(worker.id),
        end: RunEnd {
            outcome,
            exit_code: m.exit_code,
            error: m.error,
            result,
        },
    })
}

async fn handle(
    state: &AppState,
    worker: &WorkerRecord,
    body: In,
    tx: &mpsc::UnboundedSender<v1::ServerMessage>,
) -> Result<(), ApiError> {
    match body {
        In::Hello(_) => {}
        // Heard (above); the lease renewer writes every heard worker's leases at once.
        // Answered as they arrive (serve_session).
        In::Heartbeat(_) => {}
        In::ConfigAck(ack) => {
            let applied = ack.status == "applied";
            let caps: Option<Capabilities> = ack.capabilities.map(Into::into).filter(|_| applied);
            let record = drover_store::ConfigAckRecord {
                config_version: ack.version,
                applied_at: drover_core::Timestamp(ack.applied_at_us),
                status: if applied { "applied" } else { "failed" }.to_string(),
                error: (!ack.error.is_empty()).then_some(ack.error),
            };
            state
                .store
                .ack_node_config(worker.id, &record, caps.as_ref())
                .await?;
            if let Some(caps) = &caps {
                state.sessions.update_capabilities(worker.id, caps);
                state.dispatch.notify_one();
            }
            tracing::info!(
                version = record.config_version,
                status = %record.status,
                error = record.error.as_deref().unwrap_or(""),
                "node configuration acknowledged"
            );
        }
        In::Logs(batch) => {
            let id = run_id(&batch.run_id)?;
            // The session knows the runs it handed out; the store answers for the others
            // (a run reattached after a restart of the control plane).
            let own = state.sessions.holds(worker.id, id)
                || state.store.get_run(id).await?.worker_id == worker.id;
            if !own {
                return Err(ApiError::PermissionDenied(format!(
                    "run {id} belongs to another worker"
                )));
            }
            let entries = batch
                .entries
                .into_iter()
                .map(|e| logs::Entry {
                    seq: e.seq,
                    stream: if e.stream == v1::LogStream::Stderr as i32 {
                        logs::Stream::Stderr
                    } else {
                        logs::Stream::Stdout
                    },
                    timestamp: Timestamp(e.timestamp_us),
                    data: {
                        let mut d = e.data;
                        d.truncate(MAX_ENTRY_BYTES);
                        d
                    },
                })
                .collect();
            let acked = state.logs.append(id, entries).await.map_err(|e| match e {
                crate::logs::LogError::Store(e) => ApiError::from(e),
                io => ApiError::Internal(io.to_string()),
            })?;
            let _ = state.notices.send(crate::Notice::Log { run_id: id });
            send(
                tx,
                Out::LogAck(v1::LogAck {
                    run_id: batch.run_id,
                    seq: acked,
                }),
            );
        }
        // Queued by `report_run`.
        In::Accepted(_) | In::Started(_) | In::Finished(_) => {}
    }
    Ok(())
}

struct JobApi {
    state: Arc<AppState>,
}

fn to_wire(job: &JobRecord) -> v1::Job {
    v1::Job {
        id: job.id.to_string(),
        name: job.name.clone(),
        state: job.state.to_string(),
        attempts: job.attempts,
        exit_code: job.exit_code,
        error: job.error.clone(),
        created_at_us: job.created_at.as_micros(),
        finished_at_us: job.finished_at.map(|t| t.as_micros()),
        spec: Some((&job.spec).into()),
    }
}

impl JobApi {
    /// The caller of a request, from its `authorization: Bearer TOKEN` metadata.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        Ok(self.state.authenticate(token).await?)
    }

    /// The job, if the caller may see it (the same check as HTTP's, `auth::check_owner`).
    async fn owned_job(&self, caller: &Caller, id: &str) -> Result<JobRecord, Status> {
        let id: JobId = id.parse().map_err(ApiError::from)?;
        auth::check_owner(&self.state, caller, id, format!("grpc job {id}"), None).await?;
        Ok(self.state.store.get_job(id).await.map_err(ApiError::from)?)
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let caller = self.caller(&request).await?;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let spec = JobSpec::try_from(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (job, _) = jobs::submit(&self.state, spec, &caller).await?;
        Ok(Response::new(to_wire(&job)))
    }

    async fn submit_jobs(
        &self,
        request: Request<v1::SubmitJobsRequest>,
    ) -> Result<Response<v1::SubmitJobsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let specs = request
            .into_inner()
            .jobs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                JobSpec::try_from(spec)
                    .map_err(|e| Status::invalid_argument(format!("jobs[{i}].{e}")))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let specs =
            jobs::checked_specs(&self.state, &caller, specs, jobs::MAX_BATCH_JOBS, "a batch")?;
        let answers = jobs::submit_many(&self.state, specs, &caller).await?;
        let results = answers
            .into_iter()
            .map(|answer| match answer {
                Ok((job, created)) => v1::SubmittedJob {
                    job: Some(to_wire(&job)),
                    created,
                    error: String::new(),
                },
                Err(e) => v1::SubmittedJob {
                    job: None,
                    created: false,
                    error: e.to_string(),
                },
            })
            .collect();
        Ok(Response::new(v1::SubmitJobsResponse { results }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let caller = self.caller(&request).await?;
        let job = self.owned_job(&caller, &request.into_inner().id).await?;
        Ok(Response::new(to_wire(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let state = jobs::parse_state(&req.state)?;
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(10_000)
        };
        let list = self
            .state
            .store
            .list_jobs_of(state, caller.owner_filter(), limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: list.iter().map(to_wire).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let caller = self.caller(&request).await?;
        let job = self.owned_job(&caller, &request.into_inner().id).await?;
        let job = jobs::cancel(&self.state, job.id).await?;
        Ok(Response::new(to_wire(&job)))
    }
}
