//! Cranelift's per-function compilation cache, on disk: a function body
//! compiled once is reused by every later compile that contains it.
//!
//! Deploys share most of their code: every Python handler bundles the same
//! interpreter, and a redeploy of a Rust function changes a handler but not
//! its dependencies. With this cache only the functions that changed are
//! compiled again (wasmtime's `incremental-cache`, keyed by a hash of each
//! function's IR and the compiler's flags).
//!
//! A compile's new bodies are gathered in memory and written at its end as
//! one pack (`<n>.pack`, each body behind a SHA-256 of it) and its index
//! (`<n>.index`: key, offset, length): tens of thousands of small files
//! cost a first compile more than the cache saved it. The indexes are read
//! when the engine starts. A torn or damaged body (a crash, a full disk)
//! fails its check and is compiled afresh, never used. Packs live in a
//! folder per engine build (its compatibility hash: another wasmtime
//! serializes differently); a pack a compile used is marked recent, and
//! [`CodeCache::flush`] deletes the least recently used packs once the
//! cache outgrows its budget.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};

/// Bytes of a key (cranelift's cache keys are SHA-256 hashes).
const KEY: usize = 32;
/// Bytes of the checksum in front of each body in a pack.
const CHECKSUM: usize = 32;
/// Bytes of one index entry: key, offset (u64), length (u32).
const INDEX_ENTRY: usize = KEY + 8 + 4;

type Key = [u8; KEY];

/// Where a body lies: pack, offset of its checksum, length of the body.
#[derive(Debug, Clone, Copy)]
struct Location {
    pack: u64,
    offset: u64,
    len: u32,
}

/// The cache under one folder, at most about `budget` bytes.
#[derive(Debug)]
pub(crate) struct CodeCache {
    base: PathBuf,
    /// `base/<engine compatibility hash>`, known once the engine exists;
    /// nothing is read or written before.
    dir: OnceLock<PathBuf>,
    budget: u64,
    index: DashMap<Key, Location>,
    /// Bodies compiled since the last flush, by key.
    pending: DashMap<Key, Vec<u8>>,
    /// Open packs, by number.
    packs: DashMap<u64, Arc<File>>,
    /// Packs read since the last flush (marked recent then).
    used: Mutex<HashSet<u64>>,
    /// Held while a flush runs: one at a time, so none writes a body twice.
    flushing: Mutex<()>,
    next_pack: AtomicU64,
    /// Bytes of packs and indexes on disk.
    held: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CodeCache {
    /// A cache under `base` (created when first written), trimmed to
    /// `budget`; it serves once [`CodeCache::open`] names the engine.
    pub(crate) fn new(base: PathBuf, budget: u64) -> CodeCache {
        CodeCache {
            base,
            dir: OnceLock::new(),
            budget,
            index: DashMap::new(),
            pending: DashMap::new(),
            packs: DashMap::new(),
            used: Mutex::new(HashSet::new()),
            flushing: Mutex::new(()),
            next_pack: AtomicU64::new(0),
            held: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Serves the packs of the engine with this compatibility hash: reads
    /// their indexes, and deletes other engines' folders.
    pub(crate) fn open(&self, compat: &str) {
        let dir = self.dir.get_or_init(|| self.base.join(compat));
        for other in std::fs::read_dir(&self.base).into_iter().flatten().flatten() {
            if other.path() != *dir {
                let _ = std::fs::remove_dir_all(other.path());
            }
        }
        for (pack, size) in list_packs(dir) {
            self.next_pack.fetch_max(pack + 1, Ordering::Relaxed);
            let Ok(index) = std::fs::read(index_path(dir, pack)) else {
                // A pack without its index (a crash between the two).
                let _ = std::fs::remove_file(pack_path(dir, pack));
                continue;
            };
            self.held.fetch_add(size + index.len() as u64, Ordering::Relaxed);
            for entry in index.chunks_exact(INDEX_ENTRY) {
                let (key, rest) = entry.split_at(KEY);
                let (offset, len) = rest.split_at(8);
                let (Ok(key), Ok(offset), Ok(len)) = (key.try_into(), offset.try_into(), len.try_into()) else {
                    continue;
                };
                let location = Location {
                    pack,
                    offset: u64::from_le_bytes(offset),
                    len: u32::from_le_bytes(len),
                };
                self.index.insert(key, location);
            }
        }
    }

    /// Look-ups answered from the cache so far, and those that were not.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn read(&self, dir: &Path, at: Location) -> Option<Vec<u8>> {
        let file = match self.packs.get(&at.pack) {
            Some(file) => file.clone(),
            None => {
                let file = Arc::new(File::open(pack_path(dir, at.pack)).ok()?);
                self.packs.insert(at.pack, file.clone());
                file
            }
        };
        let mut entry = vec![0; CHECKSUM + at.len as usize];
        file.read_exact_at(&mut entry, at.offset).ok()?;
        if Sha256::digest(&entry[CHECKSUM..])[..] != entry[..CHECKSUM] {
            return None;
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(at.pack);
        }
        entry.drain(..CHECKSUM);
        Some(entry)
    }

    /// Writes the bodies compiled since the last flush as a new pack, marks
    /// the packs read since as recent, and trims the cache to its budget.
    /// Runs after each compile, off the deploy's path; the bodies stay
    /// readable from memory until they are indexed in their pack.
    pub(crate) fn flush(&self) {
        let Some(dir) = self.dir.get() else { return };
        let Ok(_one) = self.flushing.lock() else { return };
        let keys: Vec<Key> = self.pending.iter().map(|entry| *entry.key()).collect();
        if !keys.is_empty() {
            let pack = self.next_pack.fetch_add(1, Ordering::Relaxed);
            match write_pack(dir, pack, &keys, &self.pending) {
                Ok((locations, bytes)) => {
                    self.held.fetch_add(bytes, Ordering::Relaxed);
                    for (key, location) in locations {
                        self.index.insert(key, location);
                    }
                }
                Err(err) => tracing::debug!(error = %err, dir = %dir.display(), "code cache pack not written"),
            }
            for key in &keys {
                self.pending.remove(key);
            }
        }
        let used: Vec<u64> = self
            .used
            .lock()
            .map(|mut used| used.drain().collect())
            .unwrap_or_default();
        for pack in used {
            if let Some(file) = self.packs.get(&pack) {
                let _ = file.set_modified(SystemTime::now());
            }
        }
        if self.held.load(Ordering::Relaxed) > self.budget {
            self.trim(dir);
        }
    }

    /// Deletes the least recently used packs until the cache holds three
    /// quarters of its budget.
    fn trim(&self, dir: &Path) {
        let mut packs: Vec<(SystemTime, u64, u64)> = list_packs(dir)
            .into_iter()
            .map(|(pack, size)| {
                let used = std::fs::metadata(pack_path(dir, pack))
                    .and_then(|meta| meta.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let index = std::fs::metadata(index_path(dir, pack)).map_or(0, |meta| meta.len());
                (used, pack, size + index)
            })
            .collect();
        let mut total: u64 = packs.iter().map(|p| p.2).sum();
        packs.sort_unstable();
        let target = self.budget / 4 * 3;
        let mut gone = HashSet::new();
        for (_, pack, size) in packs {
            if total <= target {
                break;
            }
            let _ = std::fs::remove_file(index_path(dir, pack));
            let _ = std::fs::remove_file(pack_path(dir, pack));
            self.packs.remove(&pack);
            gone.insert(pack);
            total -= size;
        }
        self.index.retain(|_, at| !gone.contains(&at.pack));
        self.held.store(total, Ordering::Relaxed);
    }
}

impl wasmtime::CacheStore for CodeCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let dir = self.dir.get()?;
        let key: Key = key.try_into().ok()?;
        let found = match self.index.get(&key).map(|at| *at) {
            Some(at) => self.read(dir, at),
            None => self.pending.get(&key).map(|body| body.clone()),
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found.map(Cow::Owned)
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let (Some(_), Ok(key)) = (self.dir.get(), Key::try_from(key)) else {
            return false;
        };
        if u32::try_from(value.len()).is_err() {
            return false;
        }
        self.pending.insert(key, value);
        true
    }
}

fn pack_path(dir: &Path, pack: u64) -> PathBuf {
    dir.join(format!("{pack:016}.pack"))
}

fn index_path(dir: &Path, pack: u64) -> PathBuf {
    dir.join(format!("{pack:016}.index"))
}

/// The packs in `dir` with their sizes; temporary files a crash left go.
fn list_packs(dir: &Path) -> Vec<(u64, u64)> {
    let mut packs = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        } else if let Some(pack) = name.strip_suffix(".pack").and_then(|n| n.parse::<u64>().ok()) {
            packs.push((pack, entry.metadata().map_or(0, |meta| meta.len())));
        }
    }
    packs
}

/// Writes the bodies of `keys` as pack `pack` and its index (each under a
/// temporary name, then renamed: the index last, so an index always has
/// its pack). Returns where each body lies and the bytes written.
fn write_pack(
    dir: &Path,
    pack: u64,
    keys: &[Key],
    bodies: &DashMap<Key, Vec<u8>>,
) -> std::io::Result<(Vec<(Key, Location)>, u64)> {
    std::fs::create_dir_all(dir)?;
    let mut data = Vec::new();
    let mut index = Vec::with_capacity(keys.len() * INDEX_ENTRY);
    let mut locations = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(body) = bodies.get(key) else { continue };
        let offset = data.len() as u64;
        let len = body.len() as u32;
        data.extend_from_slice(&Sha256::digest(&*body));
        data.extend_from_slice(&body);
        index.extend_from_slice(key);
        index.extend_from_slice(&offset.to_le_bytes());
        index.extend_from_slice(&len.to_le_bytes());
        locations.push((*key, Location { pack, offset, len }));
    }
    for (path, bytes) in [(pack_path(dir, pack), &data), (index_path(dir, pack), &index)] {
        let temp = path.with_extension("tmp");
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        std::fs::rename(&temp, &path)?;
    }
    Ok((locations, (data.len() + index.len()) as u64))
}

#[cfg(test)]
mod tests {
    use wasmtime::CacheStore as _;

    use super::*;

    fn key(n: u8) -> Key {
        [n; KEY]
    }

    #[test]
    fn a_body_comes_back_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::new(dir.path().to_owned(), u64::MAX);
        assert!(
            !cache.insert(&key(1), b"code".to_vec()),
            "kept before the engine is known"
        );
        cache.open("engine-a");
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.insert(&key(1), b"code one".to_vec()));
        assert!(cache.insert(&key(2), b"code two".to_vec()));
        assert_eq!(
            cache.get(&key(1)).as_deref(),
            Some(&b"code one"[..]),
            "before the flush"
        );
        cache.flush();
        assert_eq!(cache.get(&key(1)).as_deref(), Some(&b"code one"[..]), "from the pack");
        assert_eq!(cache.counts(), (2, 1));

        // Another process (a restart) reads the index.
        let again = CodeCache::new(dir.path().to_owned(), u64::MAX);
        again.open("engine-a");
        assert_eq!(again.get(&key(2)).as_deref(), Some(&b"code two"[..]));

        // A damaged body is a miss, not code.
        let pack = pack_path(&dir.path().join("engine-a"), 0);
        let mut bytes = std::fs::read(&pack).expect("pack");
        let at = bytes.windows(8).position(|w| w == b"code two").expect("body two");
        bytes[at] ^= 1;
        std::fs::write(&pack, &bytes).expect("damage");
        let damaged = CodeCache::new(dir.path().to_owned(), u64::MAX);
        damaged.open("engine-a");
        assert!(damaged.get(&key(2)).is_none());
        assert_eq!(damaged.get(&key(1)).as_deref(), Some(&b"code one"[..]));
        std::fs::write(&pack, &bytes[..10]).expect("tear");
        let torn = CodeCache::new(dir.path().to_owned(), u64::MAX);
        torn.open("engine-a");
        assert!(torn.get(&key(1)).is_none());
    }

    #[test]
    fn trimming_keeps_the_most_recently_used_packs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("engine-old");
        std::fs::create_dir_all(&stale).expect("old engine's folder");
        std::fs::write(stale.join("0000000000000000.pack"), b"old").expect("old pack");
        // Room for three packs of one 100-byte body each.
        let budget = 4 * (CHECKSUM + 100 + INDEX_ENTRY) as u64;
        let cache = CodeCache::new(dir.path().to_owned(), budget);
        cache.open("engine-new");
        assert!(!stale.exists(), "another engine's packs stay");
        let folder = dir.path().join("engine-new");
        let old = SystemTime::now() - std::time::Duration::from_secs(600);
        for n in 0u8..4 {
            assert!(cache.insert(&key(n), vec![n; 100]));
            cache.flush();
            let pack = File::options()
                .write(true)
                .open(pack_path(&folder, u64::from(n)))
                .expect("pack");
            pack.set_modified(old + std::time::Duration::from_secs(u64::from(n)))
                .expect("age");
        }
        // Pack 0 was the oldest written; a compile that reads it makes it
        // the newest, and the fifth pack takes the cache over its budget.
        assert!(cache.get(&key(0)).is_some());
        assert!(cache.insert(&key(4), vec![4; 100]));
        cache.flush();
        let kept: Vec<u8> = (0u8..5).filter(|n| cache.get(&key(*n)).is_some()).collect();
        assert_eq!(kept, [0, 3, 4]);
        assert!(!pack_path(&folder, 1).exists() && !index_path(&folder, 1).exists());
    }
}
