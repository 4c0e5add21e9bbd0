//! What a reservation request may ask for. The control plane decides when it is granted
//! (see `drover_core::schedule::admit_reservations`); these are the rules of its fields.

use crate::ids::WorkerId;
use crate::validation::{
    ValidationError, check_resource_amount, check_resource_name, duration_field,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(60);
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(24 * 3600);

/// `POST /v1/reservations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationRequest {
    /// The named resource to hold (`ollama`).
    pub resource: String,
    /// How much of it (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u32>,
    /// The node to hold it on; by default a connected node offering it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How long it is held once active, in milliseconds like every duration of the API
    /// (default 60 000). A pending reservation that waits this long expires unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// The same in seconds: the field's first name, still read for older clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// When the resource is busy: `true` (default) grants the reservation as PENDING, made
    /// ACTIVE when the resource frees and before any queued job takes it; `false` refuses
    /// it (409) instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

/// A request that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidReservation {
    pub resource: String,
    pub amount: u32,
    pub node: Option<WorkerId>,
    pub ttl: Duration,
    pub wait: bool,
}

impl ReservationRequest {
    pub fn validated(self) -> Result<ValidReservation, ValidationError> {
        check_resource_name("resource", &self.resource)?;
        let amount = self.amount.unwrap_or(1);
        check_resource_amount("amount", amount)?;
        let node = self
            .node
            .as_deref()
            .map(|n| {
                n.parse::<WorkerId>()
                    .map_err(|e| ValidationError::new("node", e.to_string()))
            })
            .transpose()?;
        let ttl = duration_field(
            ("ttl_ms", self.ttl_ms),
            ("ttl_seconds", self.ttl_seconds),
            DEFAULT_RESERVATION_TTL,
            MAX_RESERVATION_TTL,
            "24 hours",
        )?;
        Ok(ValidReservation {
            resource: self.resource,
            amount,
            node,
            ttl,
            wait: self.wait.unwrap_or(true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Result<ValidReservation, ValidationError> {
        serde_json::from_str::<ReservationRequest>(json)
            .expect("parses")
            .validated()
    }

    #[test]
    fn defaults_are_one_unit_for_a_minute_waiting_if_busy() {
        let r = request(r#"{"resource":"ollama"}"#).unwrap();
        assert_eq!(
            (r.amount, r.ttl, r.wait, r.node),
            (1, DEFAULT_RESERVATION_TTL, true, None)
        );
    }

    #[test]
    fn each_rule_names_its_field() {
        let field = |json: &str| request(json).unwrap_err().field;
        assert_eq!(field(r#"{"resource":"a b"}"#), "resource");
        assert_eq!(field(r#"{"resource":"gpu","amount":0}"#), "amount");
        assert_eq!(field(r#"{"resource":"gpu","node":"nope"}"#), "node");
        assert_eq!(field(r#"{"resource":"gpu","ttl_ms":0}"#), "ttl_ms");
        assert_eq!(
            field(r#"{"resource":"gpu","ttl_seconds":90000}"#),
            "ttl_seconds"
        );
        assert_eq!(
            field(r#"{"resource":"gpu","ttl_seconds":1,"ttl_ms":1000}"#),
            "ttl_seconds"
        );
    }

    #[test]
    fn seconds_and_milliseconds_mean_the_same_duration() {
        let ms = request(r#"{"resource":"gpu","ttl_ms":90000}"#).unwrap();
        let s = request(r#"{"resource":"gpu","ttl_seconds":90}"#).unwrap();
        assert_eq!(ms.ttl, s.ttl);
    }
}
