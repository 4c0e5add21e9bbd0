//! Inference jobs: the node's loaded model generates on a blocking thread; each piece of text
//! becomes a log entry as it comes (so followers see tokens stream), and the completion with
//! its token counts and latency is the run's result. Cancel and timeout stop generation
//! between two tokens.

use crate::executor::{Control, ExecEvent, Execution, OutStream};
use drover_core::{RunOutcome, Timestamp};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// The models a node serves, by the name jobs use.
#[derive(Clone, Default)]
pub struct Models {
    loaded: HashMap<String, Arc<Mutex<drover_infer::Model>>>,
}

impl Models {
    /// Loads every model (at start: a node that cannot load its model refuses to start).
    pub async fn load(specs: &[(String, PathBuf)]) -> Result<Self, drover_infer::InferError> {
        let mut loaded = HashMap::new();
        for (name, path) in specs {
            let path = path.clone();
            let started = Instant::now();
            let model = tokio::task::spawn_blocking(move || drover_infer::Model::load(&path))
                .await
                .map_err(|e| drover_infer::InferError::Tokenizer(e.to_string()))??;
            tracing::info!(model = %name, took_ms = started.elapsed().as_millis() as u64, "model loaded");
            loaded.insert(name.clone(), Arc::new(Mutex::new(model)));
        }
        Ok(Self { loaded })
    }

    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.loaded.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn get(&self, name: &str) -> Option<Arc<Mutex<drover_infer::Model>>> {
        self.loaded.get(name).cloned()
    }
}

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const FENCED: u8 = 2;

/// Runs one inference job to its end, reporting like a process would.
pub async fn execute(
    exec: Execution,
    models: Models,
    events: UnboundedSender<ExecEvent>,
    mut control: UnboundedReceiver<Control>,
) {
    let run_id = exec.run_id;
    let exited = |outcome, error: Option<String>, result| ExecEvent::Exited {
        run_id,
        outcome,
        exit_code: Some(if outcome == RunOutcome::Succeeded {
            0
        } else {
            1
        }),
        error,
        result,
    };
    let Some(spec) = exec.spec.inference.clone() else {
        let _ = events.send(exited(
            RunOutcome::Failed,
            Some("an inference job without its inference spec".into()),
            None,
        ));
        return;
    };
    let Some(model) = models.get(&spec.model) else {
        let _ = events.send(exited(
            RunOutcome::Failed,
            Some(format!("this node does not serve model {:?}", spec.model)),
            None,
        ));
        return;
    };
    let _ = events.send(ExecEvent::Started { run_id });
    let stop = Arc::new(AtomicU8::new(RUNNING));
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while let Some(c) = control.recv().await {
                let why = match c {
                    Control::Cancel => CANCELLED,
                    Control::Fence => FENCED,
                };
                stop.store(why, Ordering::SeqCst);
            }
            // The control side went away: the run is no longer ours.
            stop.store(FENCED, Ordering::SeqCst);
        })
    };
    let deadline = exec
        .spec
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms.max(0) as u64));
    let out = events.clone();
    let blocking_stop = stop.clone();
    let generated = tokio::task::spawn_blocking(move || {
        let mut model = model.lock().unwrap_or_else(|p| p.into_inner());
        let prompt = match &spec.prompt {
            Some(p) => p.clone(),
            None => {
                let messages: Vec<drover_infer::ChatMessage> = spec
                    .messages
                    .iter()
                    .map(|m| drover_infer::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                model.chat_prompt(&messages)?
            }
        };
        let params = drover_infer::GenerateParams {
            max_tokens: spec.max_tokens.unwrap_or(256) as usize,
            temperature: spec.temperature.unwrap_or(0.0),
            top_p: spec.top_p,
            seed: spec.seed.unwrap_or(299_792_458),
            stop: spec.stop.clone(),
        };
        let mut timed_out = false;
        let generation = model.generate(&prompt, &params, |piece| {
            let _ = out.send(ExecEvent::Output {
                run_id,
                stream: OutStream::Stdout,
                timestamp: Timestamp::now(),
                data: piece.as_bytes().to_vec(),
            });
            if deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                return false;
            }
            blocking_stop.load(Ordering::SeqCst) == RUNNING
        })?;
        Ok::<_, drover_infer::InferError>((generation, timed_out))
    })
    .await;
    watcher.abort();
    let event = match generated {
        Ok(Ok((_, true))) => exited(RunOutcome::TimedOut, Some("timed out".into()), None),
        Ok(Ok((generation, false))) => match stop.load(Ordering::SeqCst) {
            CANCELLED => exited(RunOutcome::Cancelled, Some("cancelled".into()), None),
            FENCED => exited(
                RunOutcome::Failed,
                Some("stopped: lost the control plane".into()),
                None,
            ),
            _ => exited(
                RunOutcome::Succeeded,
                None,
                serde_json::to_value(&generation).ok(),
            ),
        },
        Ok(Err(e)) => exited(RunOutcome::Failed, Some(e.to_string()), None),
        Err(e) => exited(
            RunOutcome::Failed,
            Some(format!("inference panicked: {e}")),
            None,
        ),
    };
    let _ = events.send(event);
}
