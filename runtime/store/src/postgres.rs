//! The cluster backend: PostgreSQL 15+, shared by every node.
//!
//! Each node keeps a small pool of connections (deadpool); every [`Store`]
//! method is one statement or one transaction, with the same semantics as
//! the SQLite backend (one conformance suite runs against both). Schema
//! migrations run at start under an advisory lock, so nodes that start
//! together migrate once. Changes other nodes must see (deploys, deletes,
//! revocations) are announced with `NOTIFY` in the same transaction (see
//! [`CHANGES_CHANNEL`]).

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use crate::{
    Alias, AliasChange, AliasTarget, Artifact, ArtifactKind, AsyncInvocation, AsyncState, Change, Digest,
    FunctionVersion, NewVersion, NodeInfo, Refusal, Result, Store, StoreError, StoredMessage, TokenRecord, head_json,
    message_from_parts, now_ms,
};

/// The `LISTEN`/`NOTIFY` channel on which a change to functions or tokens
/// is announced, with a payload naming what changed (`function tenant/name`,
/// `token ID`).
pub const CHANGES_CHANNEL: &str = "hearth_changes";

/// Connections per node: metadata calls are short and rare (deploys, cache
/// misses, the asynchronous queue), so a few suffice even under load.
const POOL_SIZE: usize = 8;

/// Key of the advisory lock held while migrating (any constant; "hearth").
const MIGRATION_LOCK: i64 = 0x6865_6172_7468;

/// Schema migrations, applied in order; `hearth_schema` records how many
/// have run. Never edit a released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the embedded store's first four migrations, in PostgreSQL's types.
    "CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        created_at_ms BIGINT NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name),
        role TEXT NOT NULL,
        operator BOOLEAN NOT NULL DEFAULT FALSE,
        hash TEXT NOT NULL UNIQUE,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT,
        revoked_at_ms BIGINT
    );
    CREATE TABLE functions (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        latest_version INTEGER NOT NULL,
        created_at_ms BIGINT NOT NULL,
        deleted_at_ms BIGINT,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE function_versions (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        manifest TEXT NOT NULL,
        component TEXT NOT NULL,
        component_size BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, name, version),
        FOREIGN KEY (tenant, name) REFERENCES functions(tenant, name)
    );
    CREATE TABLE version_artifacts (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        artifact TEXT NOT NULL,
        digest TEXT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (tenant, name, version, kind, artifact),
        FOREIGN KEY (tenant, name, version) REFERENCES function_versions(tenant, name, version)
    );
    CREATE TABLE async_invocations (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name),
        function TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        submitted_at_ms BIGINT NOT NULL,
        started_at_ms BIGINT,
        finished_at_ms BIGINT,
        request_head TEXT NOT NULL,
        request_body BYTEA NOT NULL,
        response_head TEXT,
        response_body BYTEA,
        owner TEXT,
        lease_until_ms BIGINT
    );
    CREATE INDEX async_invocations_queue ON async_invocations(state, submitted_at_ms);",
    // 2: a counter of announced changes, for nodes to notice a lost NOTIFY.
    "CREATE TABLE hearth_changes (seq BIGINT NOT NULL);
    INSERT INTO hearth_changes (seq) VALUES (0);",
    // 3: nodes and their heartbeats.
    "CREATE TABLE hearth_nodes (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        heartbeat_at_ms BIGINT NOT NULL,
        details TEXT NOT NULL
    );",
    // 4: the fleet's usage ledger (written by `hearth-ledger`): records in
    // ledger order, and the last sequence given, locked while shipping.
    "CREATE TABLE hearth_usage (
        seq BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        node TEXT NOT NULL,
        tenant TEXT NOT NULL,
        function TEXT NOT NULL,
        version INTEGER NOT NULL,
        started_at_us BIGINT NOT NULL,
        ended_at_us BIGINT NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        cold_start BOOLEAN NOT NULL,
        queue_us BIGINT NOT NULL,
        memory_peak_bytes BIGINT NOT NULL,
        guest_cpu_us BIGINT NOT NULL,
        device TEXT NOT NULL,
        compute_ns BIGINT NOT NULL,
        gpu_ns BIGINT NOT NULL,
        inference_calls BIGINT NOT NULL,
        batched_calls BIGINT NOT NULL,
        bytes_in BIGINT NOT NULL,
        bytes_out BIGINT NOT NULL,
        billed_ms BIGINT NOT NULL,
        cost_nanos BIGINT NOT NULL,
        currency TEXT NOT NULL,
        price_version TEXT NOT NULL,
        invocation_id TEXT,
        attempt INTEGER NOT NULL
    );
    CREATE INDEX hearth_usage_tenant ON hearth_usage (tenant, seq);
    CREATE TABLE hearth_usage_head (seq BIGINT NOT NULL);
    INSERT INTO hearth_usage_head (seq) VALUES (0);",
    // 5: versions deleted one by one, aliases and their history.
    "ALTER TABLE function_versions ADD COLUMN deleted_at_ms BIGINT;
    UPDATE function_versions v SET deleted_at_ms = f.deleted_at_ms
        FROM functions f WHERE f.tenant = v.tenant AND f.name = v.name;
    CREATE TABLE aliases (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        target TEXT NOT NULL,
        set_at_ms BIGINT NOT NULL,
        PRIMARY KEY (tenant, name, alias)
    );
    CREATE TABLE alias_history (
        id BIGSERIAL PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        at_ms BIGINT NOT NULL,
        target TEXT,
        follows_newest BOOLEAN NOT NULL
    );
    CREATE INDEX alias_history_by_alias ON alias_history(tenant, name, alias, id);
    ALTER TABLE hearth_usage ADD COLUMN alias TEXT NOT NULL DEFAULT '';
    ALTER TABLE hearth_usage ADD COLUMN shadow BOOLEAN NOT NULL DEFAULT FALSE;
    ALTER TABLE hearth_usage ADD COLUMN inference_cache_hits BIGINT NOT NULL DEFAULT 0;",
];

/// How often a node compares the change counter with the announcements it
/// received: the bound on how stale its caches get when a notification is
/// lost (a dropped connection, a restarted PostgreSQL).
pub const STALENESS_CHECK: Duration = Duration::from_secs(1);

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`),
    /// checks the server answers and applies the schema migrations.
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("the store URL is not a PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let store = PostgresStore { pool, config };
        store.migrate().await?;
        Ok(store)
    }

    /// The node's connection pool, for the usage ledger that lives in the
    /// same database (so a node keeps one pool).
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS hearth_schema (applied INTEGER NOT NULL)")
            .await?;
        let applied: i32 = match tx.query_opt("SELECT applied FROM hearth_schema", &[]).await? {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO hearth_schema (applied) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(applied).unwrap_or(0))
        {
            tx.batch_execute(sql).await?;
            let done = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute("UPDATE hearth_schema SET applied = $1", &[&done]).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn size(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn number(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn signed(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

const VERSION_COLUMNS: &str = "v.tenant, v.name, v.version, v.manifest, v.component, v.component_size, v.created_at_ms";

fn version_from_row(row: &Row) -> Result<FunctionVersion> {
    let component: String = row.try_get(4)?;
    Ok(FunctionVersion {
        tenant: row.try_get(0)?,
        name: row.try_get(1)?,
        version: number(row.try_get(2)?),
        manifest: row.try_get(3)?,
        component: Digest::parse(&component)
            .ok_or_else(|| StoreError::Corrupt(format!("bad component digest {component:?}")))?,
        component_size: unsigned(row.try_get(5)?),
        created_at_ms: row.try_get(6)?,
        artifacts: Vec::new(),
    })
}

/// Fills in each version's artifacts.
/// The live versions of a live function, oldest first, with the
/// function's row locked until the transaction ends (a concurrent deploy,
/// alias change or deletion waits); refused when the function is not live.
async fn live_versions(tx: &deadpool_postgres::Transaction<'_>, tenant: &str, name: &str) -> Result<Vec<u32>> {
    let live = tx
        .query_opt(
            "SELECT 1 FROM functions WHERE tenant = $1 AND name = $2 AND deleted_at_ms IS NULL FOR UPDATE",
            &[&tenant, &name],
        )
        .await?;
    if live.is_none() {
        return Err(StoreError::Refused(Refusal::NoFunction));
    }
    let rows = tx
        .query(
            "SELECT version FROM function_versions WHERE tenant = $1 AND name = $2 AND deleted_at_ms IS NULL
             ORDER BY version",
            &[&tenant, &name],
        )
        .await?;
    rows.iter().map(|row| Ok(number(row.try_get(0)?))).collect()
}

/// Adds `change` to the history of `alias`.
async fn add_history(
    tx: &deadpool_postgres::Transaction<'_>,
    tenant: &str,
    name: &str,
    alias: &str,
    change: &AliasChange,
) -> Result<()> {
    let target = change.target.as_ref().map(crate::target_json).transpose()?;
    tx.execute(
        "INSERT INTO alias_history (tenant, name, alias, at_ms, target, follows_newest)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&tenant, &name, &alias, &change.at_ms, &target, &change.follows_newest],
    )
    .await?;
    Ok(())
}

/// The aliases set on a function, by name.
async fn aliases_of(client: &impl deadpool_postgres::GenericClient, tenant: &str, name: &str) -> Result<Vec<Alias>> {
    let rows = client
        .query(
            "SELECT alias, target, set_at_ms FROM aliases WHERE tenant = $1 AND name = $2 ORDER BY alias",
            &[&tenant, &name],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let target: String = row.try_get(1)?;
            Ok(Alias {
                name: row.try_get(0)?,
                target: crate::target_from_json(&target)?,
                set_at_ms: row.try_get(2)?,
            })
        })
        .collect()
}

async fn with_artifacts(client: &tokio_postgres::Client, rows: Vec<Row>) -> Result<Vec<FunctionVersion>> {
    let mut versions = rows.iter().map(version_from_row).collect::<Result<Vec<_>>>()?;
    for version in &mut versions {
        let rows = client
            .query(
                "SELECT kind, artifact, digest, size FROM version_artifacts
                 WHERE tenant = $1 AND name = $2 AND version = $3",
                &[&version.tenant, &version.name, &signed(version.version)],
            )
            .await?;
        for row in rows {
            let kind: String = row.try_get(0)?;
            let digest: String = row.try_get(2)?;
            version.artifacts.push(Artifact {
                kind: ArtifactKind::parse(&kind)
                    .ok_or_else(|| StoreError::Corrupt(format!("bad artifact kind {kind:?}")))?,
                name: row.try_get(1)?,
                digest: Digest::parse(&digest)
                    .ok_or_else(|| StoreError::Corrupt(format!("bad artifact digest {digest:?}")))?,
                size: unsigned(row.try_get(3)?),
            });
        }
        version.artifacts.sort();
    }
    Ok(versions)
}

const TOKEN_COLUMNS: &str = "id, tenant, role, operator, hash, created_at_ms, expires_at_ms, revoked_at_ms";

fn token_from_row(row: &Row) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        role: row.try_get(2)?,
        operator: row.try_get(3)?,
        hash: row.try_get(4)?,
        created_at_ms: row.try_get(5)?,
        expires_at_ms: row.try_get(6)?,
        revoked_at_ms: row.try_get(7)?,
    })
}

const ASYNC_COLUMNS: &str = "id, tenant, function, state, attempts, submitted_at_ms, started_at_ms, finished_at_ms, \
     request_head, request_body, response_head, response_body";

fn async_from_row(row: &Row) -> Result<AsyncInvocation> {
    let state: String = row.try_get(3)?;
    let request = message_from_parts(row.try_get(8)?, row.try_get(9)?)?.unwrap_or_default();
    Ok(AsyncInvocation {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        function: row.try_get(2)?,
        state: AsyncState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("unknown state {state:?}")))?,
        attempts: number(row.try_get(4)?),
        submitted_at_ms: row.try_get(5)?,
        started_at_ms: row.try_get(6)?,
        finished_at_ms: row.try_get(7)?,
        request,
        response: message_from_parts(row.try_get(10)?, row.try_get(11)?)?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    async fn ensure_tenant(&self, tenant: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO tenants (name, created_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&tenant, &now_ms()],
            )
            .await?;
        Ok(())
    }

    async fn tenant_exists(&self, tenant: &str) -> Result<bool> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT 1 FROM tenants WHERE name = $1", &[&tenant])
            .await?
            .is_some())
    }

    async fn list_tenants(&self) -> Result<Vec<String>> {
        let client = self.client().await?;
        let rows = client.query("SELECT name FROM tenants ORDER BY name", &[]).await?;
        Ok(rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>()?)
    }

    async fn insert_token(&self, token: TokenRecord) -> Result<()> {
        self.client()
            .await?
            .execute(
                &format!("INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
                &[
                    &token.id,
                    &token.tenant,
                    &token.role,
                    &token.operator,
                    &token.hash,
                    &token.created_at_ms,
                    &token.expires_at_ms,
                    &token.revoked_at_ms,
                ],
            )
            .await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1"), &[&hash])
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn has_operator_token(&self) -> Result<bool> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT 1 FROM tokens WHERE operator AND revoked_at_ms IS NULL LIMIT 1",
                &[],
            )
            .await?
            .is_some())
    }

    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"), &[&id])
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(&self, tenant: Option<&str>) -> Result<Vec<TokenRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE $1::TEXT IS NULL OR tenant = $1 ORDER BY created_at_ms, id"
                ),
                &[&tenant],
            )
            .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE tokens SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL",
            &[&id, &now_ms()],
        )
        .await?;
        let row = tx
            .query_opt(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"), &[&id])
            .await?;
        if row.is_some() {
            announce(&tx, &format!("token {id}")).await?;
        }
        tx.commit().await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn create_version(&self, new: NewVersion) -> Result<FunctionVersion> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = now_ms();
        // One statement takes the next number under the function's row lock:
        // two nodes deploying the same function at once get 1 and 2.
        let version: i32 = tx
            .query_one(
                "INSERT INTO functions AS f (tenant, name, latest_version, created_at_ms, deleted_at_ms)
                 VALUES ($1, $2, 1, $3, NULL)
                 ON CONFLICT (tenant, name) DO UPDATE SET latest_version = f.latest_version + 1, deleted_at_ms = NULL
                 RETURNING latest_version",
                &[&new.tenant, &new.name, &now],
            )
            .await?
            .try_get(0)?;
        tx.execute(
            "INSERT INTO function_versions (tenant, name, version, manifest, component, component_size, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &new.tenant,
                &new.name,
                &version,
                &new.manifest,
                &new.component.as_str(),
                &size(new.component_size),
                &now,
            ],
        )
        .await?;
        for artifact in &new.artifacts {
            tx.execute(
                "INSERT INTO version_artifacts (tenant, name, version, kind, artifact, digest, size)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &new.tenant,
                    &new.name,
                    &version,
                    &artifact.kind.as_str(),
                    &artifact.name,
                    &artifact.digest.as_str(),
                    &size(artifact.size),
                ],
            )
            .await?;
        }
        let pinned: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM aliases WHERE tenant = $1 AND name = $2 AND alias = $3)",
                &[&new.tenant, &new.name, &crate::LATEST],
            )
            .await?
            .try_get(0)?;
        if !pinned {
            let followed = AliasChange::follows(number(version), now);
            add_history(&tx, &new.tenant, &new.name, crate::LATEST, &followed).await?;
        }
        notify_function(&tx, &new.tenant, &new.name).await?;
        tx.commit().await?;
        let mut artifacts = new.artifacts;
        artifacts.sort();
        Ok(FunctionVersion {
            tenant: new.tenant,
            name: new.name,
            version: number(version),
            manifest: new.manifest,
            component: new.component,
            component_size: new.component_size,
            created_at_ms: now,
            artifacts,
        })
    }

    async fn latest_version(&self, tenant: &str, name: &str) -> Result<Option<FunctionVersion>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                     WHERE f.tenant = $1 AND f.name = $2 AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL
                     ORDER BY v.version DESC LIMIT 1"
                ),
                &[&tenant, &name],
            )
            .await?;
        Ok(with_artifacts(&client, rows).await?.pop())
    }

    async fn list_functions(&self, tenant: &str) -> Result<Vec<FunctionVersion>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name AND v.version = (
                         SELECT MAX(version) FROM function_versions
                         WHERE tenant = f.tenant AND name = f.name AND deleted_at_ms IS NULL)
                     WHERE f.tenant = $1 AND f.deleted_at_ms IS NULL ORDER BY f.name"
                ),
                &[&tenant],
            )
            .await?;
        with_artifacts(&client, rows).await
    }

    async fn list_versions(&self, tenant: &str, name: &str) -> Result<Vec<FunctionVersion>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                     WHERE f.tenant = $1 AND f.name = $2 AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL
                     ORDER BY v.version"
                ),
                &[&tenant, &name],
            )
            .await?;
        with_artifacts(&client, rows).await
    }

    async fn delete_function(&self, tenant: &str, name: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = now_ms();
        let changed = tx
            .execute(
                "UPDATE functions SET deleted_at_ms = $3 WHERE tenant = $1 AND name = $2 AND deleted_at_ms IS NULL",
                &[&tenant, &name, &now],
            )
            .await?;
        tx.execute(
            "UPDATE function_versions SET deleted_at_ms = $3 WHERE tenant = $1 AND name = $2 AND deleted_at_ms IS NULL",
            &[&tenant, &name, &now],
        )
        .await?;
        tx.execute("DELETE FROM aliases WHERE tenant = $1 AND name = $2", &[&tenant, &name])
            .await?;
        tx.execute(
            "DELETE FROM alias_history WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )
        .await?;
        if changed > 0 {
            notify_function(&tx, tenant, name).await?;
        }
        tx.commit().await?;
        Ok(changed > 0)
    }

    async fn version(&self, tenant: &str, name: &str, version: u32) -> Result<Option<FunctionVersion>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {VERSION_COLUMNS} FROM functions f
                     JOIN function_versions v ON v.tenant = f.tenant AND v.name = f.name
                     WHERE f.tenant = $1 AND f.name = $2 AND v.version = $3
                       AND f.deleted_at_ms IS NULL AND v.deleted_at_ms IS NULL"
                ),
                &[&tenant, &name, &signed(version)],
            )
            .await?;
        Ok(with_artifacts(&client, rows).await?.pop())
    }

    async fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let live = live_versions(&tx, tenant, name).await?;
        let aliases = aliases_of(&tx, tenant, name).await?;
        crate::check_version_deletion(version, &live, &aliases).map_err(StoreError::Refused)?;
        tx.execute(
            "UPDATE function_versions SET deleted_at_ms = $4 WHERE tenant = $1 AND name = $2 AND version = $3",
            &[&tenant, &name, &signed(version), &now_ms()],
        )
        .await?;
        notify_function(&tx, tenant, name).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_alias(
        &self,
        tenant: &str,
        name: &str,
        alias: &str,
        target: Option<AliasTarget>,
    ) -> Result<AliasChange> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let live = live_versions(&tx, tenant, name).await?;
        let now = now_ms();
        let change = match target {
            Some(target) => {
                crate::check_target(&target, &live).map_err(StoreError::Refused)?;
                tx.execute(
                    "INSERT INTO aliases (tenant, name, alias, target, set_at_ms) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (tenant, name, alias) DO UPDATE SET target = $4, set_at_ms = $5",
                    &[&tenant, &name, &alias, &crate::target_json(&target)?, &now],
                )
                .await?;
                AliasChange {
                    at_ms: now,
                    target: Some(target),
                    follows_newest: false,
                }
            }
            None => {
                let removed = tx
                    .execute(
                        "DELETE FROM aliases WHERE tenant = $1 AND name = $2 AND alias = $3",
                        &[&tenant, &name, &alias],
                    )
                    .await?;
                let (change, changed) = crate::unset_change(alias, &live, now, removed > 0)?;
                if !changed {
                    return Ok(change);
                }
                change
            }
        };
        add_history(&tx, tenant, name, alias, &change).await?;
        notify_function(&tx, tenant, name).await?;
        tx.commit().await?;
        Ok(change)
    }

    async fn aliases(&self, tenant: &str, name: &str) -> Result<Vec<Alias>> {
        let client = self.client().await?;
        aliases_of(&client, tenant, name).await
    }

    async fn alias_history(&self, tenant: &str, name: &str, alias: &str) -> Result<Vec<AliasChange>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT at_ms, target, follows_newest FROM alias_history
                 WHERE tenant = $1 AND name = $2 AND alias = $3 ORDER BY id",
                &[&tenant, &name, &alias],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let target: Option<String> = row.try_get(1)?;
                Ok(AliasChange {
                    at_ms: row.try_get(0)?,
                    target: target.as_deref().map(crate::target_from_json).transpose()?,
                    follows_newest: row.try_get(2)?,
                })
            })
            .collect()
    }

    async fn insert_async(&self, invocation: AsyncInvocation) -> Result<()> {
        let response_head = invocation.response.as_ref().map(head_json).transpose()?;
        self.client()
            .await?
            .execute(
                &format!(
                    "INSERT INTO async_invocations ({ASYNC_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
                ),
                &[
                    &invocation.id,
                    &invocation.tenant,
                    &invocation.function,
                    &invocation.state.as_str(),
                    &signed(invocation.attempts),
                    &invocation.submitted_at_ms,
                    &invocation.started_at_ms,
                    &invocation.finished_at_ms,
                    &head_json(&invocation.request)?,
                    &invocation.request.body,
                    &response_head,
                    &invocation.response.as_ref().map(|r| &r.body),
                ],
            )
            .await?;
        Ok(())
    }

    async fn async_invocation(&self, tenant: &str, id: &str) -> Result<Option<AsyncInvocation>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {ASYNC_COLUMNS} FROM async_invocations WHERE tenant = $1 AND id = $2"),
                &[&tenant, &id],
            )
            .await?;
        row.as_ref().map(async_from_row).transpose()
    }

    async fn claim_async(&self, node: &str, limit: usize, lease: Duration) -> Result<Vec<AsyncInvocation>> {
        let client = self.client().await?;
        // Tenants take turns (see `Store::claim_async`). SKIP LOCKED: nodes claiming at once each get different
        // rows, and none waits for another's transaction.
        let rows = client
            .query(
                &format!(
                    "UPDATE async_invocations SET state = 'running', attempts = attempts + 1, started_at_ms = $2, owner = $3
                     WHERE id IN (
                         SELECT a.id FROM async_invocations a JOIN (
                             SELECT q.id, ROW_NUMBER() OVER (PARTITION BY q.tenant ORDER BY q.submitted_at_ms, q.id) AS turn,
                                    served.last_start
                             FROM async_invocations q LEFT JOIN (
                                 SELECT tenant, MAX(started_at_ms) AS last_start FROM async_invocations GROUP BY tenant
                             ) served ON served.tenant = q.tenant
                             WHERE q.state = 'queued' OR (q.state = 'running' AND q.owner IS DISTINCT FROM $3 AND q.owner NOT IN (
                                 SELECT id FROM hearth_nodes WHERE heartbeat_at_ms > $4
                             ))
                         ) fair ON fair.id = a.id
                         ORDER BY fair.turn, fair.last_start ASC NULLS FIRST, a.submitted_at_ms, a.id
                         LIMIT $1 FOR UPDATE OF a SKIP LOCKED
                     )
                     RETURNING {ASYNC_COLUMNS}"
                ),
                &[
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    &now_ms(),
                    &node,
                    &(now_ms() - millis(lease)),
                ],
            )
            .await?;
        let mut claimed = rows.iter().map(async_from_row).collect::<Result<Vec<_>>>()?;
        claimed.sort_by(|a, b| (a.submitted_at_ms, &a.id).cmp(&(b.submitted_at_ms, &b.id)));
        Ok(claimed)
    }

    async fn finish_async(
        &self,
        id: &str,
        state: AsyncState,
        response: Option<StoredMessage>,
        attempted: bool,
    ) -> Result<()> {
        let head = response.as_ref().map(head_json).transpose()?;
        let finished = (state != AsyncState::Queued).then(now_ms);
        self.client()
            .await?
            .execute(
                "UPDATE async_invocations SET state = $2, finished_at_ms = $3, response_head = $4, response_body = $5,
                 attempts = attempts - $6 WHERE id = $1",
                &[
                    &id,
                    &state.as_str(),
                    &finished,
                    &head,
                    &response.map(|r| r.body),
                    &i32::from(!attempted),
                ],
            )
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO hearth_nodes (id, url, started_at_ms, heartbeat_at_ms, details) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET url = $2, started_at_ms = $3, heartbeat_at_ms = $4, details = $5",
                &[&node.id, &node.url, &node.started_at_ms, &now_ms(), &node.details],
            )
            .await?;
        Ok(())
    }

    async fn live_nodes(&self, lease: Duration) -> Result<Vec<NodeInfo>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, url, started_at_ms, heartbeat_at_ms, details FROM hearth_nodes
                 WHERE heartbeat_at_ms > $1 ORDER BY id",
                &[&(now_ms() - millis(lease))],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeInfo {
                    id: row.try_get(0)?,
                    url: row.try_get(1)?,
                    started_at_ms: row.try_get(2)?,
                    heartbeat_at_ms: row.try_get(3)?,
                    details: row.try_get(4)?,
                })
            })
            .collect()
    }

    fn changes(&self) -> Option<mpsc::Receiver<Change>> {
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(follow_changes(self.config.clone(), sender));
        Some(receiver)
    }

    async fn requeue_running_async(&self, node: &str) -> Result<usize> {
        let changed = self
            .client()
            .await?
            .execute(
                "UPDATE async_invocations SET state = 'queued' WHERE state = 'running' AND owner = $1",
                &[&node],
            )
            .await?;
        Ok(usize::try_from(changed).unwrap_or(usize::MAX))
    }

    async fn async_queued_bytes(&self, tenant: &str) -> Result<u64> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COALESCE(SUM(octet_length(request_body)), 0)::BIGINT FROM async_invocations
                 WHERE tenant = $1 AND state IN ('queued', 'running')",
                &[&tenant],
            )
            .await?;
        Ok(u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0))
    }

    async fn delete_finished_async(&self, before_ms: i64) -> Result<u64> {
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM async_invocations WHERE state IN ('succeeded', 'failed') AND finished_at_ms < $1",
                &[&before_ms],
            )
            .await?)
    }
}

/// Announces a change inside the transaction that made it: the counter
/// moves on, and the notification (sent at commit) carries its new value
/// and what changed: `SEQ function TENANT/NAME` or `SEQ token ID`.
async fn announce(tx: &deadpool_postgres::Transaction<'_>, what: &str) -> Result<()> {
    let seq: i64 = tx
        .query_one("UPDATE hearth_changes SET seq = seq + 1 RETURNING seq", &[])
        .await?
        .try_get(0)?;
    tx.execute(
        "SELECT pg_notify($1, $2)",
        &[&CHANGES_CHANNEL, &format!("{seq} {what}")],
    )
    .await?;
    Ok(())
}

async fn notify_function(tx: &deadpool_postgres::Transaction<'_>, tenant: &str, name: &str) -> Result<()> {
    announce(tx, &format!("function {tenant}/{name}")).await
}

/// Parses an announcement's payload.
fn parse_change(payload: &str) -> Option<(i64, Change)> {
    let mut parts = payload.splitn(3, ' ');
    let seq = parts.next()?.parse().ok()?;
    let change = match (parts.next()?, parts.next()?) {
        ("function", key) => {
            let (tenant, name) = key.split_once('/')?;
            Change::Function {
                tenant: tenant.to_owned(),
                name: name.to_owned(),
            }
        }
        ("token", id) => Change::Token { id: id.to_owned() },
        _ => Change::Unknown,
    };
    Some((seq, change))
}

/// Follows announcements on a connection of its own, forwarding them to
/// `changes`, until the receiver is dropped. Reconnects after a failure,
/// then says [`Change::Unknown`] (anything may have changed meanwhile); every
/// [`STALENESS_CHECK`] compares the counter with what it saw, and says
/// `Unknown` when an announcement went missing.
async fn follow_changes(config: tokio_postgres::Config, changes: mpsc::Sender<Change>) {
    let mut first = true;
    while !changes.is_closed() {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (notes, mut received) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let AsyncMessage::Notification(note) = message
                            && notes.send(note.payload().to_owned()).is_err()
                        {
                            return;
                        }
                    }
                });
                let followed = async {
                    client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}")).await?;
                    let mut seen: i64 = client
                        .query_one("SELECT seq FROM hearth_changes", &[])
                        .await?
                        .try_get(0)?;
                    if !first {
                        tracing::info!("following cluster changes again");
                        let _ = changes.send(Change::Unknown).await;
                    }
                    first = false;
                    let mut check = tokio::time::interval(STALENESS_CHECK);
                    loop {
                        tokio::select! {
                            payload = received.recv() => {
                                let Some(payload) = payload else { return Ok::<(), StoreError>(()) };
                                let (seq, change) = parse_change(&payload).unwrap_or((seen, Change::Unknown));
                                seen = seen.max(seq);
                                if changes.send(change).await.is_err() {
                                    return Ok(());
                                }
                            }
                            _ = check.tick() => {
                                let now: i64 = client.query_one("SELECT seq FROM hearth_changes", &[]).await?.try_get(0)?;
                                if now > seen {
                                    seen = now;
                                    if changes.send(Change::Unknown).await.is_err() {
                                        return Ok(());
                                    }
                                }
                            }
                        }
                    }
                };
                if let Err(err) = followed.await {
                    tracing::warn!(error = %err, "lost the cluster change feed; reconnecting");
                }
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "cannot follow cluster changes; retrying"),
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(STALENESS_CHECK).await;
        // Whatever happened while disconnected is unknown.
        first = false;
    }
}
