//! The session loop: one connection to the control plane, the runs this node holds, and
//! what it does with each server message and each executor event.

use super::*;

/// A run this worker holds, from assignment until the server acknowledges its end.
pub(crate) struct HeldRun {
    pub(crate) next_seq: u64,
    /// Sent (or not yet) and not yet acknowledged.
    pub(crate) unacked: VecDeque<v1::LogEntry>,
    /// Highest sequence number sent on the current connection.
    pub(crate) sent_seq: u64,
    /// The last sequence number of each log message sent and not yet acknowledged.
    pub(crate) batches_in_flight: VecDeque<u64>,
    /// The process's output credit (see `executor::OUTPUT_CREDIT`), given back as entries
    /// are acknowledged; None for runs whose output is not read from pipes (inference).
    pub(crate) output_credit: Option<Arc<Semaphore>>,
    pub(crate) finished: Option<v1::RunFinished>,
    pub(crate) control: Option<UnboundedSender<Control>>,
    /// Whether the control plane was told this run was taken. A process is told at its
    /// start (or its failure to start), so that the accept and the start travel and are
    /// written together instead of one write after the other.
    pub(crate) accepted: bool,
}

impl Drop for HeldRun {
    /// A forgotten run's output readers stop waiting for credit.
    fn drop(&mut self) {
        if let Some(credit) = &self.output_credit {
            credit.close();
        }
    }
}

pub(crate) struct Agent {
    pub(crate) config: WorkerConfig,
    pub(crate) node_id: String,
    pub(crate) inference_socket: Option<PathBuf>,
    /// Where runs get their scratch directories (see `executor::jobs_dir`).
    pub(crate) jobs_dir: PathBuf,
    pub(crate) models: inference::Models,
    /// A heartbeat interval set by node configuration (never slower than the server asks).
    pub(crate) heartbeat_override: Option<Duration>,
    pub(crate) caps: Capabilities,
    pub(crate) runs: HashMap<RunId, HeldRun>,
    pub(crate) events_tx: UnboundedSender<ExecEvent>,
    /// When the control plane was last heard from, and the lease it grants.
    pub(crate) last_contact: tokio::time::Instant,
    pub(crate) lease: Duration,
    pub(crate) fenced: bool,
}

pub(crate) enum SessionEnd {
    Shutdown,
    Disconnected(String),
}

impl Agent {
    pub(crate) async fn session(
        &mut self,
        cred: &NodeCredential,
        events_rx: &mut UnboundedReceiver<ExecEvent>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<SessionEnd, WorkerError> {
        let unreachable = |e: &dyn std::fmt::Display| WorkerError::BadServer {
            server: self.config.server.clone(),
            message: e.to_string(),
        };
        let channel: Channel = endpoint(&self.config.server, self.config.ca_cert.as_deref())?
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let hello = v1::Hello {
            capabilities: Some((&self.caps).into()),
            active_run_ids: self.runs.keys().map(ToString::to_string).collect(),
        };
        send(Some(&out_tx), Out::Hello(hello));
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(out_rx));
        let bearer = format!("Bearer {}", cred.credential)
            .parse()
            .map_err(|_| unreachable(&"the stored credential is not valid ASCII"))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut inbound = match WorkerServiceClient::new(channel).session(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                return Err(WorkerError::CredentialRefused {
                    path: credential_path(&self.config.state_dir),
                    message: s.message().to_string(),
                });
            }
            Err(s) => return Err(unreachable(&s)),
        };
        let welcome = match inbound.message().await {
            Ok(Some(v1::ServerMessage {
                body: Some(In::Welcome(w)),
            })) => w,
            Ok(_) => {
                return Ok(SessionEnd::Disconnected(
                    "stream closed before Welcome".into(),
                ));
            }
            Err(s) => return Ok(SessionEnd::Disconnected(s.to_string())),
        };
        tracing::info!(runs = self.runs.len(), "connected");
        self.last_contact = tokio::time::Instant::now();
        self.lease = Duration::from_millis(welcome.lease_ms.max(100));
        watchdog::set_timeout(self.lease / 2);
        self.fenced = false;
        self.resend_backlog(&out_tx);
        let server_interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(50));
        let every = |o: Option<Duration>| {
            let mut t =
                tokio::time::interval(o.map_or(server_interval, |o| o.min(server_interval)));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut heartbeat = every(self.heartbeat_override);
        // Connected is not heard: a path that drops packets keeps the stream open for as
        // long as HTTP/2 takes to notice. Heartbeats are answered, so half a lease without
        // any word means the leases may lapse: fence then, whatever the stream looks like.
        let mut fence_check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = fence_check.tick() => {
                    self.fence_if_stale();
                    if self.fenced {
                        return Ok(SessionEnd::Disconnected(
                            "no word from the control plane for half a lease".into(),
                        ));
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(v1::ServerMessage { body: Some(In::Config(c)) })) => {
                        self.last_contact = tokio::time::Instant::now();
                        self.apply_config(c, &out_tx);
                        heartbeat = every(self.heartbeat_override);
                    }
                    Ok(Some(v1::ServerMessage { body: Some(body) })) => {
                        self.last_contact = tokio::time::Instant::now();
                        self.on_server_message(body, &out_tx);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(SessionEnd::Disconnected("the control plane closed the stream".into())),
                    Err(s) => return Ok(SessionEnd::Disconnected(s.message().to_string())),
                },
                _ = heartbeat.tick() => send(Some(&out_tx), Out::Heartbeat(v1::Heartbeat {})),
                Some(ev) = events_rx.recv() => {
                    self.on_exec_event(ev, Some(&out_tx));
                    // Take whatever else is ready so that entries travel in batches.
                    let mut batched = 0;
                    while batched < 4096 {
                        match events_rx.try_recv() {
                            Ok(ev) => self.on_exec_event(ev, Some(&out_tx)),
                            Err(_) => break,
                        }
                        batched += 1;
                    }
                    self.flush(&out_tx);
                }
                _ = shutdown.as_mut() => return Ok(SessionEnd::Shutdown),
            }
        }
    }

    /// After a reconnect: every unacknowledged entry and result again, in order.
    pub(crate) fn resend_backlog(&mut self, out: &UnboundedSender<v1::WorkerMessage>) {
        for (run_id, held) in &mut self.runs {
            held.batches_in_flight.clear();
            send_logs_from(run_id, held, 0, out);
            if let Some(f) = &held.finished {
                send(Some(out), Out::Finished(f.clone()));
            }
        }
    }

    /// Applies a configuration from the control plane to what this node was started with,
    /// and answers: applied with the capabilities it has now, or failed with the reason
    /// (the previous configuration stays in force).
    pub(crate) fn apply_config(
        &mut self,
        c: v1::NodeConfig,
        out: &UnboundedSender<v1::WorkerMessage>,
    ) {
        let applied = serde_json::from_str::<drover_core::NodeConfig>(&c.json)
            .map_err(|e| format!("cannot read the configuration: {e}"))
            .and_then(|config| {
                let caps = config.apply(&self.caps)?;
                Ok((config, caps))
            });
        let ack = match applied {
            Ok((config, caps)) => {
                self.heartbeat_override = config.heartbeat_interval_ms.map(Duration::from_millis);
                tracing::info!(version = c.version, "node configuration applied");
                v1::ConfigAck {
                    version: c.version,
                    applied_at_us: drover_core::Timestamp::now().as_micros(),
                    status: "applied".into(),
                    error: String::new(),
                    capabilities: Some((&caps).into()),
                }
            }
            Err(error) => {
                tracing::warn!(version = c.version, error = %error, "node configuration refused");
                v1::ConfigAck {
                    version: c.version,
                    applied_at_us: drover_core::Timestamp::now().as_micros(),
                    status: "failed".into(),
                    error,
                    capabilities: None,
                }
            }
        };
        send(Some(out), Out::ConfigAck(ack));
    }

    pub(crate) fn on_server_message(&mut self, body: In, out: &UnboundedSender<v1::WorkerMessage>) {
        match body {
            In::Welcome(_) | In::Config(_) | In::HeartbeatAck(_) => {}
            In::Assignment(a) => self.start(a, out),
            In::Cancel(c) => {
                if let Some(held) = c.run_id.parse().ok().and_then(|id| self.runs.get(&id))
                    && let Some(control) = &held.control
                {
                    tracing::info!(run_id = %c.run_id, reason = %c.reason, "cancelling");
                    let _ = control.send(Control::Cancel);
                }
            }
            In::LogAck(ack) => {
                if let Ok(run_id) = ack.run_id.parse::<RunId>()
                    && let Some(held) = self.runs.get_mut(&run_id)
                {
                    let mut stored_cost = 0;
                    while let Some(entry) = held.unacked.pop_front_if(|e| e.seq <= ack.seq) {
                        stored_cost += executor::output_cost(entry.data.len()) as usize;
                    }
                    if let Some(credit) = &held.output_credit {
                        credit.add_permits(stored_cost);
                    }
                    while held
                        .batches_in_flight
                        .front()
                        .is_some_and(|&s| s <= ack.seq)
                    {
                        held.batches_in_flight.pop_front();
                    }
                    send_unsent_logs_in_window(&run_id, held, out);
                }
            }
            In::FinishAck(ack) => {
                if let Ok(id) = ack.run_id.parse() {
                    self.runs.remove(&id);
                }
            }
            In::Forget(f) => {
                // Dropping the control sender stops the process if it still runs.
                if let Ok(id) = f.run_id.parse::<RunId>()
                    && self.runs.remove(&id).is_some()
                {
                    tracing::warn!(run_id = %id, "the control plane no longer counts this run as ours; stopped");
                }
            }
        }
    }

    pub(crate) fn start(&mut self, a: v1::Assignment, out: &UnboundedSender<v1::WorkerMessage>) {
        let Ok(run_id) = a.run_id.parse::<RunId>() else {
            tracing::warn!(run_id = %a.run_id, "assignment with a malformed run id");
            return;
        };
        if self.runs.contains_key(&run_id) {
            return;
        }
        let spec = match a.spec.map(JobSpec::try_from) {
            Some(Ok(spec)) => spec,
            _ => {
                tracing::warn!(%run_id, "assignment without a usable spec");
                return;
            }
        };
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inference = spec.kind == drover_core::JobKind::Inference
            && self.config.executor == ExecutorKind::Process;
        let output_credit = Arc::new(Semaphore::new(executor::OUTPUT_CREDIT));
        self.runs.insert(
            run_id,
            HeldRun {
                next_seq: 0,
                unacked: VecDeque::new(),
                sent_seq: 0,
                batches_in_flight: VecDeque::new(),
                output_credit: (!inference).then(|| output_credit.clone()),
                finished: None,
                control: Some(control_tx),
                accepted: false,
            },
        );
        let exec = Execution {
            run_id,
            job_id: a.job_id.clone(),
            attempt: a.attempt,
            spec,
            scratch_dir: self.jobs_dir.join(run_id.to_string()),
            node_id: self.node_id.clone(),
            inference_socket: self.inference_socket.clone(),
            kill_grace: self.config.kill_grace,
            output_credit,
            hidden_paths: std::iter::once(self.config.state_dir.clone())
                .chain(self.config.hidden_paths.iter().cloned())
                .collect(),
        };
        let span = tracing::info_span!("job", job_id = %a.job_id, run_id = %run_id);
        if inference {
            // A model may take a while to load before the run starts: say it is taken now.
            self.accept(run_id, Some(out));
            tokio::spawn(
                inference::execute(
                    exec,
                    self.models.clone(),
                    self.events_tx.clone(),
                    control_rx,
                )
                .instrument(span),
            );
            return;
        }
        match self.config.executor {
            ExecutorKind::Process => {
                tokio::spawn(
                    executor::execute(exec, self.events_tx.clone(), control_rx).instrument(span),
                );
            }
            ExecutorKind::Noop => {
                let _ = self.events_tx.send(ExecEvent::Started { run_id });
                let _ = self.events_tx.send(ExecEvent::Exited {
                    run_id,
                    outcome: drover_core::RunOutcome::Succeeded,
                    exit_code: Some(0),
                    error: None,
                    result: None,
                });
            }
        }
    }

    pub(crate) fn on_exec_event(
        &mut self,
        ev: ExecEvent,
        out: Option<&UnboundedSender<v1::WorkerMessage>>,
    ) {
        match ev {
            ExecEvent::Started { run_id } => {
                if let Some(held) = self.runs.get_mut(&run_id) {
                    // Not accepted yet: the start says both, in one message.
                    let accepts = !std::mem::replace(&mut held.accepted, true);
                    send(
                        out,
                        Out::Started(v1::RunStarted {
                            run_id: run_id.to_string(),
                            accepts,
                        }),
                    );
                }
            }
            ExecEvent::Output {
                run_id,
                stream,
                timestamp,
                data,
            } => {
                if let Some(held) = self.runs.get_mut(&run_id) {
                    held.next_seq += 1;
                    held.unacked.push_back(v1::LogEntry {
                        seq: held.next_seq,
                        stream: match stream {
                            OutStream::Stdout => v1::LogStream::Stdout,
                            OutStream::Stderr => v1::LogStream::Stderr,
                        } as i32,
                        timestamp_us: timestamp.as_micros(),
                        data,
                    });
                }
            }
            ExecEvent::Exited {
                run_id,
                outcome,
                exit_code,
                error,
                result,
            } => {
                // Its last lines go before its end, whatever its window.
                if let Some(out) = out
                    && let Some(held) = self.runs.get_mut(&run_id)
                {
                    send_unsent_logs(&run_id, held, out);
                }
                self.accept(run_id, out);
                if let Some(held) = self.runs.get_mut(&run_id) {
                    tracing::info!(%run_id, ?outcome, ?exit_code, "run ended");
                    let finished = v1::RunFinished {
                        run_id: run_id.to_string(),
                        outcome: v1::RunOutcome::from(outcome) as i32,
                        exit_code,
                        error,
                        last_seq: held.next_seq,
                        result_json: result.map(|r| r.to_string()),
                    };
                    held.control = None;
                    held.finished = Some(finished.clone());
                    send(out, Out::Finished(finished));
                }
            }
        }
    }

    /// Tells the control plane the run was taken, once.
    pub(crate) fn accept(
        &mut self,
        run_id: RunId,
        out: Option<&UnboundedSender<v1::WorkerMessage>>,
    ) {
        if let Some(held) = self.runs.get_mut(&run_id)
            && !held.accepted
        {
            held.accepted = true;
            send(
                out,
                Out::Accepted(v1::RunAccepted {
                    run_id: run_id.to_string(),
                }),
            );
        }
    }

    /// Sends the entries produced since the last flush, one message per run, for runs with
    /// room in their window of unacknowledged messages; the others send on their next ack.
    pub(crate) fn flush(&mut self, out: &UnboundedSender<v1::WorkerMessage>) {
        for (run_id, held) in &mut self.runs {
            send_unsent_logs_in_window(run_id, held, out);
        }
    }

    /// The control plane renews leases on heartbeats, every third of a lease. Half a lease
    /// after the last word from it, its view of this worker's leases may be about to lapse
    /// and the attempts to be retried elsewhere: stop them here first.
    pub(crate) fn fence_if_stale(&mut self) {
        if self.fenced || self.last_contact.elapsed() < self.lease / 2 {
            return;
        }
        self.fenced = true;
        let mut stopped = 0;
        for held in self.runs.values() {
            if let Some(control) = &held.control {
                let _ = control.send(Control::Fence);
                stopped += 1;
            }
        }
        if stopped > 0 {
            tracing::warn!(
                runs = stopped,
                "no word from the control plane for half a lease: stopping running jobs"
            );
        }
    }

    pub(crate) fn stop_all(&mut self) {
        // Dropping the control senders stops every running process group.
        self.runs.clear();
    }
}
