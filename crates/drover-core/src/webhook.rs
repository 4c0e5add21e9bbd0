//! What a webhook subscription may ask for (`POST /v1/webhooks`), and its rules.

use crate::records::webhook_events;
use crate::validation::ValidationError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// Where deliveries are POSTed: an http:// or https:// URL with a host.
    pub url: String,
    /// The HMAC-SHA256 signing secret, 8-256 bytes; generated (and shown once) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Event names delivered (`job.run.completed`, …); empty means all.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookRequest {
    pub fn validated(self) -> Result<Self, ValidationError> {
        let url = url::Url::parse(&self.url)
            .map_err(|e| ValidationError::new("url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(ValidationError::new(
                "url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        if let Some(e) = self
            .events
            .iter()
            .find(|e| !webhook_events::ALL.contains(&e.as_str()))
        {
            return Err(ValidationError::new(
                "events",
                format!(
                    "unknown event {e:?}; one of {}",
                    webhook_events::ALL.join(", ")
                ),
            ));
        }
        if let Some(secret) = &self.secret
            && !(8..=256).contains(&secret.len())
        {
            return Err(ValidationError::new("secret", "must be 8-256 bytes"));
        }
        Ok(Self {
            url: url.to_string(),
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_names_its_field() {
        let field = |url: &str, secret: Option<&str>, events: &[&str]| {
            WebhookRequest {
                url: url.into(),
                secret: secret.map(str::to_string),
                events: events.iter().map(|e| e.to_string()).collect(),
            }
            .validated()
            .err()
            .map(|e| e.field)
        };
        assert_eq!(field("http://h/x", None, &[]), None);
        assert_eq!(field("", None, &[]).as_deref(), Some("url"));
        assert_eq!(field("ftp://h/x", None, &[]).as_deref(), Some("url"));
        assert_eq!(
            field("http://h/x", Some("short"), &[]).as_deref(),
            Some("secret")
        );
        assert_eq!(
            field("http://h/x", None, &["job.nope"]).as_deref(),
            Some("events")
        );
    }
}
