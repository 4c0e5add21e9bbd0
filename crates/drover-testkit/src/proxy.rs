//! A TCP proxy that cuts and restores a worker's path to the control plane.

use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy the test can cut and restore, standing for a network path between a worker
/// and the control plane.
pub struct Proxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
    /// Set: bytes are dropped both ways, connections stay open (a black-holed path).
    dropping: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct ProxyState {
    cut: bool,
    connections: Vec<tokio::task::AbortHandle>,
}

/// Copies `from` to `to` until either ends; while `dropping` is set, what is read is
/// thrown away (packets lost on the way, the connection still open).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dropping: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dropping.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target_url: &str) -> Self {
        Self::balance(&[target_url]).await
    }

    /// A proxy in front of several targets, as a load balancer would be: each connection
    /// goes to the next target in turn, skipping those that refuse.
    pub async fn balance(target_urls: &[&str]) -> Self {
        let targets: Vec<String> = target_urls
            .iter()
            .map(|t| t.trim_start_matches("http://").to_string())
            .collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy addr"));
        let state: Arc<Mutex<ProxyState>> = Arc::default();
        let shared = state.clone();
        let dropping: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let dropping_in_accept = dropping.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut st = shared.lock().expect("proxy state");
                if st.cut {
                    drop(inbound);
                    continue;
                }
                let (targets, next) = (targets.clone(), next.clone());
                let dropping = dropping_in_accept.clone();
                let task = tokio::spawn(async move {
                    for _ in 0..targets.len() {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Ok(outbound) = TcpStream::connect(&targets[i % targets.len()]).await
                        {
                            let (in_read, in_write) = inbound.into_split();
                            let (out_read, out_write) = outbound.into_split();
                            tokio::select! {
                                () = forward(in_read, out_write, dropping.clone()) => {}
                                () = forward(out_read, in_write, dropping) => {}
                            }
                            return;
                        }
                    }
                    drop(inbound);
                });
                st.connections.push(task.abort_handle());
            }
        });
        Self {
            url,
            state,
            accept,
            dropping,
        }
    }

    /// Drops every byte both ways while keeping connections open, as a network path that
    /// loses packets does (nothing is refused, nothing answers), until [`Proxy::restore`].
    pub fn black_hole(&self) {
        self.dropping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        let mut st = self.state.lock().expect("proxy state");
        st.cut = true;
        for c in st.connections.drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().expect("proxy state").cut = false;
        self.dropping
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
