//! Who is calling and what they may do. Every route is public, for any user, or for admins
//! only (the route table in http.rs says which, and a test walks it); tokens are opaque,
//! stored hashed, and checked against the store on every request, so a logout or a
//! revocation takes effect at once on every replica.

use crate::extract::PathId;
use crate::{ApiError, AppState};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_core::{GroupId, JobId, ReservationId, RunId, Timestamp};
use drover_store::{AuditRecord, Role, UserRecord};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
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

/// At most `max` bytes of `text`, cut at a character boundary, with control characters
/// escaped; `…` marks a cut.
fn bounded(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars().flat_map(|c| {
        let escaped: Vec<char> = if c.is_control() {
            c.escape_debug().collect()
        } else {
            vec![c]
        };
        escaped
    }) {
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
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
    address_in(req.extensions())
}

fn address_in(extensions: &axum::http::Extensions) -> Option<String> {
    extensions
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
        // Bounded, whatever a caller put in a path or a name.
        let record = AuditRecord {
            seq: 0,
            at: Timestamp::now(),
            actor: actor.map(|a| bounded(a, 64)),
            action: action.to_string(),
            target: target.map(|t| bounded(&t, 256)),
            outcome: if refused { "refused" } else { "ok" }.to_string(),
            address: address.map(|a| bounded(&a, 64)),
            detail: detail.map(|d| bounded(&d, 512)),
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
    if admin && !caller.is_admin() {
        let e = ApiError::PermissionDenied(format!("{what} is for admins only"));
        refused(
            &state,
            Some(&caller.user.name),
            what,
            address,
            e.to_string(),
        )
        .await;
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

/// The id in a route's path (`/v1/jobs/{id}`, …) of something a user may touch only if it is
/// theirs: a job, a run, a group or a reservation. Handlers take their id only through this
/// extractor, so the id that is checked is the id that is used — parsed once by
/// [`PathId`], whatever form the caller sent (percent-encoded, upper case). What does not
/// exist is 404.
pub struct Owned<T>(pub T);

/// Something with an owner, found by its id.
pub trait OwnedKind: FromStr<Err = drover_core::IdError> + fmt::Display + Copy + Send {
    const KIND: &'static str;
    /// Its owner (None for what predates users); an error when it does not exist.
    fn owner(
        state: &AppState,
        id: Self,
    ) -> impl Future<Output = Result<Option<String>, ApiError>> + Send;
}

impl OwnedKind for JobId {
    const KIND: &'static str = "job";
    async fn owner(state: &AppState, id: Self) -> Result<Option<String>, ApiError> {
        Ok(state.store.get_job(id).await?.owner)
    }
}

impl OwnedKind for RunId {
    const KIND: &'static str = "run";
    async fn owner(state: &AppState, id: Self) -> Result<Option<String>, ApiError> {
        let run = state.store.get_run(id).await?;
        Ok(state.store.get_job(run.job_id).await?.owner)
    }
}

impl OwnedKind for GroupId {
    const KIND: &'static str = "group";
    async fn owner(state: &AppState, id: Self) -> Result<Option<String>, ApiError> {
        let group = state.store.get_group(id).await?;
        Ok(group.jobs.first().and_then(|j| j.owner.clone()))
    }
}

impl OwnedKind for ReservationId {
    const KIND: &'static str = "reservation";
    async fn owner(state: &AppState, id: Self) -> Result<Option<String>, ApiError> {
        Ok(state.store.get_reservation(id).await?.owner)
    }
}

impl<T: OwnedKind> FromRequestParts<Arc<AppState>> for Owned<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let PathId(id) = PathId::<T>::from_request_parts(parts, state).await?;
        let caller = parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::Internal("an owned id on a route without a signed-in caller".into())
        })?;
        let request = format!("{} {}", parts.method, parts.uri.path());
        check_owner(state, &caller, id, request, address_in(&parts.extensions)).await?;
        Ok(Owned(id))
    }
}

/// Refuses (403, audited as `request`) when `id` is not the caller's; admins may touch
/// anything. What does not exist is 404. The one ownership check of both APIs.
pub async fn check_owner<T: OwnedKind>(
    state: &AppState,
    caller: &Caller,
    id: T,
    request: String,
    address: Option<String>,
) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    let owner = T::owner(state, id).await?;
    if caller.may_touch(owner.as_deref()) {
        return Ok(());
    }
    let e = ApiError::PermissionDenied(format!("{} {id} belongs to another user", T::KIND));
    refused(
        state,
        Some(&caller.user.name),
        request,
        address,
        e.to_string(),
    )
    .await;
    Err(e)
}

/// Slows down password guessing without letting anyone lock a user out:
/// - an address with `LOGIN_FAILURES` failed logins within `LOGIN_WINDOW` (whatever the
///   names) is refused until the window passes;
/// - a user with that many failures (from anywhere) has every login attempt slowed by
///   `USER_SLOWDOWN`, the right password from another address included, but not refused.
///
/// Only existing users are counted, and at most `MAX_ADDRESSES` addresses, so that its
/// memory is bounded whatever an anonymous caller sends.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<LoginFailures>,
}

#[derive(Default)]
struct LoginFailures {
    by_address: HashMap<String, Vec<Instant>>,
    by_user: HashMap<String, Vec<Instant>>,
}

const LOGIN_FAILURES: usize = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
const USER_SLOWDOWN: Duration = Duration::from_secs(1);
const MAX_ADDRESSES: usize = 10_000;

/// The failures still in the window, at most [`LOGIN_FAILURES`] of them.
fn recent(times: &mut Vec<Instant>) -> usize {
    times.retain(|t| t.elapsed() < LOGIN_WINDOW);
    times.len()
}

fn record(map: &mut HashMap<String, Vec<Instant>>, key: &str) {
    let times = map.entry(key.to_string()).or_default();
    recent(times);
    if times.len() >= LOGIN_FAILURES {
        times.remove(0);
    }
    times.push(Instant::now());
}

impl LoginLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, LoginFailures> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds to wait before this address may try again, if it reached the limit.
    pub fn blocked(&self, address: Option<&str>) -> Option<u64> {
        let mut failures = self.lock();
        let times = failures.by_address.get_mut(address?)?;
        if recent(times) < LOGIN_FAILURES {
            return None;
        }
        let oldest = times.first()?;
        Some(LOGIN_WINDOW.saturating_sub(oldest.elapsed()).as_secs() + 1)
    }

    /// How long a login attempt for this user waits first.
    pub fn slowdown(&self, user_id: &str) -> Duration {
        let mut failures = self.lock();
        let failed = failures.by_user.get_mut(user_id).map_or(0, recent);
        if failed >= LOGIN_FAILURES {
            USER_SLOWDOWN
        } else {
            Duration::ZERO
        }
    }

    /// A failed login: for the user, when one of that name exists, and the address.
    pub fn failed(&self, user_id: Option<&str>, address: Option<&str>) {
        let mut failures = self.lock();
        if let Some(user_id) = user_id {
            record(&mut failures.by_user, user_id);
        }
        if let Some(address) = address {
            if failures.by_address.len() >= MAX_ADDRESSES {
                failures.by_address.retain(|_, times| recent(times) > 0);
            }
            // Past the bound, start over: a caller with that many addresses is not held
            // back by a limit per address anyway.
            if failures.by_address.len() >= MAX_ADDRESSES {
                failures.by_address.clear();
            }
            record(&mut failures.by_address, address);
        }
    }

    pub fn succeeded(&self, user_id: &str, address: Option<&str>) {
        let mut failures = self.lock();
        failures.by_user.remove(user_id);
        if let Some(address) = address {
            failures.by_address.remove(address);
        }
    }

    /// Addresses and users it keeps failures of (for tests of its bound).
    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        let failures = self.lock();
        (failures.by_address.len(), failures.by_user.len())
    }
}

/// An argon2id hash of a random password, verified against when a login names no user, so
/// that an unknown name takes as long as a wrong password.
pub fn unknown_user_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let password: [u8; 16] = rand::random();
        let Ok(salt) = SaltString::encode_b64(&rand::random::<[u8; 16]>()) else {
            return String::new();
        };
        Argon2::default()
            .hash_password(&password, &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guessing_address_is_refused_and_its_victim_only_slowed() {
        let limiter = LoginLimiter::default();
        for _ in 0..LOGIN_FAILURES {
            assert_eq!(limiter.blocked(Some("10.0.0.1")), None);
            limiter.failed(Some("admin-id"), Some("10.0.0.1"));
        }
        assert!(limiter.blocked(Some("10.0.0.1")).is_some());
        // The admin, elsewhere, is not refused: only slowed.
        assert_eq!(limiter.blocked(Some("10.0.0.2")), None);
        assert_eq!(limiter.slowdown("admin-id"), USER_SLOWDOWN);
        assert_eq!(limiter.slowdown("other-id"), Duration::ZERO);
        limiter.succeeded("admin-id", Some("10.0.0.2"));
        assert_eq!(limiter.slowdown("admin-id"), Duration::ZERO);
    }

    #[test]
    fn the_limiter_memory_is_bounded() {
        let limiter = LoginLimiter::default();
        for i in 0..(MAX_ADDRESSES + 500) {
            limiter.failed(None, Some(&format!("addr-{i}")));
        }
        let (addresses, users) = limiter.tracked();
        assert!(addresses <= MAX_ADDRESSES, "{addresses}");
        assert_eq!(users, 0, "only existing users are counted");
        for _ in 0..100 {
            limiter.failed(Some("u"), Some("a"));
        }
        assert!(limiter.lock().by_user["u"].len() <= LOGIN_FAILURES);
    }

    #[test]
    fn audit_fields_are_bounded_and_escaped() {
        assert_eq!(bounded("short", 64), "short");
        let long = bounded(&"é".repeat(1000), 64);
        assert!(long.len() <= 64 + '…'.len_utf8(), "{}", long.len());
        assert!(long.ends_with('…'));
        assert_eq!(bounded("a\nb", 64), "a\\nb");
    }
}
