//! The retry policy: whether a failed attempt gets another, and when.

use std::time::Duration;

/// No retry waits longer than this, however many attempts came before.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Delay before attempt `failed_attempt + 1`: base × 2^(failed_attempt-1), bounded by
/// [`MAX_BACKOFF`], with "equal jitter" (half fixed, half drawn from `jitter` in [0, 1)) so
/// that jobs failing together do not retry together.
pub fn backoff_delay(base: Duration, failed_attempt: u32, jitter: f64) -> Duration {
    let exp = failed_attempt.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(MAX_BACKOFF);
    let half = full / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Whether an attempt that ended as a failure gets another try.
pub fn should_retry(attempt: u32, max_attempts: u32) -> bool {
    attempt < max_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_bounded() {
        let base = Duration::from_secs(10);
        assert_eq!(backoff_delay(base, 1, 1.0), Duration::from_secs(10));
        assert_eq!(backoff_delay(base, 2, 1.0), Duration::from_secs(20));
        assert_eq!(backoff_delay(base, 3, 0.0), Duration::from_secs(20));
        assert_eq!(backoff_delay(base, 40, 1.0), MAX_BACKOFF);
        assert_eq!(backoff_delay(Duration::ZERO, 3, 0.5), Duration::ZERO);
    }

    #[test]
    fn attempts_are_bounded() {
        assert!(should_retry(1, 4));
        assert!(should_retry(3, 4));
        assert!(!should_retry(4, 4));
        assert!(!should_retry(1, 1));
    }
}
