//! Log files: one append-only file per run, indexed in the store. The index is the truth:
//! bytes past its size are a write the store never confirmed and are cut off on reopen, and
//! entries at or below its last sequence number are duplicates and dropped (invariant 5).
//!
//! Record format, little-endian: seq u64 | stream u8 | timestamp_us i64 | len u32 | bytes.

use drover_core::{RunId, Timestamp};
use drover_store::{LogIndex, Store, StoreError};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Mutex;

const HEADER: usize = 8 + 1 + 8 + 4;

pub use drover_core::records::LogStream as Stream;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub stream: Stream,
    pub timestamp: Timestamp,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct OpenLog {
    file: std::fs::File,
    index: LogIndex,
}

pub struct LogFiles {
    dir: PathBuf,
    store: Arc<dyn Store>,
    open: std::sync::Mutex<HashMap<RunId, Arc<Mutex<Option<OpenLog>>>>>,
}

impl LogFiles {
    pub fn new(dir: PathBuf, store: Arc<dyn Store>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        Ok(Self {
            dir,
            store,
            open: Default::default(),
        })
    }

    fn path(&self, run_id: RunId) -> PathBuf {
        self.dir.join(format!("{run_id}.log"))
    }

    fn slot(&self, run_id: RunId) -> Arc<Mutex<Option<OpenLog>>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(run_id)
            .or_default()
            .clone()
    }

    /// Appends entries not stored yet, in sequence order, and returns the highest stored
    /// sequence number (what the worker may forget).
    pub async fn append(&self, run_id: RunId, mut entries: Vec<Entry>) -> Result<u64, LogError> {
        let slot = self.slot(run_id);
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = Some(self.open_log(run_id).await?);
        }
        let Some(log) = guard.as_mut() else {
            unreachable!("opened above")
        };
        entries.sort_by_key(|e| e.seq);
        let mut buf = Vec::new();
        let mut index = log.index.clone();
        for e in entries {
            if e.seq <= index.last_seq {
                continue;
            }
            index.gaps += e.seq - index.last_seq - 1;
            index.last_seq = e.seq;
            index.entry_count += 1;
            buf.extend_from_slice(&e.seq.to_le_bytes());
            buf.push(e.stream.number());
            buf.extend_from_slice(&e.timestamp.as_micros().to_le_bytes());
            buf.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&e.data);
        }
        if buf.is_empty() {
            return Ok(index.last_seq);
        }
        index.size_bytes += buf.len() as u64;
        let written = match log.file.write_all(&buf) {
            Ok(()) => self
                .store
                .put_log_index(&index)
                .await
                .map_err(LogError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            // Bytes the index does not confirm: the file is opened again (which cuts them
            // off) before the next append, so that what the worker resends lands right
            // after the confirmed size instead of after them.
            *guard = None;
            return Err(e);
        }
        log.index = index;
        metrics::counter!("drover_log_bytes_stored_total").increment(buf.len() as u64);
        Ok(log.index.last_seq)
    }

    async fn open_log(&self, run_id: RunId) -> Result<OpenLog, LogError> {
        let path = self.path(run_id);
        let index = match self.store.log_index(run_id).await? {
            Some(index) => index,
            None => LogIndex {
                run_id,
                uri: format!("file://{}", path.display()),
                size_bytes: 0,
                entry_count: 0,
                last_seq: 0,
                gaps: 0,
            },
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        // Cut off a tail the index never confirmed (a crash between write and commit).
        file.set_len(index.size_bytes)?;
        file.seek(SeekFrom::End(0))?;
        Ok(OpenLog { file, index })
    }

    /// Closes the run's file handle; the file and its index stay.
    pub fn close(&self, run_id: RunId) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run_id);
    }

    /// Reads the entries stored between byte `offset` and the committed size. Returns them
    /// with the offset to continue from.
    pub async fn read_from(
        &self,
        run_id: RunId,
        offset: u64,
        max_bytes: u64,
    ) -> Result<(Vec<Entry>, u64), LogError> {
        let Some(index) = self.store.log_index(run_id).await? else {
            return Ok((Vec::new(), 0));
        };
        // The file of the replica that stored it (replicas share a file system, or one
        // replica serves all).
        let path = index
            .uri
            .strip_prefix("file://")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.path(run_id));
        tokio::task::spawn_blocking(move || read_records(path, offset, index.size_bytes, max_bytes))
            .await
            .map_err(|e| LogError::Io(std::io::Error::other(e)))?
    }
}

fn read_records(
    path: PathBuf,
    offset: u64,
    committed: u64,
    max_bytes: u64,
) -> Result<(Vec<Entry>, u64), LogError> {
    if offset >= committed {
        return Ok((Vec::new(), offset));
    }
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let want = (committed - offset).min(max_bytes.max(HEADER as u64 + 65_536));
    let mut buf = vec![0u8; want as usize];
    file.read_exact(&mut buf)?;
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos + HEADER <= buf.len() {
        let h = &buf[pos..pos + HEADER];
        let seq = u64::from_le_bytes(h[0..8].try_into().unwrap_or_default());
        let stream = Stream::from_number(h[8]).unwrap_or(Stream::Stdout);
        let ts = i64::from_le_bytes(h[9..17].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(h[17..21].try_into().unwrap_or_default()) as usize;
        if pos + HEADER + len > buf.len() {
            break;
        }
        entries.push(Entry {
            seq,
            stream,
            timestamp: Timestamp(ts),
            data: buf[pos + HEADER..pos + HEADER + len].to_vec(),
        });
        pos += HEADER + len;
    }
    Ok((entries, offset + pos as u64))
}
