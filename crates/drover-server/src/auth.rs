//! Who is calling and what they may do. Every route is public, for any user, or for admins
//! only (the route table in http.rs says which, and a test walks it); tokens are opaque,
//! stored hashed, and checked against the store on every request, so a logout or a
//! revocation takes effect at once on every replica.

use crate::{ApiError, AppState};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_core::Timestamp;
use drover_store::{AuditRecord, Role, UserRecord};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: UserRecord,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }

    /// The owner filter for listings: none for an admin, the caller for a user.
    pub fn owner_filter(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.user.id.as_str())
    }

    /// An admin may touch anything; a user what they own.
    pub fn may_touch(&self, owner: Option<&str>) -> bool {
        self.is_admin() || owner == Some(self.user.id.as_str())
    }
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::Internal(format!("cannot hash the password: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub fn address_of(req: &Request) -> Option<String> {
    req.extensions()
        .get::<axum::extract::ConnectInfo<crate::listener::PeerAddr>>()
        .map(|c| c.0.0.ip().to_string())
}

impl AppState {
    /// Appends to the audit trail; a failure to do so is logged, never hidden.
    pub async fn audit(
        &self,
        actor: Option<&str>,
        action: &str,
        target: Option<String>,
        refused: bool,
        address: Option<String>,
        detail: Option<String>,
    ) {
        let record = AuditRecord {
            seq: 0,
            at: Timestamp::now(),
            actor: actor.map(str::to_string),
            action: action.to_string(),
            target,
            outcome: if refused { "refused" } else { "ok" }.to_string(),
            address,
            detail,
        };
        if let Err(e) = self.store.audit(&record).await {
            tracing::error!(error = %e, action, "cannot write the audit trail");
        }
    }

    /// The user a token speaks for.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        let token = token.ok_or_else(|| {
            ApiError::Unauthenticated(
                "this endpoint needs `Authorization: Bearer TOKEN` (drover login, or an API \
                 token from drover token create)"
                    .into(),
            )
        })?;
        if let Some(user) = self.tokens.get(token) {
            return Ok(Caller { user });
        }
        let (user, expires_at) = self.store.authenticate_token_until(token).await?;
        self.tokens.put(token, &user, expires_at);
        Ok(Caller { user })
    }

    /// After tokens were revoked: no replica may honour them from its cache any longer.
    pub async fn tokens_revoked(&self) {
        self.tell_everywhere(drover_store::Wakeup::TokensRevoked)
            .await;
    }
}

/// Middleware of routes for any signed-in user.
pub(crate) async fn require_user(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    guard(state, req, next, false).await
}

/// Middleware of routes for admins only.
pub(crate) async fn require_admin(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    guard(state, req, next, true).await
}

async fn guard(state: Arc<AppState>, mut req: Request, next: Next, admin: bool) -> Response {
    let address = address_of(&req);
    let what = format!("{} {}", req.method(), req.uri().path());
    let token = bearer(req.headers()).map(str::to_string);
    let caller = match state.authenticate(token.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            if token.is_some() {
                refused(&state, None, what, address, e.to_string()).await;
            }
            return e.into_response();
        }
    };
    let allowed = if admin && !caller.is_admin() {
        Err(ApiError::PermissionDenied(format!(
            "{what} is for admins only"
        )))
    } else {
        check_ownership(&state, &caller, req.uri().path()).await
    };
    if let Err(e) = allowed {
        if matches!(e, ApiError::PermissionDenied(_)) {
            refused(
                &state,
                Some(&caller.user.name),
                what,
                address,
                e.to_string(),
            )
            .await;
        }
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// A refused request, for the audit trail.
async fn refused(
    state: &AppState,
    actor: Option<&str>,
    what: String,
    address: Option<String>,
    why: String,
) {
    state
        .audit(actor, "request", Some(what), true, address, Some(why))
        .await;
}

/// A user may act on a job, run, group or reservation only if it is theirs. What does not
/// exist is left to the handler (404).
async fn check_ownership(state: &AppState, caller: &Caller, path: &str) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("v1"), Some(kind), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(());
    };
    let owner = match kind {
        "jobs" => match id.parse() {
            Ok(id) => state.store.get_job(id).await.ok().map(|j| j.owner),
            Err(_) => None,
        },
        "runs" => match id.parse() {
            Ok(id) => match state.store.get_run(id).await {
                Ok(run) => state.store.get_job(run.job_id).await.ok().map(|j| j.owner),
                Err(_) => None,
            },
            Err(_) => None,
        },
        "groups" => match id.parse() {
            Ok(id) => state
                .store
                .get_group(id)
                .await
                .ok()
                .map(|g| g.jobs.first().and_then(|j| j.owner.clone())),
            Err(_) => None,
        },
        "reservations" => match id.parse() {
            Ok(id) => state.store.get_reservation(id).await.ok().map(|r| r.owner),
            Err(_) => None,
        },
        _ => None,
    };
    match owner {
        Some(owner) if !caller.may_touch(owner.as_deref()) => Err(ApiError::PermissionDenied(
            format!("{kind}/{id} belongs to another user"),
        )),
        _ => Ok(()),
    }
}

/// Slows down password guessing: after `LOGIN_FAILURES` failures within `LOGIN_WINDOW`
/// for one user name or one address, logins from there are refused until the window passes.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

const LOGIN_FAILURES: usize = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

impl LoginLimiter {
    fn keys(user: &str, address: Option<&str>) -> Vec<String> {
        let mut keys = vec![format!("user:{user}")];
        if let Some(a) = address {
            keys.push(format!("addr:{a}"));
        }
        keys
    }

    /// Seconds to wait before trying again, if the limit is reached.
    pub fn blocked(&self, user: &str, address: Option<&str>) -> Option<u64> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = None;
        for key in Self::keys(user, address) {
            if let Some(times) = map.get_mut(&key) {
                times.retain(|t| t.elapsed() < LOGIN_WINDOW);
                if times.len() >= LOGIN_FAILURES
                    && let Some(oldest) = times.first()
                {
                    let left = LOGIN_WINDOW.saturating_sub(oldest.elapsed()).as_secs() + 1;
                    wait = Some(wait.map_or(left, |w: u64| w.max(left)));
                }
            }
        }
        wait
    }

    pub fn failed(&self, user: &str, address: Option<&str>) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for key in Self::keys(user, address) {
            map.entry(key).or_default().push(Instant::now());
        }
    }

    pub fn succeeded(&self, user: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&format!("user:{user}"));
    }
}

/// Bearer tokens found valid a moment ago, so that a burst of API calls costs one lookup
/// rather than one each. A token is never honoured past its own expiry; a revocation clears
/// the cache here and, by a wake-up, on every replica. A replica that missed that wake-up
/// (its LISTEN connection was down) honours a revoked token for at most [`TOKEN_CACHE_TTL`].
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, CachedToken>>,
}

struct CachedToken {
    user: UserRecord,
    expires_at: Timestamp,
    checked: Instant,
}

pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
/// A bound on memory: past it the cache starts over.
const MAX_CACHED_TOKENS: usize = 10_000;

impl TokenCache {
    pub fn get(&self, token: &str) -> Option<UserRecord> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(token)?;
        if entry.checked.elapsed() < TOKEN_CACHE_TTL && Timestamp::now() < entry.expires_at {
            return Some(entry.user.clone());
        }
        entries.remove(token);
        None
    }

    pub fn put(&self, token: &str, user: &UserRecord, expires_at: Timestamp) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_CACHED_TOKENS {
            entries.clear();
        }
        let entry = CachedToken {
            user: user.clone(),
            expires_at,
            checked: Instant::now(),
        };
        entries.insert(token.to_string(), entry);
    }

    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
