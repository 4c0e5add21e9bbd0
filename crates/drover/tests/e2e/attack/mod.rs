//! The attack suite: what an ordinary user (role `user`) tries in order to reach what is not
//! theirs, and what drover must refuse. Two halves:
//!
//! - **Isolation** (isolation.rs): a job that probes its surroundings — the control plane's
//!   database, the node's credential, the CLI's credentials, another job's scratch
//!   directory, the host's files, processes and network, the Docker socket, its capabilities
//!   and user, the worker's environment — in every isolation mode, under a root worker
//!   (`drover up`, as people run it) and under an unprivileged worker. Their directories
//!   live under the build's own temporary directory, not /tmp: a sandbox replaces /tmp with
//!   a tmpfs of its own, and a secret hidden only by that would prove nothing.
//! - **API** (api.rs): every route with an owned id in every form that names the same thing
//!   (raw, percent-encoded, upper case, trailing slash), oversized and malformed input from
//!   anonymous callers, a lock-out attempt, login timing, races on one-time and refresh
//!   tokens (run again on PostgreSQL by scripts/test), secrets in `--help`, holding a shared
//!   resource from everyone.

mod api;
mod isolation;

use drover_client::Client;

pub(crate) async fn plain_user(admin: &Client, url: &str, name: &str) -> Client {
    let password = format!("{name}-password");
    admin
        .create_user(name, &password, "user")
        .await
        .expect("create user");
    let tokens = Client::new(url)
        .expect("client")
        .login(name, &password)
        .await
        .expect("login");
    Client::new(url)
        .expect("client")
        .with_token(tokens.access_token)
}
