//! Timestamps as microseconds since the Unix epoch: cheap to store and compare, shown as
//! RFC 3339 on the wire.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

/// RFC 3339 in the API (`2026-12-07T19:44:02.123456Z`).
impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::DateTime,
            )))
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

impl Timestamp {
    pub fn now() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Self(micros)
    }

    pub fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub fn as_micros(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_micros() as i64))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    pub fn to_rfc3339(self) -> String {
        // Whole seconds and microseconds apart: 128-bit nanosecond arithmetic showed up in
        // the profile of a log follower, which formats a time per line.
        let (secs, micros) = (self.0.div_euclid(1_000_000), self.0.rem_euclid(1_000_000));
        time::OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .and_then(|t| t.replace_microsecond(micros as u32).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.0.to_string())
    }

    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t =
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        let micros = t
            .unix_timestamp()
            .checked_mul(1_000_000)?
            .checked_add(i64::from(t.microsecond()))?;
        Some(Self(micros))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Rfc3339;
        impl serde::de::Visitor<'_> for Rfc3339 {
            type Value = Timestamp;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an RFC 3339 time")
            }

            // Borrowed where the input allows: no string allocated per time parsed.
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(s)
                    .ok_or_else(|| E::custom(format!("not an RFC 3339 time: {s:?}")))
            }
        }
        d.deserialize_str(Rfc3339)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for t in [
            Timestamp(1_764_000_000_123_456),
            Timestamp(0),
            Timestamp(-1),
            Timestamp(-1_500_000),
        ] {
            assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()), Some(t), "{t:?}");
        }
        assert_eq!(
            Timestamp(1_764_000_000_123_456).to_rfc3339(),
            "2025-11-24T16:00:00.123456Z"
        );
    }

    #[test]
    fn times_read_from_json_borrowed_or_owned() {
        let t: Timestamp = serde_json::from_str("\"2025-11-24T16:00:00.123456Z\"").unwrap();
        assert_eq!(t, Timestamp(1_764_000_000_123_456));
        let owned = serde_json::Value::String("2025-11-24T16:00:00.123456Z".into());
        assert_eq!(serde_json::from_value::<Timestamp>(owned).unwrap(), t);
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
