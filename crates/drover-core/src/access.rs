//! Rules for who may sign in: user names and passwords. Checked where a user is created
//! and, before anything is looked up or kept, where one logs in.

use crate::ValidationError;

/// The longest user name.
pub const MAX_USER_NAME_BYTES: usize = 64;
/// Passwords are 8 to this many bytes (argon2 hashes all of it).
pub const MAX_PASSWORD_BYTES: usize = 1024;
const MIN_PASSWORD_BYTES: usize = 8;

/// 1-64 letters, digits, `-`, `_`, `.` or `@`.
pub fn validate_user_name(name: &str) -> Result<(), ValidationError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_USER_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ValidationError::new(
            "name",
            "1-64 letters, digits, '-', '_', '.' or '@'",
        ))
    }
}

/// 8 to 1024 bytes.
pub fn validate_new_password(password: &str) -> Result<(), ValidationError> {
    if (MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
        Ok(())
    } else {
        Err(ValidationError::new("password", "8 to 1024 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_short_and_plain() {
        for good in ["admin", "alice@example.com", "a-b_c.d", &"x".repeat(64)] {
            assert!(validate_user_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "ä",
            &"x".repeat(65),
            &"x".repeat(1 << 20),
        ] {
            assert_eq!(
                validate_user_name(bad).map_err(|e| e.field),
                Err("name".into())
            );
        }
    }

    #[test]
    fn passwords_are_8_to_1024_bytes() {
        assert!(validate_new_password("12345678").is_ok());
        assert!(validate_new_password(&"p".repeat(1024)).is_ok());
        assert!(validate_new_password("1234567").is_err());
        assert!(validate_new_password(&"p".repeat(1025)).is_err());
    }
}
