//! What a request brings, decoded: ids in the path, JSON bodies and query strings, refused
//! with the field at fault named.

use crate::{ApiError, ApiResult};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use drover_core::{IdError, ValidationError};
use serde::de::DeserializeOwned;
use std::str::FromStr;

/// The id in a route's path (`/v1/nodes/{id}`), decoded by axum and parsed by the id's own
/// parser: the one way an id enters the HTTP API. What is not an id is 400 naming `id`.
/// Ids of what belongs to a user come through `auth::Owned`, which uses this.
pub(crate) struct PathId<T>(pub T);

impl<T, S> FromRequestParts<S> for PathId<T>
where
    T: FromStr<Err = IdError>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid("id", e.body_text()))?;
        Ok(PathId(raw.parse()?))
    }
}

/// Parses a JSON body, naming the field at fault (`env.FOO`, `timeout_ms`) on error.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::invalid("body", "a JSON object is required"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        ApiError::from(ValidationError::from_decode(
            &path,
            &e.into_inner().to_string(),
        ))
    })?;
    // One JSON value and nothing after it but white space.
    de.end().map_err(|e| {
        ApiError::invalid(
            "body",
            format!("trailing characters after the JSON value ({e})"),
        )
    })?;
    Ok(value)
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}
