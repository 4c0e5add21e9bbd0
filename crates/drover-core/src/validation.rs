//! The rules every input is checked by, wherever it comes in (a job, a reservation, a
//! webhook, a node configuration): one message per rule, naming the field at fault.

use serde::Serialize;

pub const MAX_RESOURCE_AMOUNT: u32 = 1 << 20;

/// A refused input, naming the field so that the user knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, utoipa::ToSchema)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A decoding error at `path` (`serde_path_to_error`'s: `.` for the document itself,
    /// `messages[0]`) named after the field it is about: a missing or unknown field is
    /// named by its own path (`model`, `messages[0].role`), not by where it was missed.
    pub fn from_decode(path: &str, message: &str) -> Self {
        let path = match path {
            "." | "?" | "" => None,
            p => Some(p),
        };
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split('`').next());
        let field = match (path, named) {
            // serde_path_to_error puts an unknown field in the path already.
            (Some(p), Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_string(),
            (Some(p), Some(n)) => format!("{p}.{n}"),
            (None, Some(n)) => n.to_string(),
            (Some(p), None) => p.to_string(),
            (None, None) => "body".to_string(),
        };
        Self::new(field, message)
    }
}

/// A field name's key part for an error message: its first 64 characters, control
/// characters shown escaped (the message must not carry a newline from the input).
pub(crate) fn printable_prefix(key: &str) -> String {
    key.chars().take(64).flat_map(char::escape_debug).collect()
}

/// A container image reference as Docker reads one: `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`,
/// where PATH is lower-case components (`a-z0-9` joined by `.`, `_`, `__` or dashes) split
/// by `/`. Nothing else gets through: the reference is a command-line word of `docker run`.
pub fn valid_image_reference(reference: &str) -> bool {
    if reference.is_empty() || reference.len() > 512 || !reference.is_ascii() {
        return false;
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return false;
        };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm.split(['+', '.', '_', '-']).all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
    }
    // A tag is after the last ':' that follows the last '/' (an earlier one is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let mut bytes = tag.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !first_ok
            || tag.len() > 128
            || !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return false;
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let first = components[0];
    if components.len() > 1 && (first.contains(['.', ':']) || first == "localhost") {
        let (host, port) = match first.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (first, None),
        };
        let host_ok = host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
        let port_ok = port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
        if !host_ok || !port_ok {
            return false;
        }
        components.remove(0);
    }
    components.iter().all(|c| valid_path_component(c))
}

/// `a-z0-9` runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A duration the API takes in milliseconds (`ttl_ms`), like all its durations, or in
/// seconds under the field's first name (`ttl_seconds`, still read for older clients):
/// one of them, between 1 ms and `max` (`max_words` says it to a person).
pub fn duration_field(
    ms: (&str, Option<u64>),
    seconds: (&str, Option<u64>),
    default: std::time::Duration,
    max: std::time::Duration,
    max_words: &str,
) -> Result<std::time::Duration, ValidationError> {
    use std::time::Duration;
    let (field, value) = match (ms.1, seconds.1) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::new(
                seconds.0,
                format!("give {} or {}, not both", ms.0, seconds.0),
            ));
        }
        (Some(v), None) => (ms.0, Duration::from_millis(v)),
        (None, Some(v)) => (seconds.0, Duration::from_secs(v)),
        (None, None) => return Ok(default),
    };
    if value.is_zero() || value > max {
        return Err(ValidationError::new(
            field,
            format!("must be between 1 ms and {max_words}"),
        ));
    }
    Ok(value)
}

/// The rule for a resource's name, wherever one is given (a job's `resources`, a
/// reservation's `resource`).
pub fn check_resource_name(field: &str, name: &str) -> Result<(), ValidationError> {
    if valid_resource_name(name) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            "resource names are 1-64 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

/// The rule for an amount of a resource, wherever one is given.
pub fn check_resource_amount(field: &str, amount: u32) -> Result<(), ValidationError> {
    if amount == 0 || amount > MAX_RESOURCE_AMOUNT {
        return Err(ValidationError::new(
            field,
            format!("amount must be between 1 and {MAX_RESOURCE_AMOUNT}, got {amount}"),
        ));
    }
    Ok(())
}

/// Letters, digits, `-`, `_`, `.`; 1 to 64 of them.
pub fn valid_resource_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_are_docker_references_and_nothing_else() {
        for good in [
            "busybox",
            "drover-busybox:latest",
            "library/busybox:1.36",
            "localhost:5000/team/app:v1.2-rc_3",
            "registry.example.com/a/b__c/d.e",
            "ghcr.io/org/image@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:tag@sha256:0123456789abcdef0123456789abcdef",
            "a---b",
        ] {
            assert!(valid_image_reference(good), "{good}");
        }
        for bad in [
            "",
            "-v",
            "--volume=/:/host:ro",
            "--privileged",
            "busybox --privileged",
            "Busybox",
            "busybox:",
            "busybox:-tag",
            "busybox:tag with space",
            "/busybox",
            "busybox/",
            "a//b",
            "a..b",
            "a___b",
            "_a",
            "a-",
            "host:port/x:y:z",
            "busybox@sha256:short",
            "busybox@:0123456789abcdef0123456789abcdef",
            "busybox\n",
            "bus\u{0}box",
            "büsybox",
            "-host.example.com/x",
            "host.example.com:port/x",
        ] {
            assert!(!valid_image_reference(bad), "{bad:?}");
        }
        assert!(!valid_image_reference(&"a".repeat(513)));
    }
}
