//! Signing in, API tokens, users and the audit trail.

use crate::auth::{Caller, hash_password, verify_password};
use crate::extract::{parse_body, query};
use crate::{ApiError, ApiResult, SharedState};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    username: String,
    password: String,
}

pub(super) async fn login(
    State(state): SharedState,
    axum::extract::ConnectInfo(crate::listener::PeerAddr(peer)): axum::extract::ConnectInfo<
        crate::listener::PeerAddr,
    >,
    body: Bytes,
) -> ApiResult<Json<drover_store::IssuedTokens>> {
    let req: LoginRequest = parse_body(&body)?;
    let address = Some(peer.ip().to_string());
    // Nothing of an oversized or malformed name is looked up, limited by or kept: no user
    // has such a name, and the audit trail must not grow by what an anonymous caller sends.
    let name_ok = drover_core::access::validate_user_name(&req.username).is_ok();
    if req.password.len() > drover_core::access::MAX_PASSWORD_BYTES {
        return Err(ApiError::invalid("password", "at most 1024 bytes"));
    }
    let name = name_ok.then_some(req.username.as_str());
    if let Some(wait) = state.logins.blocked(address.as_deref()) {
        state
            .audit(
                name,
                "login",
                None,
                true,
                address,
                Some("rate limited".into()),
            )
            .await;
        return Err(ApiError::TooManyRequests(format!(
            "too many failed logins from this address; try again in {wait} s"
        )));
    }
    let found = match name {
        Some(name) => state.store.user_by_name(name).await?,
        None => None,
    };
    if let Some((user, _)) = &found {
        // A user whose password is being guessed from many addresses: every attempt at it
        // is slowed, none refused, so the right password still gets in.
        let slow = state.logins.slowdown(&user.id);
        if !slow.is_zero() {
            tokio::time::sleep(slow).await;
        }
    }
    // An unknown user costs a verification too, so that the time taken does not tell
    // whether a user exists.
    let user_id = found.as_ref().map(|(u, _)| u.id.clone());
    let password = req.password.clone();
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), hash),
        None => (None, crate::auth::unknown_user_hash().to_string()),
    };
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else {
        state.logins.failed(user_id.as_deref(), address.as_deref());
        let detail = if name_ok {
            "wrong user name or password"
        } else {
            "not a valid user name"
        };
        state
            .audit(name, "login", None, true, address, Some(detail.into()))
            .await;
        return Err(ApiError::Unauthenticated(
            "wrong user name or password".into(),
        ));
    };
    state.logins.succeeded(&user.id, address.as_deref());
    let tokens = state
        .store
        .issue_tokens(&user.id, state.config.access_ttl, state.config.refresh_ttl)
        .await?;
    state
        .audit(Some(&user.name), "login", None, false, address, None)
        .await;
    Ok(Json(tokens))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshRequest {
    refresh_token: String,
}

pub(super) async fn refresh(
    State(state): SharedState,
    body: Bytes,
) -> ApiResult<Json<drover_store::IssuedTokens>> {
    let req: RefreshRequest = parse_body(&body)?;
    match state
        .store
        .rotate_refresh(
            &req.refresh_token,
            state.config.access_ttl,
            state.config.refresh_ttl,
        )
        .await
    {
        Ok((_, tokens)) => Ok(Json(tokens)),
        Err(e) => {
            // A reused refresh token revoked its whole login.
            state.tokens_revoked().await;
            state
                .audit(None, "token.refresh", None, true, None, Some(e.to_string()))
                .await;
            Err(e.into())
        }
    }
}

pub(super) async fn logout(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    if let Some(token) = crate::auth::bearer(&headers)
        && token.starts_with("drover_at_")
    {
        state.store.revoke_family(token).await?;
        state.tokens_revoked().await;
    }
    state
        .audit(Some(&caller.user.name), "logout", None, false, None, None)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn whoami(Extension(caller): Extension<Caller>) -> Json<drover_store::UserRecord> {
    Json(caller.user)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiTokenRequest {
    name: String,
    expires_in_ms: Option<u64>,
    expires_in_seconds: Option<u64>,
}

fn default_token_ttl() -> u64 {
    90 * 24 * 3600
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedToken {
    #[serde(flatten)]
    record: drover_store::ApiTokenRecord,
    /// Shown once: only its hash is kept.
    token: String,
}

pub(super) async fn create_api_token(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let req: ApiTokenRequest = parse_body(&body)?;
    if req.name.trim().is_empty() || req.name.len() > 128 || req.name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "name",
            "1-128 characters, no control characters",
        ));
    }
    let expires_in = drover_core::validation::duration_field(
        ("expires_in_ms", req.expires_in_ms),
        ("expires_in_seconds", req.expires_in_seconds),
        Duration::from_secs(default_token_ttl()),
        Duration::from_secs(5 * 365 * 24 * 3600),
        "5 years",
    )?;
    let (record, token) = state
        .store
        .create_api_token(&caller.user.id, &req.name, expires_in)
        .await?;
    state
        .audit(
            Some(&caller.user.name),
            "token.create",
            Some(record.id.clone()),
            false,
            None,
            Some(req.name),
        )
        .await;
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

pub(super) async fn list_api_tokens(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<drover_store::ApiTokenRecord>>> {
    Ok(Json(
        state.store.list_api_tokens(caller.owner_filter()).await?,
    ))
}

pub(super) async fn revoke_api_token(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<drover_store::ApiTokenRecord>> {
    let record = state
        .store
        .revoke_api_token(&id, caller.owner_filter())
        .await?;
    state.tokens_revoked().await;
    state
        .audit(
            Some(&caller.user.name),
            "token.revoke",
            Some(id),
            false,
            None,
            None,
        )
        .await;
    Ok(Json(record))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserRequest {
    name: String,
    password: String,
    #[serde(default = "default_role")]
    role: String,
}

fn default_role() -> String {
    "user".into()
}

pub(super) async fn create_user(
    State(state): SharedState,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<drover_store::UserRecord>)> {
    let req: UserRequest = parse_body(&body)?;
    drover_core::access::validate_user_name(&req.name)?;
    drover_core::access::validate_new_password(&req.password)?;
    let role = drover_store::Role::parse(&req.role)
        .ok_or_else(|| ApiError::invalid("role", "admin or user"))?;
    let password = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let user = state.store.create_user(&req.name, role, &hash).await?;
    state
        .audit(
            Some(&caller.user.name),
            "user.create",
            Some(user.name.clone()),
            false,
            None,
            Some(role.as_str().into()),
        )
        .await;
    Ok((StatusCode::CREATED, Json(user)))
}

pub(super) async fn list_users(
    State(state): SharedState,
) -> ApiResult<Json<Vec<drover_store::UserRecord>>> {
    Ok(Json(state.store.list_users().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    limit: Option<u32>,
}

pub(super) async fn list_audit(
    State(state): SharedState,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<drover_store::AuditRecord>>> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(200).clamp(1, 10_000);
    Ok(Json(state.store.list_audit(limit).await?))
}
