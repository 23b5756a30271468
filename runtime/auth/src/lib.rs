//! Who is calling: bearer tokens, their tenants and roles.
//!
//! Tokens are random 256-bit secrets shown once at creation; the store keeps
//! only their SHA-256, so a leaked database does not leak credentials. Because
//! the secret has full entropy, an unsalted hash is enough, and looking a
//! token up by its hash reveals nothing useful through timing. Verified tokens
//! are cached in memory: a revocation in this process evicts them at once,
//! and every entry is re-read from the store after [`CACHE_TTL`], so a
//! revocation made by another server sharing the store (a cluster) takes
//! effect within that time.
//!
//! Failed authentications are cheap for the server: a token the store did
//! not know is remembered for [`CACHE_TTL`] (repeating it costs no lookup),
//! and lookups that find nothing are a token bucket of
//! [`FAILED_LOOKUPS_PER_SECOND`] (burst [`FAILED_LOOKUP_BURST`]). While it is
//! empty an uncached token is answered 503 with `Retry-After` instead of
//! being looked up, so a flood of random tokens costs the store at most
//! `FAILED_LOOKUP_BURST + FAILED_LOOKUPS_PER_SECOND × seconds` lookups.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use dashmap::DashMap;
use hearth_store::{Store, StoreError, TokenRecord, now_ms};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The tenant that exists from the first start; operator tokens belong to it.
pub const DEFAULT_TENANT: &str = "default";
/// Prefix of every token Hearth issues, so leaked tokens are easy to scan for.
pub const TOKEN_PREFIX: &str = "hth_";

/// What a token may do in its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything in its tenant.
    Admin,
    /// Deploy, list, show and delete functions.
    Deployer,
    /// Invoke functions.
    Invoker,
    /// Read usage.
    Billing,
}

impl Role {
    /// Parses a stored or user-given role name.
    pub fn parse(name: &str) -> Option<Role> {
        Some(match name {
            "admin" => Role::Admin,
            "deployer" => Role::Deployer,
            "invoker" => Role::Invoker,
            "billing" => Role::Billing,
            _ => return None,
        })
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Deployer => "deployer",
            Role::Invoker => "invoker",
            Role::Billing => "billing",
        }
    }
}

/// Something a caller wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deploy or delete a function.
    Deploy,
    /// List or show functions.
    ReadFunctions,
    /// Invoke a function.
    Invoke,
    /// Read usage records and summaries.
    ReadUsage,
    /// Create, list and revoke tokens.
    ManageTokens,
}

impl Action {
    fn allowed_for(self, role: Role) -> bool {
        matches!(
            (self, role),
            (_, Role::Admin)
                | (Action::Deploy | Action::ReadFunctions, Role::Deployer)
                | (Action::Invoke, Role::Invoker)
                | (Action::ReadUsage, Role::Billing)
        )
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's public id.
    pub token_id: String,
    /// The tenant the token acts for.
    pub tenant: String,
    /// Its role there.
    pub role: Role,
    /// Operator tokens act in every tenant.
    pub operator: bool,
}

impl Principal {
    /// Checks that the caller may do `action` in `tenant`. A tenant the
    /// caller does not belong to is [`AuthError::OtherTenant`], which callers
    /// answer as "not found", never revealing that it exists.
    pub fn authorize(&self, action: Action, tenant: &str) -> Result<(), AuthError> {
        if !self.operator && self.tenant != tenant {
            return Err(AuthError::OtherTenant);
        }
        if !action.allowed_for(self.role) {
            return Err(AuthError::Forbidden {
                role: self.role,
                action,
            });
        }
        Ok(())
    }
}

/// Why a request is not authenticated or not allowed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("this endpoint needs a bearer token (Authorization: Bearer <token>)")]
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("malformed Authorization header: expected `Bearer <token>`")]
    Malformed,
    /// A token Hearth never issued.
    #[error("unknown token")]
    Unknown,
    /// An expired token.
    #[error("token expired")]
    Expired,
    /// A revoked token.
    #[error("token revoked")]
    Revoked,
    /// A valid token whose role does not allow the action.
    #[error("role `{}` may not {action:?}", role.as_str())]
    Forbidden {
        /// The caller's role.
        role: Role,
        /// What it tried.
        action: Action,
    },
    /// A valid token of another tenant.
    #[error("not found")]
    OtherTenant,
    /// Too many failed lookups lately: an uncached token waits (503).
    #[error("too many unknown tokens were tried lately; retry in {}s", retry_after.as_secs())]
    Throttled {
        /// When a lookup is possible again.
        retry_after: std::time::Duration,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a verified token is trusted from memory before the store is
/// asked again.
pub const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Sustained store lookups per second that may find nothing.
pub const FAILED_LOOKUPS_PER_SECOND: f64 = 10.0;
/// Store lookups that may find nothing in a burst.
pub const FAILED_LOOKUP_BURST: f64 = 50.0;
/// Unknown tokens remembered at most (the memory an attacker can fill);
/// beyond it those older than half the TTL are forgotten (all of them, if
/// that is not enough).
const MAX_UNKNOWN_REMEMBERED: usize = 10_000;

/// Authenticates tokens against the store.
#[derive(Debug, Clone)]
pub struct Auth {
    store: Arc<dyn Store>,
    verified: Arc<DashMap<String, (TokenRecord, tokio::time::Instant), foldhash::fast::RandomState>>,
    /// Hashes of tokens the store did not know, and when it said so.
    unknown: Arc<DashMap<String, tokio::time::Instant>>,
    /// Bumped by every eviction from `verified`, so that a lookup that
    /// raced a revocation does not cache the record it read before it.
    evictions: Arc<AtomicU64>,
    /// Lookups that may still find nothing.
    failures: Arc<Mutex<Bucket>>,
    counts: Arc<Counts>,
}

/// What authentication cost, for the `hearth_auth_*` metrics.
#[derive(Debug, Default)]
struct Counts {
    lookups: AtomicU64,
    throttled: AtomicU64,
}

/// Counters of [`Auth`]'s work since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthStats {
    /// Token lookups that reached the store.
    pub store_lookups: u64,
    /// Authentications refused without a lookup because too many failed.
    pub throttled: u64,
}

/// A token bucket of lookups allowed to fail.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: tokio::time::Instant,
}

impl Bucket {
    /// Takes one token, or says how long until one is there.
    fn take(&mut self) -> Result<(), std::time::Duration> {
        let now = tokio::time::Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * FAILED_LOOKUPS_PER_SECOND).min(FAILED_LOOKUP_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            let wait = (1.0 - self.tokens) / FAILED_LOOKUPS_PER_SECOND;
            return Err(std::time::Duration::from_secs(wait.ceil().max(1.0) as u64));
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// Gives back a token taken for a lookup that found its token.
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(FAILED_LOOKUP_BURST);
    }
}

/// Whether two secrets (or values derived from them) are equal, compared in
/// time that does not depend on where they differ.
pub fn secrets_match(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Hex SHA-256 of a token secret. Every authenticated request hashes its
/// token: written into a buffer at once, not through `hex::encode`'s
/// character iterator (a third of a microsecond a request), and taken as
/// text with a plain UTF-8 check (a lossy conversion costs a fifth of a
/// microsecond more, in `perf`).
pub fn hash_token(token: &str) -> String {
    let mut hex = [0u8; 64];
    // 32 bytes fill 64 hex digits exactly, so this cannot fail, and hex
    // digits are ASCII.
    let _ = hex::encode_to_slice(Sha256::digest(token.as_bytes()), &mut hex);
    std::str::from_utf8(&hex).unwrap_or_default().to_owned()
}

/// A fresh random token: `hth_` and 43 base64url characters (256 bits).
pub fn generate_token() -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// The stored record of a new token `token` (created now, never expiring,
/// not revoked); its id is `tok_` and a UUIDv7, which `revoke` relies on.
fn new_record(token: &str, tenant: &str, role: Role, operator: bool) -> TokenRecord {
    TokenRecord {
        id: format!("tok_{}", uuid::Uuid::now_v7().simple()),
        tenant: tenant.to_owned(),
        role: role.as_str().into(),
        operator,
        hash: hash_token(token),
        created_at_ms: now_ms(),
        expires_at_ms: None,
        revoked_at_ms: None,
    }
}

/// A token just created: its record and the secret, shown this once.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The stored record (hash, not secret).
    pub record: TokenRecord,
    /// The secret to hand to the user.
    pub token: String,
}

impl Auth {
    /// Creates a token for `tenant` with `role`, valid for `ttl` (forever
    /// with `None`). The caller must be an admin of `tenant`; creating the
    /// first token of a new tenant (which creates the tenant) takes the
    /// operator's admin token.
    pub async fn create_token(
        &self,
        caller: &Principal,
        tenant: &str,
        role: Role,
        ttl: Option<std::time::Duration>,
    ) -> Result<NewToken, AuthError> {
        caller.authorize(Action::ManageTokens, tenant)?;
        if !self.store.tenant_exists(tenant).await? {
            // Only the operator reaches here for a tenant other than its own.
            self.store.ensure_tenant(tenant).await?;
        }
        let token = generate_token();
        let mut record = new_record(&token, tenant, role, false);
        record.expires_at_ms = ttl.map(|ttl| {
            record
                .created_at_ms
                .saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
        });
        self.store.insert_token(record.clone()).await?;
        Ok(NewToken { record, token })
    }

    /// The tokens of `tenant` the caller may manage.
    pub async fn list_tokens(&self, caller: &Principal, tenant: &str) -> Result<Vec<TokenRecord>, AuthError> {
        caller.authorize(Action::ManageTokens, tenant)?;
        Ok(self.store.list_tokens(Some(tenant)).await?)
    }

    /// Revokes a token named by its id (`tok_…`) or by the token itself.
    /// Effective at once: the verified-token cache forgets it. A token the
    /// caller may not manage is [`AuthError::OtherTenant`] (answered 404).
    pub async fn revoke(&self, caller: &Principal, id_or_token: &str) -> Result<TokenRecord, AuthError> {
        let record = if id_or_token.starts_with("tok_") {
            self.store.token_by_id(id_or_token).await?
        } else {
            self.store.token_by_hash(&hash_token(id_or_token)).await?
        };
        let record = record.ok_or(AuthError::OtherTenant)?;
        caller.authorize(Action::ManageTokens, &record.tenant)?;
        if record.operator && !caller.operator {
            return Err(AuthError::OtherTenant);
        }
        let revoked = self
            .store
            .revoke_token(&record.id)
            .await?
            .ok_or(AuthError::OtherTenant)?;
        self.evictions.fetch_add(1, Ordering::SeqCst);
        self.verified.remove(&revoked.hash);
        Ok(revoked)
    }

    /// Drops the cached copy of a token changed elsewhere (revoked through
    /// another node of a cluster).
    pub fn forget_token(&self, id: &str) {
        self.evictions.fetch_add(1, Ordering::SeqCst);
        self.verified.retain(|_, (record, _)| record.id != id);
    }

    /// Drops every cached token (something changed elsewhere, unsaid).
    pub fn forget_all(&self) {
        self.evictions.fetch_add(1, Ordering::SeqCst);
        self.verified.clear();
        self.unknown.clear();
    }

    /// Authenticates against `store`.
    pub fn new(store: Arc<dyn Store>) -> Auth {
        Auth {
            store,
            verified: Arc::new(DashMap::default()),
            unknown: Arc::new(DashMap::new()),
            evictions: Arc::new(AtomicU64::new(0)),
            failures: Arc::new(Mutex::new(Bucket {
                tokens: FAILED_LOOKUP_BURST,
                refilled: tokio::time::Instant::now(),
            })),
            counts: Arc::default(),
        }
    }

    /// Registers `hearth_auth_events_total`: token lookups that reached the
    /// store (`event="store_lookup"`) and authentications refused unlooked
    /// because too many failed lately (`event="throttled"`).
    pub fn observe(&self, meter: &opentelemetry::metrics::Meter) {
        let counts = Arc::downgrade(&self.counts);
        let _events = meter
            .u64_observable_counter("hearth.auth.events")
            .with_description("Authentication work: store lookups of uncached tokens, throttled attempts")
            .with_callback(move |counter| {
                if let Some(counts) = counts.upgrade() {
                    for (event, n) in [("store_lookup", &counts.lookups), ("throttled", &counts.throttled)] {
                        counter.observe(
                            n.load(Ordering::Relaxed),
                            &[opentelemetry::KeyValue::new("event", event)],
                        );
                    }
                }
            })
            .build();
    }

    /// What authentication has cost since start.
    pub fn stats(&self) -> AuthStats {
        AuthStats {
            store_lookups: self.counts.lookups.load(Ordering::Relaxed),
            throttled: self.counts.throttled.load(Ordering::Relaxed),
        }
    }

    /// Makes sure the default tenant and an operator token exist. With
    /// `configured` (from `HEARTH_ADMIN_TOKEN`) that token is registered if
    /// new, and every other operator token is revoked: changing the
    /// variable is how an operator rotates a leaked admin token (a token
    /// rotated away stays revoked: starting with it again is
    /// [`AuthError::Revoked`]). Otherwise,
    /// on the first start only, a token is generated and returned so the
    /// caller can save it once; it is never shown again.
    pub async fn bootstrap(&self, configured: Option<&str>) -> Result<Option<String>, AuthError> {
        self.store.ensure_tenant(DEFAULT_TENANT).await?;
        let (token, generated) = match configured {
            Some(token) => {
                let hash = hash_token(token);
                let current = match self.store.token_by_hash(&hash).await? {
                    Some(current) => current,
                    None => {
                        let record = new_record(token, DEFAULT_TENANT, Role::Admin, true);
                        self.store.insert_token(record.clone()).await?;
                        record
                    }
                };
                if current.revoked_at_ms.is_some() {
                    // A rotated-away token set again (an old pod restarting
                    // with an old secret): it stays revoked and revokes
                    // nothing.
                    return Err(AuthError::Revoked);
                }
                // Only older operator tokens: a node started with an older
                // secret must not revoke a newer one.
                for previous in self.store.list_tokens(Some(DEFAULT_TENANT)).await? {
                    if previous.operator
                        && previous.revoked_at_ms.is_none()
                        && previous.hash != hash
                        && previous.created_at_ms <= current.created_at_ms
                    {
                        self.store.revoke_token(&previous.id).await?;
                    }
                }
                return Ok(None);
            }
            None if self.store.has_operator_token().await? => return Ok(None),
            None => (generate_token(), true),
        };
        self.store
            .insert_token(new_record(&token, DEFAULT_TENANT, Role::Admin, true))
            .await?;
        Ok(generated.then_some(token))
    }

    /// The record of the token hashing to `hash`, from the store, cached
    /// unless an eviction raced the lookup. Unknown tokens are remembered,
    /// and lookups that find nothing are rationed (see the module's docs).
    async fn look_up(&self, hash: &str) -> Result<TokenRecord, AuthError> {
        if self.unknown.get(hash).is_some_and(|at| at.elapsed() < CACHE_TTL) {
            return Err(AuthError::Unknown);
        }
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map_err(|retry_after| {
                self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                AuthError::Throttled { retry_after }
            })?;
        let evictions = self.evictions.load(Ordering::SeqCst);
        self.counts.lookups.fetch_add(1, Ordering::Relaxed);
        let found = self.store.token_by_hash(hash).await;
        // Only a lookup that found nothing is a failure: a found token, or
        // a store that did not answer, gives its bucket token back.
        if !matches!(found, Ok(None)) {
            self.failures.lock().unwrap_or_else(PoisonError::into_inner).give_back();
        }
        let Ok(Some(record)) = found else {
            if matches!(found, Ok(None)) {
                self.remember_unknown(hash);
            }
            return Err(found.err().map_or(AuthError::Unknown, AuthError::Store));
        };
        self.cache_unless_evicted(hash, &record, evictions);
        Ok(record)
    }

    /// Caches `record`, read from the store when the eviction count was
    /// `evictions`. An eviction since (a revocation that ran during the
    /// lookup, maybe before this insert) means it may be stale: not kept.
    fn cache_unless_evicted(&self, hash: &str, record: &TokenRecord, evictions: u64) {
        self.verified
            .insert(hash.to_owned(), (record.clone(), tokio::time::Instant::now()));
        if self.evictions.load(Ordering::SeqCst) != evictions {
            self.verified.remove(hash);
        }
    }

    fn remember_unknown(&self, hash: &str) {
        if self.unknown.len() >= MAX_UNKNOWN_REMEMBERED {
            let now = tokio::time::Instant::now();
            self.unknown.retain(|_, at| now.duration_since(*at) < CACHE_TTL / 2);
            if self.unknown.len() >= MAX_UNKNOWN_REMEMBERED {
                self.unknown.clear();
            }
        }
        self.unknown.insert(hash.to_owned(), tokio::time::Instant::now());
    }

    /// Authenticates the value of an `Authorization` header. Checked on every
    /// request (also on kept-alive connections), so a revocation applies to
    /// the next request.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        let hash = hash_token(token);
        // A cached token is checked where it lies: only the principal's
        // strings are copied, not the record's.
        let cached = self
            .verified
            .get(&hash)
            .filter(|entry| entry.1.elapsed() < CACHE_TTL)
            .map(|entry| principal_of(&entry.0, &hash));
        match cached {
            Some(principal) => principal,
            None => principal_of(&self.look_up(&hash).await?, &hash),
        }
    }
}

/// Who a token's record says the caller is, if it holds for the token
/// hashing to `hash` now.
fn principal_of(record: &TokenRecord, hash: &str) -> Result<Principal, AuthError> {
    // The look-up was by hash; compare again in constant time so that no
    // code path ever branches early on secret-derived bytes.
    if !secrets_match(&record.hash, hash) {
        return Err(AuthError::Unknown);
    }
    if record.revoked_at_ms.is_some() {
        return Err(AuthError::Revoked);
    }
    if record.expires_at_ms.is_some_and(|at| at <= now_ms()) {
        return Err(AuthError::Expired);
    }
    let role = Role::parse(&record.role)
        .ok_or_else(|| StoreError::Corrupt(format!("token {}: unknown role {:?}", record.id, record.role)))?;
    Ok(Principal {
        token_id: record.id.clone(),
        tenant: record.tenant.clone(),
        role,
        operator: record.operator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_store::SqliteStore;

    #[tokio::test]
    async fn bootstrap_generates_once_and_authenticates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let auth = Auth::new(store.clone());
        let token = auth
            .bootstrap(None)
            .await
            .expect("bootstrap")
            .expect("first start prints a token");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(auth.bootstrap(None).await.expect("again"), None, "shown only once");

        let who = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .await
            .expect("valid");
        assert!(who.operator);
        assert_eq!(who.role, Role::Admin);
        who.authorize(Action::Deploy, "anyone")
            .expect("operator acts everywhere");

        assert!(matches!(auth.authenticate(None).await, Err(AuthError::Missing)));
        assert!(matches!(
            auth.authenticate(Some("Basic abc")).await,
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            auth.authenticate(Some("Bearer nope")).await,
            Err(AuthError::Unknown)
        ));
    }

    /// Two servers over one store, as in a cluster: a revocation on one
    /// reaches the other's cache within `CACHE_TTL`.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_elsewhere_takes_effect_after_the_cache_ttl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let (here, elsewhere) = (Auth::new(store.clone()), Auth::new(store));
        let token = here.bootstrap(None).await.expect("bootstrap").expect("token");
        let header = format!("Bearer {token}");
        let operator = here.authenticate(Some(&header)).await.expect("valid");
        elsewhere.revoke(&operator, &token).await.expect("revoked elsewhere");
        assert!(matches!(
            elsewhere.authenticate(Some(&header)).await,
            Err(AuthError::Revoked)
        ));
        here.authenticate(Some(&header)).await.expect("still cached here");
        tokio::time::advance(CACHE_TTL).await;
        assert!(matches!(
            here.authenticate(Some(&header)).await,
            Err(AuthError::Revoked)
        ));
    }

    #[tokio::test]
    async fn configured_token_is_registered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let auth = Auth::new(store);
        assert_eq!(auth.bootstrap(Some("secret-from-env")).await.expect("bootstrap"), None);
        auth.authenticate(Some("Bearer secret-from-env")).await.expect("valid");
    }

    #[tokio::test]
    async fn a_changed_admin_token_revokes_the_previous_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let generated = Auth::new(store.clone())
            .bootstrap(None)
            .await
            .expect("bootstrap")
            .expect("generated");
        let auth = Auth::new(store.clone());
        auth.bootstrap(Some("first-from-env")).await.expect("first");
        auth.bootstrap(Some("second-from-env")).await.expect("second");
        auth.authenticate(Some("Bearer second-from-env"))
            .await
            .expect("current");
        for old in [generated.as_str(), "first-from-env"] {
            assert!(
                matches!(
                    auth.authenticate(Some(&format!("Bearer {old}"))).await,
                    Err(AuthError::Revoked)
                ),
                "{old}"
            );
        }
        // Starting again with the same token changes nothing.
        auth.bootstrap(Some("second-from-env")).await.expect("again");
        auth.authenticate(Some("Bearer second-from-env"))
            .await
            .expect("still current");
        // A node started with the older, rotated-away secret is refused and
        // revokes nothing.
        assert!(matches!(
            auth.bootstrap(Some("first-from-env")).await,
            Err(AuthError::Revoked)
        ));
        auth.forget_all();
        auth.authenticate(Some("Bearer second-from-env"))
            .await
            .expect("the newer token survives an old secret");
    }

    /// A lookup that read the record before a revocation evicted it must
    /// not put it back in the cache.
    #[tokio::test]
    async fn a_lookup_racing_a_revocation_does_not_recache_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let auth = Auth::new(store.clone());
        let token = auth.bootstrap(None).await.expect("bootstrap").expect("token");
        let header = format!("Bearer {token}");
        let operator = auth.authenticate(Some(&header)).await.expect("valid");
        auth.forget_all();
        // The lookup's read happened (the record, not yet revoked), then
        // the revocation ran, then the lookup stores what it read.
        let stale = store
            .token_by_hash(&hash_token(&token))
            .await
            .expect("read")
            .expect("record");
        let evictions = auth.evictions.load(Ordering::SeqCst);
        auth.revoke(&operator, &token).await.expect("revoke");
        auth.cache_unless_evicted(&hash_token(&token), &stale, evictions);
        assert!(matches!(
            auth.authenticate(Some(&header)).await,
            Err(AuthError::Revoked)
        ));
    }

    /// Random tokens cost a bounded number of store lookups; a repeated
    /// unknown token costs none; a valid token still passes (its lookup
    /// finds it, so it does not drain the bucket).
    #[tokio::test(start_paused = true)]
    async fn failed_lookups_are_rationed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("open"));
        let auth = Auth::new(store.clone());
        let token = auth.bootstrap(None).await.expect("bootstrap").expect("token");
        let (mut unknown, mut throttled) = (0, 0);
        for _ in 0..1_000 {
            match auth.authenticate(Some(&format!("Bearer {}", generate_token()))).await {
                Err(AuthError::Unknown) => unknown += 1,
                Err(AuthError::Throttled { retry_after }) => {
                    assert!(retry_after >= std::time::Duration::from_secs(1));
                    throttled += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(unknown, FAILED_LOOKUP_BURST as u64);
        assert_eq!(throttled, 1_000 - unknown);
        assert_eq!(
            auth.stats(),
            AuthStats {
                store_lookups: FAILED_LOOKUP_BURST as u64,
                throttled
            }
        );
        // A second later the bucket has refilled by the rate.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        auth.authenticate(Some(&format!("Bearer {token}")))
            .await
            .expect("valid");
        let repeated = format!("Bearer {}", generate_token());
        for _ in 0..100 {
            let _ = auth.authenticate(Some(&repeated)).await;
        }
        assert_eq!(
            auth.stats().store_lookups,
            FAILED_LOOKUP_BURST as u64 + 2,
            "the valid token and the repeated unknown one were looked up once each"
        );
    }

    #[test]
    fn token_hashes_are_lowercase_hex_sha256() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn roles_allow_exactly_their_actions() {
        let who = |role| Principal {
            token_id: "t".into(),
            tenant: "acme".into(),
            role,
            operator: false,
        };
        assert!(who(Role::Invoker).authorize(Action::Invoke, "acme").is_ok());
        assert!(matches!(
            who(Role::Invoker).authorize(Action::Deploy, "acme"),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(who(Role::Deployer).authorize(Action::Deploy, "acme").is_ok());
        assert!(matches!(
            who(Role::Deployer).authorize(Action::Invoke, "acme"),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(matches!(
            who(Role::Billing).authorize(Action::ReadFunctions, "acme"),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(matches!(
            who(Role::Admin).authorize(Action::Invoke, "other"),
            Err(AuthError::OtherTenant)
        ));
    }
}
