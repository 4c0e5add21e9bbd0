//! Printing for people (tables, status lines, spinners) and for scripts (`--output json`).

use drover_core::Timestamp;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

pub fn time(t: Timestamp) -> String {
    let s = t.to_rfc3339();
    // 2026-11-24T06:16:16.123456Z → 2026-11-24 06:16:16
    s.get(..19).map(|s| s.replace('T', " ")).unwrap_or(s)
}

pub fn time_opt(t: Option<Timestamp>) -> String {
    t.map(time).unwrap_or_else(|| "-".into())
}

pub fn duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(120) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// A spinner on stderr when it is a terminal; nothing otherwise.
pub fn spinner(message: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    Some(bar)
}

/// Bad input on the command line (a flag, a field of a file): the CLI exits 2 with it,
/// as clap does for the flags it checks itself; other failures exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`: `usage!("--timeout: {e}")`.
macro_rules! usage {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::output::UsageError(format!($($arg)*)))
    };
}
pub(crate) use usage;

/// Decodes a JSON or YAML document (`serde_json::Deserializer`, `serde_yaml_ng::Deserializer`)
/// and names the field at fault on error: `priority: invalid type: string "high", …`.
pub fn decode<'de, T, D>(de: D) -> Result<T, String>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let error = drover_core::ValidationError::from_decode(&path, &e.into_inner().to_string());
        if error.field == "body" {
            error.message
        } else {
            format!("{}: {}", error.field, error.message)
        }
    })
}

/// [`decode`] of one JSON value, with nothing after it but white space.
pub fn decode_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = decode(&mut de)?;
    de.end()
        .map_err(|e| format!("trailing characters after the JSON value ({e})"))?;
    Ok(value)
}

/// Parses `30` (seconds), `500ms`, `30s`, `5m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!(
            "{s:?} is negative; give a positive duration such as 30s"
        ));
    }
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() => Duration::from_secs_f64(secs),
        _ => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration (30, 500ms, 30s, 5m, 1h): {e}"))?,
    };
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Parses `K=V,K2=V2`; a piece without `=` belongs to the value before it, so values may
/// hold commas.
pub fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in s.split(',') {
        match piece.split_once('=') {
            Some((k, v)) => pairs.push((k.trim().to_string(), v.to_string())),
            None => match pairs.last_mut() {
                Some((_, v)) => {
                    v.push(',');
                    v.push_str(piece);
                }
                None if piece.trim().is_empty() => {}
                None => return Err(format!("{piece:?} is not NAME=VALUE")),
            },
        }
    }
    Ok(pairs)
}

/// The cells every job table shares: id, name, state, attempts, exit code.
pub fn job_cells(j: &drover_client::records::JobRecord) -> Vec<String> {
    vec![
        j.id.to_string(),
        j.name.chars().take(40).collect(),
        j.state.to_string(),
        format!("{}/{}", j.attempts, j.max_attempts),
        j.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
    ]
}

/// Events as a table (or JSON): one row each, the event's fields as its details.
pub fn print_events(
    events: &[drover_client::records::EventRecord],
    output: Output,
) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&events);
    }
    let mut t = table(&["SEQ", "TIME", "EVENT", "DETAILS"]);
    for e in events {
        let mut details = serde_json::to_value(&e.kind)?;
        if let Some(map) = details.as_object_mut() {
            map.remove("type");
        }
        t.add_row(vec![
            e.seq.to_string(),
            time(e.at),
            e.kind.type_name().to_string(),
            details.to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-5").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn pairs() {
        assert_eq!(
            parse_pairs("MY_VAR=hello_world,NUM_VAR=42").unwrap(),
            vec![
                ("MY_VAR".to_string(), "hello_world".to_string()),
                ("NUM_VAR".to_string(), "42".to_string())
            ]
        );
        assert_eq!(
            parse_pairs("LIST=a,b,c").unwrap(),
            vec![("LIST".to_string(), "a,b,c".to_string())]
        );
        assert!(parse_pairs("oops").is_err());
    }
}
