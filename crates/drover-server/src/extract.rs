//! What a request brings, decoded: JSON bodies and query strings, refused with the field
//! at fault named.

use crate::{ApiError, ApiResult};
use axum::body::Bytes;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use drover_core::ValidationError;
use serde::de::DeserializeOwned;

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
