//! Response caches: a function version whose manifest has `[cache]` keeps
//! its `200` answers to `GET` and `POST` in memory and answers a repeated
//! request from there, without an instance. One cache per version (a
//! redeploy or an alias change can never serve another version's entry),
//! least recently used first out, bounded by the manifest's `max_bytes`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashlink::LruCache;
use hearth_manifest::CacheSpec;
use http::{HeaderMap, Method, header};
use http_body::Frame;
use sha2::{Digest as _, Sha256};

use crate::{BoxError, ResponseBody};

/// The response header that says whether an answer came from the cache.
pub const CACHE_HEADER: http::HeaderName = http::HeaderName::from_static("x-hearth-cache");

/// A request's place in its version's cache: SHA-256 of the method, path
/// and query, the `vary` headers' values and the body.
pub(crate) type Key = [u8; 32];

/// One version's cached answers.
#[derive(Debug)]
pub(crate) struct ResponseCache {
    ttl: Duration,
    max_bytes: usize,
    vary: Vec<header::HeaderName>,
    entries: Mutex<Entries>,
}

#[derive(Debug)]
struct Entries {
    lru: LruCache<Key, Arc<Entry>>,
    bytes: usize,
}

/// A cached answer: always a `200`.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The guest's headers.
    pub(crate) headers: HeaderMap,
    /// The whole body.
    pub(crate) body: Bytes,
    expires: Instant,
    size: usize,
}

/// Whether a request may be answered from a cache at all.
pub(crate) fn cacheable(method: &Method) -> bool {
    method == Method::GET || method == Method::POST
}

impl ResponseCache {
    pub(crate) fn new(spec: &CacheSpec) -> ResponseCache {
        ResponseCache {
            ttl: Duration::from_secs(u64::from(spec.ttl_s)),
            max_bytes: usize::try_from(spec.max_bytes).unwrap_or(usize::MAX),
            // Names were checked at deploy.
            vary: spec
                .vary
                .iter()
                .filter_map(|name| header::HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            entries: Mutex::new(Entries {
                lru: LruCache::new_unbounded(),
                bytes: 0,
            }),
        }
    }

    /// The key of a request (its body already read whole).
    pub(crate) fn key(&self, method: &Method, uri: &http::Uri, headers: &HeaderMap, body: &[u8]) -> Key {
        let mut hash = Sha256::new();
        // Each part is length-prefixed, so no two requests share a key by
        // moving bytes from one part to the next.
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part(method.as_str().as_bytes());
        part(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        for name in &self.vary {
            part(name.as_str().as_bytes());
            for value in headers.get_all(name) {
                part(value.as_bytes());
            }
            part(b"");
        }
        part(&Sha256::digest(body));
        hash.finalize().into()
    }

    /// The live entry for `key`, marked as just used.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.lru.get(key)?.clone();
        if entry.expires <= Instant::now() {
            entries.lru.remove(key);
            entries.bytes -= entry.size;
            return None;
        }
        Some(entry)
    }

    /// How long the guest's answer may be kept: the manifest's time, or
    /// less if its `cache-control` says so; `None` when it may not be kept.
    pub(crate) fn ttl_for(&self, headers: &HeaderMap) -> Option<Duration> {
        let mut ttl = self.ttl;
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                return None;
            };
            for directive in value.split(',').map(str::trim) {
                let (name, argument) = directive.split_once('=').unwrap_or((directive, ""));
                match name.to_ascii_lowercase().as_str() {
                    "no-store" | "no-cache" | "private" => return None,
                    "max-age" | "s-maxage" => {
                        let seconds: u64 = argument.trim_matches('"').parse().ok()?;
                        ttl = ttl.min(Duration::from_secs(seconds));
                    }
                    _ => {}
                }
            }
        }
        (!ttl.is_zero()).then_some(ttl)
    }

    /// Keeps an answer, evicting the least recently used until it fits.
    fn insert(&self, key: Key, headers: HeaderMap, body: Bytes, ttl: Duration) {
        let size = entry_size(&headers, body.len());
        if size > self.max_bytes {
            return;
        }
        let entry = Arc::new(Entry {
            headers,
            body,
            expires: Instant::now() + ttl,
            size,
        });
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = entries.lru.insert(key, entry) {
            entries.bytes -= old.size;
        }
        entries.bytes += size;
        while entries.bytes > self.max_bytes {
            let Some((_, evicted)) = entries.lru.remove_lru() else {
                break;
            };
            entries.bytes -= evicted.size;
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).bytes
    }

    /// The answer's body, kept in this cache under `key` if it ends whole
    /// within the cache's bound.
    pub(crate) fn recording(
        self: Arc<Self>,
        key: Key,
        headers: HeaderMap,
        ttl: Duration,
        inner: ResponseBody,
    ) -> Recording {
        Recording {
            inner,
            kept: Some(Kept {
                cache: self,
                key,
                headers,
                ttl,
                body: BytesMut::new(),
            }),
        }
    }
}

/// What an entry counts against `max_bytes`: its body and headers.
fn entry_size(headers: &HeaderMap, body: usize) -> usize {
    body + headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum::<usize>()
}

/// A miss's answer on its way to the client, copied as it goes; kept once
/// it ends.
pub(crate) struct Recording {
    inner: ResponseBody,
    kept: Option<Kept>,
}

struct Kept {
    cache: Arc<ResponseCache>,
    key: Key,
    headers: HeaderMap,
    ttl: Duration,
    body: BytesMut,
}

impl http_body::Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let too_big = match (frame.data_ref(), &mut self.kept) {
                    (Some(data), Some(kept)) => {
                        kept.body.extend_from_slice(data);
                        entry_size(&kept.headers, kept.body.len()) > kept.cache.max_bytes
                    }
                    // Trailers are not kept: such an answer is not cached.
                    (None, _) => true,
                    (_, None) => false,
                };
                if too_big {
                    self.kept = None;
                }
            }
            Poll::Ready(None) => {
                if let Some(kept) = self.kept.take() {
                    kept.cache.insert(kept.key, kept.headers, kept.body.freeze(), kept.ttl);
                }
            }
            // A failed body is not kept.
            Poll::Ready(Some(Err(_))) => self.kept = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn cache(ttl_s: u32, max_bytes: u64) -> Arc<ResponseCache> {
        Arc::new(ResponseCache::new(&CacheSpec {
            ttl_s,
            max_bytes,
            vary: vec!["content-type".into()],
        }))
    }

    fn key(cache: &ResponseCache, path: &str, content_type: &str, body: &[u8]) -> Key {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().expect("value"));
        headers.insert("x-other", "ignored".parse().expect("value"));
        cache.key(&Method::POST, &path.parse().expect("uri"), &headers, body)
    }

    async fn record(cache: &Arc<ResponseCache>, key: Key, body: &'static [u8]) {
        let inner = http_body_util::Full::new(Bytes::from_static(body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let recording = cache
            .clone()
            .recording(key, HeaderMap::new(), Duration::from_secs(60), inner);
        recording.collect().await.expect("body");
    }

    #[test]
    fn keys_cover_path_query_vary_headers_and_body() {
        let c = cache(60, 1 << 20);
        let base = key(&c, "/a?x=1", "text/plain", b"body");
        assert_eq!(base, key(&c, "/a?x=1", "text/plain", b"body"));
        assert_ne!(base, key(&c, "/a?x=2", "text/plain", b"body"));
        assert_ne!(base, key(&c, "/b?x=1", "text/plain", b"body"));
        assert_ne!(base, key(&c, "/a?x=1", "application/json", b"body"));
        assert_ne!(base, key(&c, "/a?x=1", "text/plain", b"bodz"));
        let get = c.key(
            &Method::GET,
            &"/a?x=1".parse().expect("uri"),
            &HeaderMap::new(),
            b"body",
        );
        assert_ne!(base, get);
    }

    #[tokio::test]
    async fn answers_are_kept_within_the_byte_bound_least_recently_used_first() {
        let c = cache(60, 10);
        let (a, b, d) = (
            key(&c, "/a", "t", b""),
            key(&c, "/b", "t", b""),
            key(&c, "/d", "t", b""),
        );
        record(&c, a, b"aaaa").await;
        record(&c, b, b"bbbb").await;
        assert_eq!(c.get(&a).expect("kept").body, "aaaa");
        record(&c, d, b"dddd").await;
        assert!(c.bytes() <= 10);
        assert!(c.get(&b).is_none(), "the least recently used went");
        assert!(c.get(&a).is_some() && c.get(&d).is_some());
        record(&c, b, b"far too big for it").await;
        assert!(c.get(&b).is_none(), "an answer over the bound is not kept");
        assert!(c.bytes() <= 10);
    }

    #[test]
    fn the_guests_cache_control_wins() {
        let c = cache(60, 1 << 20);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, value.parse().expect("value"));
            c.ttl_for(&headers)
        };
        assert_eq!(c.ttl_for(&HeaderMap::new()), Some(Duration::from_secs(60)));
        assert_eq!(with("public, max-age=5"), Some(Duration::from_secs(5)));
        assert_eq!(
            with("max-age=600"),
            Some(Duration::from_secs(60)),
            "never longer than the manifest"
        );
        assert_eq!(with("no-store"), None);
        assert_eq!(with("private, max-age=5"), None);
        assert_eq!(with("max-age=0"), None);
    }

    #[tokio::test]
    async fn expired_answers_are_gone() {
        let c = cache(60, 1 << 20);
        let k = key(&c, "/a", "t", b"");
        let inner = http_body_util::Full::new(Bytes::from_static(b"x"))
            .map_err(|never| match never {})
            .boxed_unsync();
        c.clone()
            .recording(k, HeaderMap::new(), Duration::ZERO, inner)
            .collect()
            .await
            .expect("body");
        assert!(c.get(&k).is_none());
        assert_eq!(c.bytes(), 0, "an expired entry gives its bytes back");
    }
}
