//! The embedded backend: one SQLite file in WAL mode.
//!
//! rusqlite is synchronous, so every call runs on tokio's blocking pool with
//! the connection behind a mutex; metadata calls are rare (deploys, token
//! look-ups that miss the auth cache) and short.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::{
    Alias, AliasChange, AliasTarget, Artifact, ArtifactKind, AsyncInvocation, AsyncState, Digest, FunctionVersion,
    NewVersion, NodeInfo, Refusal, Result, Store, StoreError, StoredMessage, TokenRecord, head_json, now_ms,
};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many
/// have run. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: tenants, tokens, functions and their versions.
    "CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name),
        role TEXT NOT NULL,
        operator INTEGER NOT NULL DEFAULT 0,
        hash TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        revoked_at_ms INTEGER
    );
    CREATE TABLE functions (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        latest_version INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        deleted_at_ms INTEGER,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE function_versions (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        component TEXT NOT NULL,
        component_size INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name, version),
        FOREIGN KEY (tenant, name) REFERENCES functions(tenant, name)
    );",
    // 2: models and assets deployed with a version.
    "CREATE TABLE version_artifacts (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        artifact TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (tenant, name, version, kind, artifact),
        FOREIGN KEY (tenant, name, version) REFERENCES function_versions(tenant, name, version)
    );",
    // 3: asynchronous invocations, their requests and responses.
    "CREATE TABLE async_invocations (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name),
        function TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        submitted_at_ms INTEGER NOT NULL,
        started_at_ms INTEGER,
        finished_at_ms INTEGER,
        request_head TEXT NOT NULL,
        request_body BLOB NOT NULL,
        response_head TEXT,
        response_body BLOB
    );
    CREATE INDEX async_invocations_queue ON async_invocations(state, submitted_at_ms);",
    // 4: which node runs an invocation (its runs are re-queued when it restarts).
    "ALTER TABLE async_invocations ADD COLUMN owner TEXT;",
    // 5: nodes and their heartbeats (one, on the embedded store).
    "CREATE TABLE hearth_nodes (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        heartbeat_at_ms INTEGER NOT NULL,
        details TEXT NOT NULL
    );",
    // 6: versions deleted one by one, aliases and their history.
    "ALTER TABLE function_versions ADD COLUMN deleted_at_ms INTEGER;
    UPDATE function_versions SET deleted_at_ms = (
        SELECT f.deleted_at_ms FROM functions f WHERE f.tenant = function_versions.tenant AND f.name = function_versions.name
    );
    CREATE TABLE aliases (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        target TEXT NOT NULL,
        set_at_ms INTEGER NOT NULL,
        PRIMARY KEY (tenant, name, alias)
    );
    CREATE TABLE alias_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        target TEXT,
        follows_newest INTEGER NOT NULL
    );
    CREATE INDEX alias_history_by_alias ON alias_history(tenant, name, alias, id);",
];

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) `hearth.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<SqliteStore> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join("hearth.db");
        let mut conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: every commit is on disk before it is acknowledged (a
        // revocation, a deploy, an accepted asynchronous run). Metadata
        // writes are rare; NORMAL could lose the last ones on power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave SQLite inconsistent
            // (the transaction rolls back), so a poisoned lock is still usable.
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))?
    }
}

/// The live versions of a live function, oldest first; refused when the
/// function is not live.
fn live_versions(conn: &Connection, tenant: &str, name: &str) -> Result<Vec<u32>> {
    let live: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM functions WHERE tenant = ?1 AND name = ?2 AND deleted_at_ms IS NULL)",
        params![tenant, name],
        |row| row.get(0),
    )?;
    if !live {
        return Err(StoreError::Refused(Refusal::NoFunction));
    }
    let mut stmt = conn.prepare_cached(
        "SELECT version FROM function_versions WHERE tenant = ?1 AND name = ?2 AND deleted_at_ms IS NULL
         ORDER BY version",
    )?;
    let versions = stmt
        .query_map(params![tenant, name], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<u32>>>()?;
    Ok(versions)
}

/// Adds `change` to the history of `alias`.
fn add_history(conn: &Connection, tenant: &str, name: &str, alias: &str, change: &AliasChange) -> Result<()> {
    let target = change.target.as_ref().map(crate::target_json).transpose()?;
    conn.execute(
        "INSERT INTO alias_history (tenant, name, alias, at_ms, target, follows_newest)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![tenant, name, alias, change.at_ms, target, change.follows_newest],
    )?;
    Ok(())
}

/// The aliases set on a function, by name.
fn aliases_of(conn: &Connection, tenant: &str, name: &str) -> Result<Vec<Alias>> {
    let mut stmt = conn.prepare_cached(
        "SELECT alias, target, set_at_ms FROM aliases WHERE tenant = ?1 AND name = ?2 ORDER BY alias",
    )?;
    let rows = stmt.query_map(params![tenant, name], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    let mut aliases = Vec::new();
    for row in rows {
        let (name, target, set_at_ms) = row?;
        aliases.push(Alias {
            name,
            target: crate::target_from_json(&target)?,
            set_at_ms,
        });
    }
    Ok(aliases)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let tx = conn.transaction()?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    tx.commit()?;
    Ok(())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

const ASYNC_COLUMNS: &str = "id, tenant, function, state, attempts, submitted_at_ms, started_at_ms, finished_at_ms, \
     request_head, request_body, response_head, response_body";

fn async_from_row(row: &Row<'_>) -> rusqlite::Result<AsyncInvocation> {
    let bad = |i: usize, what: String| rusqlite::Error::FromSqlConversionFailure(i, Type::Text, what.into());
    let state: String = row.get(3)?;
    let message = |head_at: usize, body_at: usize| -> rusqlite::Result<Option<StoredMessage>> {
        let Some(head) = row.get::<_, Option<String>>(head_at)? else {
            return Ok(None);
        };
        let mut message: StoredMessage = serde_json::from_str(&head).map_err(|e| bad(head_at, e.to_string()))?;
        message.body = row.get::<_, Option<Vec<u8>>>(body_at)?.unwrap_or_default();
        Ok(Some(message))
    };
    Ok(AsyncInvocation {
        id: row.get(0)?,
        tenant: row.get(1)?,
        function: row.get(2)?,
        state: AsyncState::parse(&state).ok_or_else(|| bad(3, format!("unknown state {state:?}")))?,
        attempts: row.get(4)?,
        submitted_at_ms: row.get(5)?,
        started_at_ms: row.get(6)?,
        finished_at_ms: row.get(7)?,
        request: message(8, 9)?.unwrap_or_default(),
        response: message(10, 11)?,
    })
}

const VERSION_COLUMNS: &str = "v.tenant, v.name, v.version, v.manifest, v.component, v.component_size, v.created_at_ms";

fn version_from_row(row: &Row<'_>) -> rusqlite::Result<FunctionVersion> {
    let component: String = row.get(4)?;
    let component = Digest::parse(&component).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(4, Type::Text, format!("bad component digest {component:?}").into())
    })?;
    Ok(FunctionVersion {
        tenant: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        manifest: row.get(3)?,
        component,
        component_size: row.get::<_, i64>(5)?.try_into().unwrap_or(0),
        created_at_ms: row.get(6)?,
        artifacts: Vec::new(),
    })
}

/// Fills in each version's artifacts.
fn with_artifacts(conn: &Connection, mut versions: Vec<FunctionVersion>) -> Result<Vec<FunctionVersion>> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, artifact, digest, size FROM version_artifacts
         WHERE tenant = ?1 AND name = ?2 AND version = ?3",
    )?;
    for version in &mut versions {
        let rows = stmt.query_map(params![version.tenant, version.name, version.version], |row| {
            let kind: String = row.get(0)?;
            let digest: String = row.get(2)?;
            let corrupt = |what: String| rusqlite::Error::FromSqlConversionFailure(0, Type::Text, what.into());
            Ok(Artifact {
                kind: ArtifactKind::parse(&kind).ok_or_else(|| corrupt(format!("bad artifact kind {kind:?}")))?,
                name: row.get(1)?,
                digest: Digest::parse(&digest).ok_or_else(|| corrupt(format!("bad artifact digest {digest:?}")))?,
                size: row.get::<_, i64>(3)?.try_into().unwrap_or(0),
            })
        })?;
        version.artifacts = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        version.artifacts.sort();
    }
    Ok(versions)
}

const TOKEN_COLUMNS: &str = "id, tenant, role, operator, hash, created_at_ms, expires_at_ms, revoked_at_ms";

/// The token whose `column` (`id` or `hash`, both unique) equals `value`.
fn token_where(conn: &Connection, column: &str, value: &str) -> Result<Option<TokenRecord>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE {column} = ?1"))?
        .query_row(params![value], token_from_row)
        .optional()?)
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        role: row.get(2)?,
        operator: row.get(3)?,
        hash: row.get(4)?,
        created_at_ms: row.get(5)?,
        expires_at_ms: row.get(6)?,
        revoked_at_ms: row.get(7)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn ensure_tenant(&self, tenant: &str) -> Result<()> {
        let tenant = tenant.to_owned();
        self.with(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO tenants (name, created_at_ms) VALUES (?1, ?2)",
                params![tenant, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    async fn tenant_exists(&self, tenant: &str) -> Result<bool> {
        let tenant = tenant.to_owned();
        self.with(move |conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM tenants WHERE name = ?1")?
                .exists(params![tenant])?)
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<String>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT name FROM tenants ORDER BY name")?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    async fn insert_token(&self, token: TokenRecord) -> Result<()> {
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO tokens (id, tenant, role, operator, hash, created_at_ms, expires_at_ms, revoked_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    token.id,
                    token.tenant,
                    token.role,
                    token.operator,
                    token.hash,
                    token.created_at_ms,
                    token.expires_at_ms,
                    token.revoked_at_ms
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hash = hash.to_owned();
        self.with(move |conn| token_where(conn, "hash", &hash)).await
    }

    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>> {
        let id = id.to_owned();
        self.with(move |conn| token_where(conn, "id", &id)).await
    }

    async fn list_tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenRecord>> {
        let tenant = tenant.map(str::to_owned);
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at_ms, id"
            ))?;
            let rows = stmt.query_map(params![tenant], token_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.execute(
                "UPDATE tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![id, now_ms()],
            )?;
            token_where(conn, "id", &id)
        })
        .await
    }

    async fn has_operator_token(&self) -> Result<bool> {
        self.with(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM tokens WHERE operator = 1 AND revoked_at_ms IS NULL")?
                .exists([])?)
        })
        .await
    }

    async fn create_version(&self, new: NewVersion) -> Result<FunctionVersion> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let now = now_ms();
            let previous: Option<u32> = tx
                .query_row(
                    "SELECT latest_version FROM functions WHERE tenant = ?1 AND name = ?2",
                    params![new.tenant, new.name],
                    |row| row.get(0),
                )
                .optional()?;
            let version = previous.unwrap_or(0) + 1;
            tx.execute(
                "INSERT INTO functions (tenant, name, latest_version, created_at_ms, deleted_at_ms)
                 VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT (tenant, name) DO UPDATE SET latest_version = ?3, deleted_at_ms = NULL",
                params![new.tenant, new.name, version, now],
            )?;
            let size = i64::try_from(new.component_size).unwrap_or(i64::MAX);
            tx.execute(
                "INSERT INTO function_versions (tenant, name, version, manifest, component, component_size, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![new.tenant, new.name, version, new.manifest, new.component.as_str(), size, now],
            )?;
            for artifact in &new.artifacts {
                tx.execute(
                    "INSERT INTO version_artifacts (tenant, name, version, kind, artifact, digest, size)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        new.tenant,
                        new.name,
                        version,
                        artifact.kind.as_str(),
                        artifact.name,
                        artifact.digest.as_str(),
                        i64::try_from(artifact.size).unwrap_or(i64::MAX)
                    ],
                )?;
            }
            let pinned: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = ?3)",
                params![new.tenant, new.name, crate::LATEST],
                |row| row.get(0),
            )?;
            if !pinned {
                add_history(&tx, &new.tenant, &new.name, crate::LATEST, &AliasChange::follows(version, now))?;
            }
            tx.commit()?;
            let mut artifacts = new.artifacts;
            artifacts.sort();
            Ok(FunctionVersion {
                tenant: new.tenant,
                name: new.name,
                version,
                manifest: new.manifest,
                component: new.component,
                component_size: new.component_size,
                created_at_ms: now,
                artifacts,
            })
        })
        .await
    }

    async fn latest_version(&self, tenant: &str, name: &str) -> Result<Option<FunctionVersion>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| {
            let version = conn
                .prepare_cached(&format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                         JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                         WHERE f.tenant = ?1 AND f.name = ?2 AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL
                         ORDER BY v.version DESC LIMIT 1"
                ))?
                .query_row(params![tenant, name], version_from_row)
                .optional()?;
            Ok(with_artifacts(conn, version.into_iter().collect())?.pop())
        })
        .await
    }

    async fn list_functions(&self, tenant: &str) -> Result<Vec<FunctionVersion>> {
        let tenant = tenant.to_owned();
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name AND v.version = (
                         SELECT MAX(version) FROM function_versions
                         WHERE tenant = f.tenant AND name = f.name AND deleted_at_ms IS NULL)
                     WHERE f.tenant = ?1 AND f.deleted_at_ms IS NULL ORDER BY f.name"
            ))?;
            let rows = stmt.query_map(params![tenant], version_from_row)?;
            let versions = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            with_artifacts(conn, versions)
        })
        .await
    }

    async fn list_versions(&self, tenant: &str, name: &str) -> Result<Vec<FunctionVersion>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                     WHERE f.tenant = ?1 AND f.name = ?2 AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL
                     ORDER BY v.version"
            ))?;
            let rows = stmt.query_map(params![tenant, name], version_from_row)?;
            let versions = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            with_artifacts(conn, versions)
        })
        .await
    }

    async fn delete_function(&self, tenant: &str, name: &str) -> Result<bool> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let now = now_ms();
            let changed = tx.execute(
                "UPDATE functions SET deleted_at_ms = ?3 WHERE tenant = ?1 AND name = ?2 AND deleted_at_ms IS NULL",
                params![tenant, name, now],
            )?;
            tx.execute(
                "UPDATE function_versions SET deleted_at_ms = ?3
                 WHERE tenant = ?1 AND name = ?2 AND deleted_at_ms IS NULL",
                params![tenant, name, now],
            )?;
            tx.execute(
                "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )?;
            tx.execute(
                "DELETE FROM alias_history WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
            )?;
            tx.commit()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn version(&self, tenant: &str, name: &str, version: u32) -> Result<Option<FunctionVersion>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| {
            let found = conn
                .prepare_cached(&format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                     WHERE f.tenant = ?1 AND f.name = ?2 AND v.version = ?3
                       AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL"
                ))?
                .query_row(params![tenant, name, version], version_from_row)
                .optional()?;
            Ok(with_artifacts(conn, found.into_iter().collect())?.pop())
        })
        .await
    }

    async fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<()> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let live = live_versions(&tx, &tenant, &name)?;
            let aliases = aliases_of(&tx, &tenant, &name)?;
            crate::check_version_deletion(version, &live, &aliases).map_err(StoreError::Refused)?;
            tx.execute(
                "UPDATE function_versions SET deleted_at_ms = ?4 WHERE tenant = ?1 AND name = ?2 AND version = ?3",
                params![tenant, name, version, now_ms()],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn set_alias(
        &self,
        tenant: &str,
        name: &str,
        alias: &str,
        target: Option<AliasTarget>,
    ) -> Result<AliasChange> {
        let (tenant, name, alias) = (tenant.to_owned(), name.to_owned(), alias.to_owned());
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let live = live_versions(&tx, &tenant, &name)?;
            let now = now_ms();
            let change = match target {
                Some(target) => {
                    crate::check_target(&target, &live).map_err(StoreError::Refused)?;
                    tx.execute(
                        "INSERT INTO aliases (tenant, name, alias, target, set_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (tenant, name, alias) DO UPDATE SET target = ?4, set_at_ms = ?5",
                        params![tenant, name, alias, crate::target_json(&target)?, now],
                    )?;
                    AliasChange {
                        at_ms: now,
                        target: Some(target),
                        follows_newest: false,
                    }
                }
                None => {
                    let removed = tx.execute(
                        "DELETE FROM aliases WHERE tenant = ?1 AND name = ?2 AND alias = ?3",
                        params![tenant, name, alias],
                    )?;
                    let (change, changed) = crate::unset_change(&alias, &live, now, removed > 0)?;
                    if !changed {
                        return Ok(change);
                    }
                    change
                }
            };
            add_history(&tx, &tenant, &name, &alias, &change)?;
            tx.commit()?;
            Ok(change)
        })
        .await
    }

    async fn aliases(&self, tenant: &str, name: &str) -> Result<Vec<Alias>> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |conn| aliases_of(conn, &tenant, &name)).await
    }

    async fn alias_history(&self, tenant: &str, name: &str, alias: &str) -> Result<Vec<AliasChange>> {
        let (tenant, name, alias) = (tenant.to_owned(), name.to_owned(), alias.to_owned());
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at_ms, target, follows_newest FROM alias_history
                 WHERE tenant = ?1 AND name = ?2 AND alias = ?3 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![tenant, name, alias], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, bool>(2)?,
                ))
            })?;
            let mut changes = Vec::new();
            for row in rows {
                let (at_ms, target, follows_newest) = row?;
                changes.push(AliasChange {
                    at_ms,
                    target: target.as_deref().map(crate::target_from_json).transpose()?,
                    follows_newest,
                });
            }
            Ok(changes)
        })
        .await
    }

    async fn insert_async(&self, invocation: AsyncInvocation) -> Result<()> {
        self.with(move |conn| {
            let response_head = invocation.response.as_ref().map(head_json).transpose()?;
            conn.execute(
                &format!("INSERT INTO async_invocations ({ASYNC_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    invocation.id,
                    invocation.tenant,
                    invocation.function,
                    invocation.state.as_str(),
                    invocation.attempts,
                    invocation.submitted_at_ms,
                    invocation.started_at_ms,
                    invocation.finished_at_ms,
                    head_json(&invocation.request)?,
                    invocation.request.body,
                    response_head,
                    invocation.response.as_ref().map(|r| &r.body),
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn async_invocation(&self, tenant: &str, id: &str) -> Result<Option<AsyncInvocation>> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.with(move |conn| {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT {ASYNC_COLUMNS} FROM async_invocations WHERE tenant = ?1 AND id = ?2"
                ))?
                .query_row(params![tenant, id], async_from_row)
                .optional()?)
        })
        .await
    }

    async fn claim_async(&self, node: &str, limit: usize, lease: Duration) -> Result<Vec<AsyncInvocation>> {
        let node = node.to_owned();
        self.with(move |conn| {
            let tx = conn.transaction()?;
            let claimed = {
                // Tenants take turns (see `Store::claim_async`).
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {ASYNC_COLUMNS} FROM (
                         SELECT q.*, ROW_NUMBER() OVER (PARTITION BY q.tenant ORDER BY q.submitted_at_ms, q.id) AS turn,
                                served.last_start
                         FROM async_invocations q LEFT JOIN (
                             SELECT tenant, MAX(started_at_ms) AS last_start FROM async_invocations GROUP BY tenant
                         ) served ON served.tenant = q.tenant
                         WHERE q.state = 'queued' OR (q.state = 'running' AND q.owner IS NOT ?2 AND q.owner NOT IN (
                             SELECT id FROM hearth_nodes WHERE heartbeat_at_ms > ?3
                         ))
                     )
                     ORDER BY turn, last_start IS NOT NULL, last_start, submitted_at_ms, id LIMIT ?1"
                ))?;
                let rows = stmt.query_map(
                    params![i64::try_from(limit).unwrap_or(i64::MAX), node, now_ms() - millis(lease)],
                    async_from_row,
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            let now = now_ms();
            let mut running = Vec::with_capacity(claimed.len());
            for mut invocation in claimed {
                tx.execute(
                    "UPDATE async_invocations SET state = 'running', attempts = attempts + 1, started_at_ms = ?2,
                     owner = ?3 WHERE id = ?1",
                    params![invocation.id, now, node],
                )?;
                invocation.state = AsyncState::Running;
                invocation.attempts += 1;
                invocation.started_at_ms = Some(now);
                running.push(invocation);
            }
            tx.commit()?;
            Ok(running)
        })
        .await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        let node = node.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO hearth_nodes (id, url, started_at_ms, heartbeat_at_ms, details) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET url = ?2, started_at_ms = ?3, heartbeat_at_ms = ?4, details = ?5",
                params![node.id, node.url, node.started_at_ms, now_ms(), node.details],
            )?;
            Ok(())
        })
        .await
    }

    async fn live_nodes(&self, lease: Duration) -> Result<Vec<NodeInfo>> {
        self.with(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, url, started_at_ms, heartbeat_at_ms, details FROM hearth_nodes
                 WHERE heartbeat_at_ms > ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![now_ms() - millis(lease)], |row| {
                Ok(NodeInfo {
                    id: row.get(0)?,
                    url: row.get(1)?,
                    started_at_ms: row.get(2)?,
                    heartbeat_at_ms: row.get(3)?,
                    details: row.get(4)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn finish_async(
        &self,
        id: &str,
        state: AsyncState,
        response: Option<StoredMessage>,
        attempted: bool,
    ) -> Result<()> {
        let id = id.to_owned();
        self.with(move |conn| {
            let head = response.as_ref().map(head_json).transpose()?;
            let finished = (state != AsyncState::Queued).then(now_ms);
            conn.execute(
                "UPDATE async_invocations SET state = ?2, finished_at_ms = ?3, response_head = ?4, response_body = ?5,
                 attempts = attempts - ?6 WHERE id = ?1",
                params![
                    id,
                    state.as_str(),
                    finished,
                    head,
                    response.map(|r| r.body),
                    i32::from(!attempted)
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn requeue_running_async(&self, node: &str) -> Result<usize> {
        let node = node.to_owned();
        self.with(move |conn| {
            // `owner IS NULL`: runs claimed before owners were recorded.
            Ok(conn.execute(
                "UPDATE async_invocations SET state = 'queued'
                 WHERE state = 'running' AND (owner = ?1 OR owner IS NULL)",
                params![node],
            )?)
        })
        .await
    }

    async fn async_queued_bytes(&self, tenant: &str) -> Result<u64> {
        let tenant = tenant.to_owned();
        self.with(move |conn| {
            let bytes: i64 = conn.query_row(
                "SELECT COALESCE(SUM(length(request_body)), 0) FROM async_invocations
                 WHERE tenant = ?1 AND state IN ('queued', 'running')",
                params![tenant],
                |row| row.get(0),
            )?;
            Ok(u64::try_from(bytes).unwrap_or(0))
        })
        .await
    }

    async fn delete_finished_async(&self, before_ms: i64) -> Result<u64> {
        self.with(move |conn| {
            let deleted = conn.execute(
                "DELETE FROM async_invocations WHERE state IN ('succeeded', 'failed') AND finished_at_ms < ?1",
                params![before_ms],
            )?;
            Ok(deleted as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SqliteStore::open(dir.path()).expect("open"));
        let store = SqliteStore::open(dir.path()).expect("reopen");
        let conn = store.conn.lock().expect("lock");
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("pragma");
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn every_commit_is_synced_before_it_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let conn = store.conn.lock().expect("lock");
        let synchronous: u8 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma");
        assert_eq!(synchronous, 2, "synchronous = FULL");
    }
}
