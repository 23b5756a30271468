//! The function manifest, `hearth.toml`: what a user writes to deploy a function.
//!
//! Both sides read it: the CLI (to find the component and run `build`) and the
//! server (to apply limits and scaling). Parsing is strict: an unknown key is an
//! error that names the key with its full path (`limits.memory_mbb`), and every
//! value is checked against the bounds below, so a typo never silently becomes a
//! default. [`validate_name`] is the one rule for every user-chosen name that may
//! reach a file path or a URL.

use serde::{Deserialize, Serialize};

/// Default per-instance memory limit, in MiB.
pub const DEFAULT_MEMORY_MB: u32 = 128;
/// Largest memory limit a manifest may ask for, in MiB; a server may allow less.
pub const MAX_MEMORY_MB: u32 = 4096;
/// Default wall-clock deadline of one invocation, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u32 = 10_000;
/// Longest deadline a manifest may ask for: 15 minutes.
pub const MAX_TIMEOUT_MS: u32 = 15 * 60 * 1000;
/// Default idle time before an unused instance is dropped, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_S: u32 = 60;
/// Default upper bound on concurrent instances of one function.
pub const DEFAULT_MAX_INSTANCES: u32 = 32;
/// Longest name (function, model, tenant) accepted.
pub const MAX_NAME_LEN: usize = 63;
/// Default bytes of a function version's response cache.
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;
/// Largest response cache a manifest may ask for: 256 MiB per version.
pub const MAX_CACHE_BYTES: u64 = 256 << 20;
/// Longest time a cached response may be kept: a day.
pub const MAX_CACHE_TTL_S: u32 = 86_400;

/// Result of parsing or validating a manifest.
pub type Result<T, E = ManifestError> = std::result::Result<T, E>;

/// Why a manifest was refused. Each variant names the offending key, so the
/// CLI and the control API can point the user at the line to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not TOML, or a value of the wrong type.
    #[error("hearth.toml: {message}")]
    Syntax {
        /// The parser's message, with line and column.
        message: String,
    },
    /// Keys that the format does not have.
    #[error("hearth.toml: unknown key{} {}", if keys.len() == 1 { "" } else { "s" }, keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))]
    UnknownKeys {
        /// Full paths of the unknown keys, e.g. `limits.memory_mbb`.
        keys: Vec<String>,
    },
    /// A known key with a value out of bounds.
    #[error("hearth.toml: `{key}`: {reason}")]
    Invalid {
        /// Full path of the key.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl ManifestError {
    /// The first key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ManifestError::Syntax { .. } => None,
            ManifestError::UnknownKeys { keys } => keys.first().map(String::as_str),
            ManifestError::Invalid { key, .. } => Some(key),
        }
    }
}

/// A parsed and validated `hearth.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Function name: the `{function}` in `/fn/{tenant}/{function}/`.
    pub name: String,
    /// Path of the built component, relative to the manifest (client side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Shell command that builds the component, run by `hearth deploy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Whether invocation needs no token.
    #[serde(default)]
    pub public: bool,
    /// Origins (`https://api.example.com`, `http://10.0.0.5:8080`) the guest
    /// may send HTTP requests to; every other outgoing request is refused,
    /// the server's own address and loopback included unless listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_outbound_hosts: Vec<String>,
    /// Models the function loads through wasi-nn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelSpec>,
    /// Read-only assets mounted into the guest's filesystem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileSpec>,
    /// Per-instance limits.
    #[serde(default)]
    pub limits: Limits,
    /// How instances scale.
    #[serde(default)]
    pub scaling: Scaling,
    /// Responses kept and answered again without running the function
    /// (opt-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
}

/// `[cache]`: repeated requests answered from memory. Only `200` answers to
/// `GET` and `POST` are kept, keyed by the version, method, path, query,
/// the `vary` headers and the body; a guest's `cache-control: no-store`
/// (or `private`, `no-cache`) or a shorter `max-age` wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// How long an answer is kept, in seconds.
    pub ttl_s: u32,
    /// Bytes of answers (bodies and headers) kept at most, per version; the
    /// least recently used go first.
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: u64,
    /// Request headers that are part of the key (`content-type`, `accept`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vary: Vec<String>,
}

fn default_cache_bytes() -> u64 {
    DEFAULT_CACHE_BYTES
}

/// An origin a guest may send requests to: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Whether the scheme is `https`.
    pub https: bool,
    /// Host name or address, lowercase.
    pub host: String,
    /// Port (the scheme's default when not written).
    pub port: u16,
}

impl Origin {
    /// Parses `http(s)://host[:port]` (nothing after the authority but an
    /// optional `/`).
    pub fn parse(text: &str) -> std::result::Result<Origin, String> {
        let uri: http::Uri = text.parse().map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        let (https, port) =
            scheme_and_port(&uri).ok_or_else(|| format!("`{text}`: the scheme must be http or https"))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty() && !h.contains('*'))
            .ok_or_else(|| format!("`{text}` names no host (wildcards are not supported)"))?;
        if !is_host(host) {
            return Err(format!("`{text}`: `{host}` is neither a DNS name nor an IP address"));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(format!("`{text}`: give an origin only, without a path or query"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("`{text}`: credentials do not belong in an origin"));
        }
        Ok(Origin {
            https,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether `uri` (an outgoing request's) is on this origin.
    pub fn matches(&self, uri: &http::Uri) -> bool {
        let (Some((https, port)), Some(host)) = (scheme_and_port(uri), uri.host()) else {
            return false;
        };
        https == self.https && port == self.port && host.eq_ignore_ascii_case(&self.host)
    }
}

/// Whether `uri` is HTTPS, and its port (the scheme's default when it names
/// none); `None` for schemes other than `http` and `https`.
pub fn scheme_and_port(uri: &http::Uri) -> Option<(bool, u16)> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return None,
    };
    Some((https, uri.port_u16().unwrap_or(if https { 443 } else { 80 })))
}

/// Whether `host` (as `http::Uri::host` gives it) is a DNS name
/// (`[a-z0-9-]` labels of 1 to 63 characters, 253 in all) or an IP address
/// (IPv6 in brackets).
fn is_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A model the function names in `[[models]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Name the guest passes to `load-by-name`.
    pub name: String,
    /// Path of the ONNX file, relative to the manifest.
    pub path: String,
    /// Where to run it.
    #[serde(default)]
    pub device: DeviceWish,
    /// Calls whose outputs are kept, so identical inputs are answered
    /// without running the model (0, the default: none). Shared by the
    /// tenant's functions that name the same model file.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_entries: u32,
    /// Largest batch this model's calls join, in rows (unset: the server's
    /// `--batch-max-rows`, which also caps it; 1 turns batching off for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// Longest a call waits for others to join its batch while its device
    /// is free, in milliseconds: a smaller share of compute for more latency
    /// (unset: the server's `--batch-window-ms`, 0 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u32>,
    /// Whether callers may run the model directly, with no guest, through
    /// the Open Inference Protocol (`/v2/models/{function}.{model}/…`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub serve: bool,
}

/// Largest `max_batch` a manifest may ask for.
pub const MAX_BATCH_ROWS: u32 = 4096;
/// Longest `max_delay_ms` a manifest may ask for.
pub const MAX_BATCH_DELAY_MS: u32 = 10_000;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most calls an inference cache may keep.
pub const MAX_CACHE_ENTRIES: u32 = 100_000;

/// A read-only asset in `[[files]]`: a file next to the manifest, deployed
/// with the function and visible to the guest at `target` (and nothing else
/// of the host is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Path of the file, relative to the manifest (client side).
    pub source: String,
    /// Absolute path the guest opens it at, e.g. `/assets/labels.txt`.
    pub target: String,
}

/// The device a model asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceWish {
    /// A GPU when one has room, else the CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// A GPU; deploy fails without one.
    Gpu,
}

/// `[limits]`: what one instance may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Linear memory cap per instance, in MiB.
    pub memory_mb: u32,
    /// Wall-clock deadline of one invocation, in milliseconds.
    pub timeout_ms: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mb: DEFAULT_MEMORY_MB,
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

/// `[scaling]`: how many instances, for how long, at what priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Scaling {
    /// Instances kept warm even when idle.
    pub min_instances: u32,
    /// Upper bound on concurrent instances.
    pub max_instances: u32,
    /// Seconds an idle instance is kept before it is dropped.
    pub idle_timeout_s: u32,
    /// Admission class.
    pub qos: Qos,
    /// Whether a warm instance may serve further requests after its first
    /// (up to the server's reuse limit). `false` gives every request a fresh
    /// instance: no state can leak from one request to the next.
    pub reuse: bool,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            min_instances: 0,
            max_instances: DEFAULT_MAX_INSTANCES,
            idle_timeout_s: DEFAULT_IDLE_TIMEOUT_S,
            qos: Qos::Standard,
            reuse: true,
        }
    }
}

/// Admission class of a function's invocations, ordered by urgency
/// (`Batch < Standard < Realtime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    /// Served when nothing more urgent waits.
    Batch,
    /// The default.
    #[default]
    Standard,
    /// Served first.
    Realtime,
}

impl Qos {
    /// Every class, least urgent first.
    pub const ALL: [Qos; 3] = [Qos::Batch, Qos::Standard, Qos::Realtime];

    /// How urgent the class is, least urgent 0: what the model batcher
    /// orders rows by.
    pub fn urgency(self) -> u8 {
        match self {
            Qos::Batch => 0,
            Qos::Standard => 1,
            Qos::Realtime => 2,
        }
    }

    /// The name used in manifests, headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Qos::Batch => "batch",
            Qos::Standard => "standard",
            Qos::Realtime => "realtime",
        }
    }
}

impl std::fmt::Display for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Qos {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Qos, String> {
        Qos::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| format!("unknown QoS class `{s}` (expected realtime, standard or batch)"))
    }
}

impl Manifest {
    /// Parses and validates a manifest from TOML text.
    pub fn from_toml(text: &str) -> Result<Manifest> {
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ManifestError::Syntax {
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut unknown = Vec::new();
        let manifest: Manifest = serde_ignored::deserialize(deserializer, |path| {
            unknown.push(path.to_string());
        })
        .map_err(|e| ManifestError::Syntax {
            message: e.to_string().trim_end().to_owned(),
        })?;
        if !unknown.is_empty() {
            return Err(ManifestError::UnknownKeys { keys: unknown });
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serialises the manifest back to TOML (what the control API stores).
    pub fn to_toml(&self) -> String {
        // Every field is a plain string, number, bool or table: serialising
        // cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every value against its bounds.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name).map_err(|reason| invalid("name", reason))?;
        for (i, origin) in self.allowed_outbound_hosts.iter().enumerate() {
            Origin::parse(origin).map_err(|reason| invalid(&format!("allowed_outbound_hosts[{i}]"), reason))?;
        }
        let limits = &self.limits;
        if !(1..=MAX_MEMORY_MB).contains(&limits.memory_mb) {
            return Err(invalid(
                "limits.memory_mb",
                format!("must be between 1 and {MAX_MEMORY_MB}"),
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&limits.timeout_ms) {
            return Err(invalid(
                "limits.timeout_ms",
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            ));
        }
        let scaling = &self.scaling;
        if scaling.max_instances == 0 {
            return Err(invalid("scaling.max_instances", "must be at least 1"));
        }
        if scaling.min_instances > scaling.max_instances {
            return Err(invalid(
                "scaling.min_instances",
                "must not exceed scaling.max_instances",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, model) in self.models.iter().enumerate() {
            validate_name(&model.name).map_err(|r| invalid(&format!("models[{i}].name"), r))?;
            if !seen.insert(&model.name) {
                return Err(invalid(
                    &format!("models[{i}].name"),
                    format!("`{}` is named twice", model.name),
                ));
            }
            if model.path.is_empty() {
                return Err(invalid(&format!("models[{i}].path"), "must not be empty"));
            }
            if model.cache_entries > MAX_CACHE_ENTRIES {
                return Err(invalid(
                    &format!("models[{i}].cache_entries"),
                    format!("must be at most {MAX_CACHE_ENTRIES}"),
                ));
            }
            if model
                .max_batch
                .is_some_and(|rows| !(1..=MAX_BATCH_ROWS).contains(&rows))
            {
                return Err(invalid(
                    &format!("models[{i}].max_batch"),
                    format!("must be between 1 and {MAX_BATCH_ROWS}"),
                ));
            }
            if model.max_delay_ms.is_some_and(|ms| ms > MAX_BATCH_DELAY_MS) {
                return Err(invalid(
                    &format!("models[{i}].max_delay_ms"),
                    format!("must be at most {MAX_BATCH_DELAY_MS}"),
                ));
            }
        }
        if let Some(cache) = &self.cache {
            if !(1..=MAX_CACHE_TTL_S).contains(&cache.ttl_s) {
                return Err(invalid(
                    "cache.ttl_s",
                    format!("must be between 1 and {MAX_CACHE_TTL_S}"),
                ));
            }
            if !(1..=MAX_CACHE_BYTES).contains(&cache.max_bytes) {
                return Err(invalid(
                    "cache.max_bytes",
                    format!("must be between 1 and {MAX_CACHE_BYTES}"),
                ));
            }
            for (i, name) in cache.vary.iter().enumerate() {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(invalid(
                        &format!("cache.vary[{i}]"),
                        format!("`{name}` is not a header name"),
                    ));
                }
            }
        }
        let mut targets = std::collections::HashSet::new();
        for (i, file) in self.files.iter().enumerate() {
            if file.source.is_empty() {
                return Err(invalid(&format!("files[{i}].source"), "must not be empty"));
            }
            validate_target(&file.target).map_err(|r| invalid(&format!("files[{i}].target"), r))?;
            if !targets.insert(file.target.as_str()) {
                return Err(invalid(
                    &format!("files[{i}].target"),
                    format!("`{}` is named twice", file.target),
                ));
            }
        }
        for (i, file) in self.files.iter().enumerate() {
            // `/a` and `/a/b` cannot both be files.
            let dir = format!("{}/", file.target);
            if self.files.iter().any(|other| other.target.starts_with(&dir)) {
                return Err(invalid(
                    &format!("files[{i}].target"),
                    format!("`{}` is a file, so nothing can be mounted below it", file.target),
                ));
            }
        }
        Ok(())
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Most components in an asset's guest path.
const MAX_TARGET_DEPTH: usize = 8;

/// Checks an asset's guest path: absolute, at most 8 components of ASCII
/// letters, digits, `.`, `_` and `-`, none of them `.` or `..`, so it can be
/// joined under the function's asset directory without escaping it.
pub fn validate_target(target: &str) -> std::result::Result<(), String> {
    let Some(relative) = target.strip_prefix('/') else {
        return Err(format!(
            "`{}` must be an absolute path such as `/assets/labels.txt`",
            target.escape_debug()
        ));
    };
    let parts: Vec<&str> = relative.split('/').collect();
    let part_ok = |part: &&str| {
        !part.is_empty()
            && *part != "."
            && *part != ".."
            && part.len() <= 255
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if parts.len() > MAX_TARGET_DEPTH || !parts.iter().all(part_ok) {
        return Err(format!(
            "`{}` is not a valid guest path: use up to {MAX_TARGET_DEPTH} `/`-separated parts of letters, digits, `.`, `_` and `-` (no `.` or `..` parts)",
            target.escape_debug()
        ));
    }
    Ok(())
}

/// Checks a function, model or tenant name: 1 to 63 characters of lowercase
/// ASCII letters, digits and `-`, starting with a letter, not ending with `-`.
///
/// ASCII only on purpose: no `.`, `/`, `%` or NUL can reach a path, and no
/// look-alike Unicode can impersonate another tenant's function.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let starts_with_letter = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars || !starts_with_letter || name.ends_with('-') {
        return Err(format!(
            "`{}` is not a valid name: use 1 to {MAX_NAME_LEN} lowercase letters, digits and `-`, starting with a letter",
            name.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_manifest_parses() {
        let m = Manifest::from_toml(
            r#"
            name = "classify"
            component = "target/wasm32-wasip2/release/classify.wasm"
            build = "cargo build --release --target wasm32-wasip2"
            public = true
            [[models]]
            name = "mnist-mlp"
            path = "models/mlp.onnx"
            device = "gpu"
            [[files]]
            source = "labels.txt"
            target = "/assets/labels.txt"
            [limits]
            memory_mb = 256
            timeout_ms = 500
            [scaling]
            min_instances = 1
            max_instances = 4
            idle_timeout_s = 5
            qos = "batch"
            reuse = false
            "#,
        )
        .expect("valid manifest");
        assert_eq!(m.name, "classify");
        assert!(m.public);
        assert_eq!(m.models[0].device, DeviceWish::Gpu);
        assert_eq!(m.files[0].target, "/assets/labels.txt");
        assert_eq!(m.limits.memory_mb, 256);
        assert_eq!(m.scaling.qos, Qos::Batch);
        assert!(!m.scaling.reuse);
        assert_eq!(Manifest::from_toml(&m.to_toml()), Ok(m));
    }

    #[test]
    fn defaults_apply() {
        let m = Manifest::from_toml("name = \"echo\"").expect("valid manifest");
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.scaling, Scaling::default());
        assert!(!m.public);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let err =
            Manifest::from_toml("name = \"echo\"\nflavour = 1\n[limits]\nmemory_mbb = 3\n").expect_err("unknown keys");
        assert_eq!(
            err,
            ManifestError::UnknownKeys {
                keys: vec!["flavour".into(), "limits.memory_mbb".into()]
            }
        );
        assert_eq!(err.key(), Some("flavour"));
        assert!(err.to_string().contains("`limits.memory_mbb`"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("name = \"Echo\"", "name"),
            ("name = \"e\"\n[limits]\nmemory_mb = 0", "limits.memory_mb"),
            ("name = \"e\"\n[limits]\ntimeout_ms = 0", "limits.timeout_ms"),
            ("name = \"e\"\n[scaling]\nmax_instances = 0", "scaling.max_instances"),
            (
                "name = \"e\"\n[scaling]\nmin_instances = 9\nmax_instances = 2",
                "scaling.min_instances",
            ),
        ];
        for (text, key) in cases {
            let err = Manifest::from_toml(text).expect_err(text);
            assert_eq!(err.key(), Some(key), "{text}");
        }
    }

    #[test]
    fn wrong_types_and_bad_toml_are_syntax_errors() {
        for text in [
            "name = 3",
            "name = \"e\"\n[limits]\nmemory_mb = \"lots\"",
            "name = ",
            "",
        ] {
            assert!(
                matches!(Manifest::from_toml(text), Err(ManifestError::Syntax { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn model_batching_and_serving_are_read_and_bounded() {
        let model = |extra: &str| format!("name = \"e\"\n[[models]]\nname = \"m\"\npath = \"m.onnx\"\n{extra}");
        let m = Manifest::from_toml(&model("max_batch = 32\nmax_delay_ms = 4\nserve = true")).expect("valid");
        assert_eq!(
            (m.models[0].max_batch, m.models[0].max_delay_ms, m.models[0].serve),
            (Some(32), Some(4), true)
        );
        let m = Manifest::from_toml(&model("")).expect("valid");
        assert_eq!(
            (m.models[0].max_batch, m.models[0].max_delay_ms, m.models[0].serve),
            (None, None, false)
        );
        for (extra, key) in [
            ("max_batch = 0", "models[0].max_batch"),
            ("max_batch = 4097", "models[0].max_batch"),
            ("max_delay_ms = 10001", "models[0].max_delay_ms"),
        ] {
            assert_eq!(Manifest::from_toml(&model(extra)).expect_err(extra).key(), Some(key));
        }
    }

    #[test]
    fn asset_targets_stay_inside_their_mount() {
        for bad in [
            "",
            "labels.txt",
            "/",
            "/a//b",
            "/a/../b",
            "/./a",
            "/a/",
            "/a b",
            "/a\\b",
            "/a/b/c/d/e/f/g/h/i",
        ] {
            assert!(validate_target(bad).is_err(), "{bad:?}");
        }
        for good in ["/labels.txt", "/assets/vocab-v2.json", "/.hidden/_x"] {
            assert!(validate_target(good).is_ok(), "{good:?}");
        }
        let nested =
            "name = \"e\"\n[[files]]\nsource = \"a\"\ntarget = \"/a\"\n[[files]]\nsource = \"b\"\ntarget = \"/a/b\"\n";
        assert_eq!(
            Manifest::from_toml(nested).expect_err("nested").key(),
            Some("files[0].target")
        );
        let twice =
            "name = \"e\"\n[[files]]\nsource = \"a\"\ntarget = \"/a\"\n[[files]]\nsource = \"b\"\ntarget = \"/a\"\n";
        assert_eq!(
            Manifest::from_toml(twice).expect_err("twice").key(),
            Some("files[1].target")
        );
    }

    #[test]
    fn names_reject_path_tricks() {
        for bad in [
            "",
            "..",
            "a/b",
            "a.b",
            "a%2e",
            "a\0b",
            "Abc",
            "-a",
            "a-",
            "é",
            "а",
            "1abc",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "echo", "mnist-mlp2", &"a".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn origins_parse_strictly_and_match_scheme_host_and_port() {
        let api = Origin::parse("https://API.example.com").expect("origin");
        assert_eq!((api.https, api.host.as_str(), api.port), (true, "api.example.com", 443));
        assert!(api.matches(&"https://api.example.com/v1/x?y=1".parse().expect("uri")));
        assert!(api.matches(&"https://api.example.com:443/".parse().expect("uri")));
        assert!(!api.matches(&"http://api.example.com/".parse().expect("uri")), "scheme");
        assert!(
            !api.matches(&"https://api.example.com:8443/".parse().expect("uri")),
            "port"
        );
        assert!(
            !api.matches(&"https://evil.com/?api.example.com".parse().expect("uri")),
            "host"
        );
        assert!(!api.matches(&"https://api.example.com.evil.com/".parse().expect("uri")));
        assert!(Origin::parse("http://[::1]:8080").is_ok());
        let local = Origin::parse("http://127.0.0.1:8080/").expect("origin");
        assert!(local.matches(&"http://127.0.0.1:8080/x".parse().expect("uri")));
        for bad in [
            "ftp://x.com",
            "https://*.example.com",
            "https://x.com/path",
            "https://user:pw@x.com",
            "x.com",
            "",
            "http://htt[$X:0b]jj",
            "http://exa_mple.com",
            "http://[::1",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
        let err = Manifest::from_toml("name = \"f\"\nallowed_outbound_hosts = [\"https://ok.com\", \"nope\"]")
            .expect_err("bad origin");
        assert!(err.to_string().contains("allowed_outbound_hosts[1]"), "{err}");
    }
}
