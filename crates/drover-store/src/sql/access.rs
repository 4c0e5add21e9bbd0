//! Users, their tokens (hashed; refresh tokens rotated once), and the audit trail.

use super::*;

/// Inserts one token of `kind` and returns its secret.
pub(super) async fn insert_token(
    conn: &mut AnyConnection,
    kind: &str,
    user_id: &str,
    family: Option<&str>,
    name: Option<&str>,
    ttl: Duration,
    now: Timestamp,
) -> Result<(String, String)> {
    let prefix = match kind {
        "access" => "drover_at_",
        "refresh" => "drover_rt_",
        _ => "drover_pat_",
    };
    let token = format!("{prefix}{}", random_hex(24));
    let id = JobId::new().to_string();
    sqlx::query(
        "INSERT INTO auth_tokens (token_hash, id, kind, user_id, family, name, created_at, \
         expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(sha256_hex(&token))
    .bind(&id)
    .bind(kind)
    .bind(user_id)
    .bind(family)
    .bind(name)
    .bind(now.0)
    .bind(now.plus(ttl).0)
    .execute(conn)
    .await?;
    Ok((id, token))
}

pub(super) async fn issue_pair(
    conn: &mut AnyConnection,
    user_id: &str,
    family: &str,
    access_ttl: Duration,
    refresh_ttl: Duration,
    now: Timestamp,
) -> Result<IssuedTokens> {
    let (_, access) =
        insert_token(conn, "access", user_id, Some(family), None, access_ttl, now).await?;
    let (_, refresh) = insert_token(
        conn,
        "refresh",
        user_id,
        Some(family),
        None,
        refresh_ttl,
        now,
    )
    .await?;
    Ok(IssuedTokens {
        access_token: access,
        refresh_token: refresh,
        token_type: "Bearer".into(),
        expires_in: access_ttl.as_secs(),
    })
}

pub(super) async fn load_user(conn: &mut AnyConnection, id: &str) -> Result<UserRecord> {
    let row = sqlx::query("SELECT id, name, role, created_at FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or(StoreError::UserTokenRefused(
            "the token's user no longer exists",
        ))?;
    user_from_row(&row)
}

pub(super) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

pub(super) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

#[async_trait]
impl AccessStore for SqlStore {
    async fn count_users(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.writer)
            .await?;
        Ok(n as u64)
    }

    async fn create_user(&self, name: &str, role: Role, password_hash: &str) -> Result<UserRecord> {
        let now = Timestamp::now();
        let id = JobId::new().to_string();
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.writer)
            .await?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        sqlx::query(
            "INSERT INTO users (id, name, role, password_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(name)
        .bind(role.as_str())
        .bind(password_hash)
        .bind(now.0)
        .execute(&self.writer)
        .await?;
        Ok(UserRecord {
            id,
            name: name.to_string(),
            role,
            created_at: now,
        })
    }

    async fn user_by_name(&self, name: &str) -> Result<Option<(UserRecord, String)>> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, password_hash FROM users WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(row) => Ok(Some((user_from_row(&row)?, row.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query("SELECT id, name, role, created_at FROM users ORDER BY name")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn issue_tokens(
        &self,
        user_id: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<IssuedTokens> {
        let now = Timestamp::now();
        let family = JobId::new().to_string();
        let mut tx = self.writer.begin().await?;
        let pair = issue_pair(&mut tx, user_id, &family, access_ttl, refresh_ttl, now).await?;
        tx.commit().await?;
        Ok(pair)
    }

    async fn rotate_refresh(
        &self,
        refresh_token: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<(UserRecord, IssuedTokens)> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family, expires_at, used_at, revoked_at FROM auth_tokens \
             WHERE token_hash = $1 AND kind = 'refresh'",
        )
        .bind(sha256_hex(refresh_token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown refresh token"))?;
        let family: String = row.try_get("family")?;
        let user_id: String = row.try_get("user_id")?;
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Err(StoreError::UserTokenRefused(
                "this refresh token was revoked",
            ));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::UserTokenRefused("this refresh token expired"));
        }
        // Conditional: of concurrent rotations of one token exactly one marks it used; the
        // others (PostgreSQL re-checks the row after the first commits) are reuse.
        let rotated = match row.try_get::<Option<i64>, _>("used_at")? {
            Some(_) => false,
            None => {
                sqlx::query(
                    "UPDATE auth_tokens SET used_at = $1 \
                     WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL",
                )
                .bind(now.0)
                .bind(sha256_hex(refresh_token))
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1
            }
        };
        if !rotated {
            // Reuse: whoever holds the newer one and whoever replays this one are the same
            // login; neither is trusted any more. A rotation that won the race has
            // committed by now (this UPDATE waited for its lock), so its pair is revoked too.
            sqlx::query(
                "UPDATE auth_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
            )
            .bind(now.0)
            .bind(&family)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Err(StoreError::UserTokenRefused(
                "this refresh token was already used; every token of its login is now revoked",
            ));
        }
        let user = load_user(&mut tx, &user_id).await?;
        let pair = issue_pair(&mut tx, &user_id, &family, access_ttl, refresh_ttl, now).await?;
        tx.commit().await?;
        Ok((user, pair))
    }

    async fn revoke_family(&self, token: &str) -> Result<UserRecord> {
        let now = Timestamp::now();
        let mut tx = self.writer.begin().await?;
        let row = sqlx::query(
            "SELECT user_id, family FROM auth_tokens WHERE token_hash = $1 \
             AND kind IN ('access', 'refresh')",
        )
        .bind(sha256_hex(token))
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown token"))?;
        let family: String = row.try_get("family")?;
        let user_id: String = row.try_get("user_id")?;
        sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE family = $2 AND revoked_at IS NULL",
        )
        .bind(now.0)
        .bind(&family)
        .execute(&mut *tx)
        .await?;
        let user = load_user(&mut tx, &user_id).await?;
        tx.commit().await?;
        Ok(user)
    }

    async fn authenticate_token_until(&self, token: &str) -> Result<(UserRecord, Timestamp)> {
        let now = Timestamp::now();
        let row = sqlx::query(
            "SELECT t.kind, t.expires_at, t.revoked_at, t.last_used_at, t.token_hash, \
             u.id, u.name, u.role, u.created_at FROM auth_tokens t \
             JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(sha256_hex(token))
        .fetch_optional(&self.reader)
        .await?
        .ok_or(StoreError::UserTokenRefused("unknown token"))?;
        let kind: String = row.try_get("kind")?;
        if kind == "refresh" {
            return Err(StoreError::UserTokenRefused(
                "a refresh token only buys new tokens (POST /v1/auth/refresh)",
            ));
        }
        if row.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Err(StoreError::UserTokenRefused("this token was revoked"));
        }
        if row.try_get::<i64, _>("expires_at")? < now.0 {
            return Err(StoreError::UserTokenRefused("this token expired"));
        }
        if kind == "api" {
            // Last use to the minute: one write a minute per token, not one per request.
            let last: Option<i64> = row.try_get("last_used_at")?;
            if last.is_none_or(|t| now.0 - t > 60_000_000) {
                sqlx::query("UPDATE auth_tokens SET last_used_at = $1 WHERE token_hash = $2")
                    .bind(now.0)
                    .bind(row.try_get::<String, _>("token_hash")?)
                    .execute(&self.writer)
                    .await?;
            }
        }
        Ok((user_from_row(&row)?, ts(&row, "expires_at")?))
    }

    async fn create_api_token(
        &self,
        user_id: &str,
        name: &str,
        ttl: Duration,
    ) -> Result<(ApiTokenRecord, String)> {
        let now = Timestamp::now();
        let mut conn = self.writer.acquire().await?;
        let (id, token) =
            insert_token(&mut conn, "api", user_id, None, Some(name), ttl, now).await?;
        let row = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.id = $1"
        ))
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        Ok((api_token_from_row(&row)?, token))
    }

    async fn list_api_tokens(&self, user_id: Option<&str>) -> Result<Vec<ApiTokenRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.kind = 'api' AND ($1 IS NULL OR t.user_id = $1) ORDER BY t.id"
        ))
        .bind(user_id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(api_token_from_row).collect()
    }

    async fn revoke_api_token(&self, id: &str, user_id: Option<&str>) -> Result<ApiTokenRecord> {
        let now = Timestamp::now();
        let done = sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE id = $2 AND kind = 'api' \
             AND ($3 IS NULL OR user_id = $3) AND revoked_at IS NULL",
        )
        .bind(now.0)
        .bind(id)
        .bind(user_id)
        .execute(&self.writer)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {API_TOKEN_COLS} FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.id = $1 AND t.kind = 'api' AND ($2 IS NULL OR t.user_id = $2)"
        ))
        .bind(id)
        .bind(user_id)
        .fetch_optional(&self.writer)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            kind: "token",
            id: id.to_string(),
        })?;
        let token = api_token_from_row(&row)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "token {id} is already revoked"
            )));
        }
        Ok(token)
    }

    async fn audit(&self, entry: &AuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit (at, actor, action, target, outcome, address, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(entry.at.0)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.outcome)
        .bind(&entry.address)
        .bind(&entry.detail)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, limit: u32) -> Result<Vec<AuditRecord>> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, outcome, address, detail FROM audit \
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        let mut out = rows
            .iter()
            .map(|row| {
                Ok(AuditRecord {
                    seq: row.try_get("seq")?,
                    at: ts(row, "at")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    outcome: row.try_get("outcome")?,
                    address: row.try_get("address")?,
                    detail: row.try_get("detail")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }
}
