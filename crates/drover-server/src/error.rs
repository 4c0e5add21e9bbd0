//! Errors as the APIs show them: a status, a stable code, the field at fault, a message.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drover_core::records::{ErrorBody, ErrorDetail};
use drover_core::{IdError, ValidationError};
use drover_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("model {0:?}: no node serves it")]
    ModelNotFound(String),
    /// The store cannot be reached now (a database restart or outage): try again.
    #[error("the database is unavailable, try again: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_argument",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::TooManyRequests(_) => "resource_exhausted",
            Self::ModelNotFound(_) => "model_not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::Invalid {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        Self::invalid("id", e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::NotFound(e.to_string()),
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Invalid { field, message } => Self::invalid(field, message),
            StoreError::Transition(t) => Self::Conflict(t.to_string()),
            StoreError::JoinTokenRefused(_)
            | StoreError::NodeCredentialRefused
            | StoreError::UserTokenRefused(_) => Self::Unauthenticated(e.to_string()),
            StoreError::NotYourRun { .. } => Self::PermissionDenied(e.to_string()),
            ref unavailable if unavailable.is_unavailable() => {
                tracing::warn!(error = %unavailable, "the store is unavailable");
                Self::Unavailable(unavailable.to_string())
            }
            other => {
                tracing::error!(error = %other, "store failure");
                Self::Internal(other.to_string())
            }
        }
    }
}

impl ApiError {
    /// The error as the API shows it.
    pub fn detail(&self) -> ErrorDetail {
        let field = match self {
            Self::Invalid { field, .. } => Some(field.clone()),
            Self::ModelNotFound(_) => Some("model".to_string()),
            _ => None,
        };
        ErrorDetail {
            code: self.code().to_string(),
            field,
            message: self.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.detail(),
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::Invalid { .. } => Self::invalid_argument(message),
            ApiError::NotFound(_) => Self::not_found(message),
            ApiError::Conflict(_) => Self::failed_precondition(message),
            ApiError::Unauthenticated(_) => Self::unauthenticated(message),
            ApiError::PermissionDenied(_) => Self::permission_denied(message),
            ApiError::TooManyRequests(_) => Self::resource_exhausted(message),
            ApiError::ModelNotFound(_) => Self::not_found(message),
            ApiError::Unavailable(_) => Self::unavailable(message),
            ApiError::Internal(_) => Self::internal(message),
        }
    }
}
