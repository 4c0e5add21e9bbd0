//! Statement helpers both engines need: placeholders and row tuples, batched updates by
//! id, row locks, loading by ids, and telling a transient failure from a refusal.

use super::*;

/// Rows per multi-row statement: a batch costs a few statements, not a few per row (on
/// SQLite every statement is a round trip to the connection's thread), and the binds stay
/// far under both engines' limits.
pub(super) const ROWS_PER_STATEMENT: usize = 64;

/// The statement as the connection's engine binds it fastest. SQLite looks a `$N`
/// parameter's name up by walking the list of all of them, and sqlx asks the name of every
/// parameter, so a statement of a few hundred `$N` binds costs time quadratic in them (it
/// was a tenth of the control plane's CPU under load). Where the `$N` appear once each, in
/// order from `$1`, anonymous `?` bind the same values, without names. Left as it is
/// otherwise, and on PostgreSQL.
pub(super) fn binds_for(conn: &AnyConnection, sql: String) -> String {
    if conn.backend_name() != "SQLite" {
        return sql;
    }
    sqlite_anonymous_binds(&sql).unwrap_or(sql)
}

/// `sql` with `$1, $2, …` replaced by `?`, or None when they are not once each in order.
pub(super) fn sqlite_anonymous_binds(sql: &str) -> Option<String> {
    let mut out = String::with_capacity(sql.len());
    let mut expected = 1usize;
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 1);
        if rest[at + 1..at + 1 + digits].parse::<usize>().ok()? != expected {
            return None;
        }
        expected += 1;
        out.push('?');
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Some(out)
}

/// `$first, …` for `count` binds.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    let mut out = String::with_capacity(count * 6);
    push_placeholders(&mut out, first, count);
    out
}

/// Appends `$first, …` for `count` binds (one buffer: these lists run to hundreds of binds
/// per statement, built for every statement of a batch).
pub(super) fn push_placeholders(out: &mut String, first: usize, count: usize) {
    use std::fmt::Write;
    for i in first..first + count {
        if i > first {
            out.push_str(", ");
        }
        let _ = write!(out, "${i}");
    }
}

/// `($1, …, $cols), (…)` for `rows` rows of `cols` binds.
pub(super) fn row_tuples(rows: usize, cols: usize) -> String {
    row_tuples_from(1, rows, cols)
}

/// [`row_tuples`] numbered from `$first`.
pub(super) fn row_tuples_from(first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * (cols * 6 + 4));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        push_placeholders(&mut out, first + r * cols, cols);
        out.push(')');
    }
    out
}

pub(super) type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// `UPDATE {table} SET {set} WHERE [state = …] id IN (…)` for `ids`, in statements of a few
/// hundred: the set's binds first, then the state if given. The rows changed.
pub(super) async fn update_by_id<Id: ToString>(
    conn: &mut AnyConnection,
    table: &str,
    (set, set_binds): (&str, usize),
    bind_set: &(dyn for<'q> Fn(AnyQuery<'q>) -> AnyQuery<'q> + Sync),
    state: Option<&'static str>,
    ids: &[Id],
) -> Result<u64> {
    let (guard, first) = match state {
        Some(_) => (format!("state = ${} AND ", set_binds + 1), set_binds + 2),
        None => (String::new(), set_binds + 1),
    };
    let mut changed = 0;
    for chunk in ids.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = binds_for(
            &*conn,
            format!(
                "UPDATE {table} SET {set} WHERE {guard}id IN ({})",
                placeholders(first, chunk.len())
            ),
        );
        let mut query = bind_set(sqlx::query(&sql));
        if let Some(state) = state {
            query = query.bind(state);
        }
        for id in chunk {
            query = query.bind(id.to_string());
        }
        changed += query.execute(&mut *conn).await?.rows_affected();
    }
    Ok(changed)
}

/// Rows by id, `FOR UPDATE` on PostgreSQL (in id order, so that replicas locking
/// overlapping sets queue up rather than deadlock).
pub(super) async fn load_by_ids<K: ToString + Eq + std::hash::Hash + Copy, T>(
    conn: &mut AnyConnection,
    sql: &str,
    ids: &[K],
    from_row: fn(&AnyRow) -> Result<T>,
    key: fn(&T) -> K,
) -> Result<HashMap<K, T>> {
    let lock = for_update(conn);
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(ROWS_PER_STATEMENT * 8) {
        let sql = binds_for(
            &*conn,
            format!(
                "{sql} WHERE id IN ({}) ORDER BY id{lock}",
                placeholders(1, chunk.len())
            ),
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let record = from_row(&row)?;
            found.insert(key(&record), record);
        }
    }
    Ok(found)
}

/// How long a hot write transaction held its connection, from its first statement to its
/// commit, recorded when dropped as `drover_store_write_seconds{kind}`. On SQLite one
/// connection writes, so these times summed over a run say how busy that serial stage was
/// (`drover bench throughput` prints them).
pub(super) struct WriteTimer {
    pub(super) kind: &'static str,
    pub(super) began: std::time::Instant,
}

impl WriteTimer {
    pub(super) fn start(kind: &'static str) -> Self {
        Self {
            kind,
            began: std::time::Instant::now(),
        }
    }
}

impl Drop for WriteTimer {
    fn drop(&mut self) {
        metrics::histogram!("drover_store_write_seconds", "kind" => self.kind)
            .record(self.began.elapsed().as_secs_f64());
    }
}

/// Tries of a transaction that PostgreSQL rolled back to break a deadlock or a
/// serialization conflict.
pub(super) const TRANSIENT_TRIES: usize = 3;

/// A failure that running the same transaction again may not meet: PostgreSQL's
/// `deadlock_detected` (40P01) and `serialization_failure` (40001).
pub(super) fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// On PostgreSQL, locks the row for the rest of the transaction: every writer of a job (and
/// of its runs) reads the job first, so concurrent changes from replicas queue up instead
/// of overwriting each other.
pub(super) fn for_update(conn: &AnyConnection) -> &'static str {
    row_lock(engine_of(conn))
}

pub(super) fn engine_of(conn: &AnyConnection) -> Engine {
    match conn.backend_name() {
        "PostgreSQL" => Engine::Postgres,
        _ => Engine::Sqlite,
    }
}

/// The locking clause of [`for_update`], by engine (SQLite has one writer: no row locks).
pub(super) fn row_lock(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => " FOR UPDATE",
        Engine::Sqlite => "",
    }
}

/// The one row `sql` selects by `id` (its `$1`), or NotFound naming `kind`.
pub(super) async fn load_one<T>(
    conn: &mut AnyConnection,
    sql: &str,
    kind: &'static str,
    id: impl ToString,
    from_row: fn(&AnyRow) -> Result<T>,
) -> Result<T> {
    let id = id.to_string();
    let row = sqlx::query(sql)
        .bind(&id)
        .fetch_optional(conn)
        .await?
        .ok_or(StoreError::NotFound { kind, id })?;
    from_row(&row)
}
