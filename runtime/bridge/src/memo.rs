//! Inference caches (`cache_entries = N` on a manifest's `[[models]]`):
//! identical `compute` inputs to the same model return the outputs stored
//! the first time, without running the model. One cache per tenant and
//! model, shared by the tenant's functions that name the model and opt in;
//! never across tenants, since a hit's speed would tell one tenant what
//! another sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hashlink::LruCache;
use sha2::{Digest as _, Sha256};

use crate::TensorHandle;

/// Bytes of outputs one cache holds at most, whatever its entry count.
pub const MAX_CACHE_BYTES: usize = 256 << 20;

/// The hash of one call's inputs.
pub(crate) type Key = [u8; 32];

/// One tenant's cache of one model's outputs.
#[derive(Debug)]
pub struct InferenceCache {
    entries: Mutex<Entries>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug)]
struct Entries {
    lru: LruCache<Key, Arc<[TensorHandle]>>,
    bytes: usize,
}

impl InferenceCache {
    /// A cache of at most `entries` calls' outputs.
    pub(crate) fn new(entries: usize) -> InferenceCache {
        InferenceCache {
            entries: Mutex::new(Entries {
                lru: LruCache::new(entries.max(1)),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Grows the cache to `entries` if it holds fewer (the largest ask of
    /// the functions sharing it wins).
    pub(crate) fn widen(&self, entries: usize) {
        let mut held = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if held.lru.capacity() < entries {
            held.lru.set_capacity(entries);
        }
    }

    /// The key of one call: each input's name, type, dimensions and bytes,
    /// in the model's input order, each part length-prefixed.
    pub(crate) fn key<'a>(inputs: impl IntoIterator<Item = (&'a str, &'a TensorHandle)>) -> Key {
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        for (name, tensor) in inputs {
            part(name.as_bytes());
            part(&[tensor.ty as u8]);
            let dims: Vec<u8> = tensor.dims.iter().flat_map(|d| d.to_le_bytes()).collect();
            part(&dims);
            part(&tensor.data);
        }
        hash.finalize().into()
    }

    /// The outputs stored for `key`, counted as a hit or a miss.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<[TensorHandle]>> {
        let found = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lru
            .get(key)
            .cloned();
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores a call's outputs, evicting the least recently used past the
    /// entry count or [`MAX_CACHE_BYTES`].
    pub(crate) fn insert(&self, key: Key, outputs: Vec<TensorHandle>) {
        let size: usize = outputs.iter().map(|t| t.data.len()).sum();
        if size > MAX_CACHE_BYTES {
            return;
        }
        let mut held = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if held.lru.len() == held.lru.capacity()
            && !held.lru.contains_key(&key)
            && let Some((_, evicted)) = held.lru.remove_lru()
        {
            held.bytes -= bytes_of(&evicted);
        }
        if let Some(old) = held.lru.insert(key, outputs.into()) {
            held.bytes -= bytes_of(&old);
        }
        held.bytes += size;
        while held.bytes > MAX_CACHE_BYTES {
            let Some((_, evicted)) = held.lru.remove_lru() else {
                break;
            };
            held.bytes -= bytes_of(&evicted);
        }
    }

    /// Calls answered from this cache, since start.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Calls this cache did not hold, since start.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Calls whose outputs are held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).lru.len()
    }
}

fn bytes_of(outputs: &[TensorHandle]) -> usize {
    outputs.iter().map(|t| t.data.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasi::nn::tensor::TensorType;

    fn tensor(dims: &[u32], data: &[u8]) -> TensorHandle {
        TensorHandle {
            dims: dims.to_vec(),
            ty: TensorType::Fp32,
            data: data.to_vec(),
            refused: 0,
        }
    }

    #[test]
    fn keys_cover_names_types_dims_and_bytes() {
        let a = tensor(&[1, 4], &[0; 16]);
        let base = InferenceCache::key([("x", &a)]);
        assert_eq!(base, InferenceCache::key([("x", &a)]));
        assert_ne!(base, InferenceCache::key([("y", &a)]));
        assert_ne!(base, InferenceCache::key([("x", &tensor(&[2, 2], &[0; 16]))]));
        assert_ne!(base, InferenceCache::key([("x", &tensor(&[1, 4], &[1; 16]))]));
        let mut int = a.clone();
        int.ty = TensorType::I32;
        assert_ne!(base, InferenceCache::key([("x", &int)]));
        assert_ne!(base, InferenceCache::key([("x", &a), ("x", &a)]));
    }

    #[test]
    fn entries_are_bounded_and_hits_counted() {
        let cache = InferenceCache::new(2);
        let keys: Vec<Key> = (0u8..3)
            .map(|i| InferenceCache::key([("x", &tensor(&[1], &[i; 4]))]))
            .collect();
        assert!(cache.get(&keys[0]).is_none());
        cache.insert(keys[0], vec![tensor(&[1], &[9; 4])]);
        cache.insert(keys[1], vec![tensor(&[1], &[8; 4])]);
        assert_eq!(cache.get(&keys[0]).expect("held")[0].data, [9; 4]);
        cache.insert(keys[2], vec![tensor(&[1], &[7; 4])]);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&keys[1]).is_none(), "the least recently used went");
        assert_eq!((cache.hits(), cache.misses()), (1, 2));
        cache.widen(3);
        cache.insert(keys[1], vec![tensor(&[1], &[8; 4])]);
        assert_eq!(cache.len(), 3);
    }
}
