//! Time-ordered identifiers (UUIDv7): sorting ids sorts by creation time, which gives FIFO
//! order for free.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {value:?} is not a valid UUID")]
pub struct IdError {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! id_type {
    ($name:ident, $kind:literal) => {
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// When the id was made (UUIDv7 carries its creation time in milliseconds).
            pub fn created_at(&self) -> Option<crate::Timestamp> {
                let (secs, nanos) = self.0.get_timestamp()?.to_unix();
                Some(crate::Timestamp(
                    secs as i64 * 1_000_000 + i64::from(nanos / 1_000),
                ))
            }
        }

        // An id is a UUID string in the API.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::Custom("uuid".into())))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError {
                    kind: $kind,
                    value: s.chars().take(64).collect(),
                })
            }
        }
    };
}

id_type!(JobId, "job");
id_type!(RunId, "run");
id_type!(WorkerId, "worker");
id_type!(GroupId, "group");
id_type!(ReservationId, "reservation");
id_type!(WebhookId, "webhook");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
    }

    #[test]
    fn malformed_id_names_its_kind() {
        let err = "not-an-id".parse::<RunId>().unwrap_err();
        assert_eq!(err.to_string(), "run id \"not-an-id\" is not a valid UUID");
    }
}
