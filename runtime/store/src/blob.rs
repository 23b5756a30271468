//! Content-addressed blobs: `blobs/sha256/<hex>` under the data directory,
//! backed in a cluster by a shared bucket ([`RemoteBlobs`]): a committed
//! blob is uploaded before the deploy that wrote it succeeds, and a blob a
//! node lacks is fetched on first use ([`BlobStore::ensure_local`]).

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::remote::RemoteBlobs;
use crate::{Result, StoreError};

/// A SHA-256 digest in lowercase hex. Constructed only from a hash or a
/// validated string, so it is always safe to use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses a 64-character lowercase hex digest.
    pub fn parse(hex: &str) -> Option<Digest> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| Digest(hex.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(hex::encode(Sha256::digest(bytes)))
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The blob directory (and, in a cluster, the bucket behind it). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    staging: PathBuf,
    remote: Option<std::sync::Arc<RemoteBlobs>>,
}

impl BlobStore {
    /// Opens (creating if needed) the blob store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<BlobStore> {
        let blobs = data_dir.join("blobs").join("sha256");
        let staging = data_dir.join("tmp");
        for dir in [&blobs, &staging] {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(BlobStore {
            blobs,
            staging,
            remote: None,
        })
    }

    /// Backs this directory with a shared bucket: it becomes this node's
    /// cache of the bucket's blobs.
    pub fn with_remote(mut self, remote: RemoteBlobs) -> BlobStore {
        self.remote = Some(std::sync::Arc::new(remote));
        self
    }

    /// The local path of a blob, fetching it from the shared bucket first if
    /// this node does not have it (or has a copy of the wrong size). Without a
    /// bucket, the path whether or not the file exists.
    pub async fn ensure_local(&self, digest: &Digest, size: u64) -> Result<PathBuf> {
        let path = self.path(digest);
        let Some(remote) = &self.remote else {
            return Ok(path);
        };
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() == size) {
            return Ok(path);
        }
        let staged = self.staging.join(format!("fetch-{}", uuid::Uuid::now_v7()));
        let fetched = remote.download(digest, size, &staged).await;
        let placed = match fetched {
            Ok(()) => match tokio::fs::rename(&staged, &path).await {
                Ok(()) => sync_dir(path.parent().unwrap_or(&path)).await,
                Err(source) => Err(StoreError::Io {
                    path: path.clone(),
                    source,
                }),
            },
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ = tokio::fs::remove_file(&staged).await;
        }
        placed.map(|()| path)
    }

    /// Deletes, in a cluster, the shared bucket's blobs that no version
    /// references (`keep`: digests) and that were written longer than
    /// `grace` ago; returns what went (nothing without a bucket).
    pub async fn collect_remote(
        &self,
        keep: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> Result<Collected> {
        match &self.remote {
            Some(remote) => remote.collect(keep, grace).await,
            None => Ok(Collected::default()),
        }
    }

    /// Deletes local blobs not in `keep` and staged files, both last
    /// modified longer than `grace` ago (a deploy in progress has written
    /// its blobs but not yet its version); returns how many files and
    /// bytes. Blocking. The shared bucket is [`BlobStore::collect_remote`]'s.
    pub fn collect(&self, keep: &std::collections::HashSet<String>, grace: std::time::Duration) -> Collected {
        let mut collected = Collected::default();
        for (dir, only_unreferenced) in [(&self.blobs, true), (&self.staging, false)] {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if only_unreferenced && keep.contains(&name) {
                    continue;
                }
                collected.remove_if_older(&entry.path(), grace);
            }
        }
        collected
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.as_str())
    }

    /// Whether the stored blob is intact: present, `size` bytes long, and
    /// hashing to its digest (reads the whole file; blocking).
    pub fn is_intact(&self, digest: &Digest, size: u64) -> bool {
        let Ok(mut file) = std::fs::File::open(self.path(digest)) else {
            return false;
        };
        if !file.metadata().is_ok_and(|m| m.len() == size) {
            return false;
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).is_ok() && hex::encode(hasher.finalize()) == digest.as_str()
    }

    /// Starts writing a new blob; its digest is known once it is complete.
    pub async fn stage(&self) -> Result<StagedBlob> {
        let path = self.staging.join(format!("upload-{}", uuid::Uuid::now_v7()));
        let file = tokio::fs::File::create(&path).await.map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(StagedBlob {
            file: Some(tokio::io::BufWriter::with_capacity(STAGING_BUFFER, file)),
            path,
            hasher: Sha256::new(),
            len: 0,
            blobs: self.blobs.clone(),
            remote: self.remote.clone(),
        })
    }
}

/// Bytes gathered before each write of a staged blob: an upload arrives in
/// chunks of a few KiB, and every write of a `tokio::fs::File` is a trip to
/// the blocking pool (a 17 MiB component took ~4,000 of them, 0.15 s).
const STAGING_BUFFER: usize = 1 << 20;

/// A blob being written. Dropped without [`StagedBlob::commit`], its
/// temporary file is removed: a failed upload leaves nothing behind.
#[derive(Debug)]
pub struct StagedBlob {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: PathBuf,
    hasher: Sha256,
    len: u64,
    blobs: PathBuf,
    remote: Option<std::sync::Arc<RemoteBlobs>>,
}

impl StagedBlob {
    /// Appends a chunk.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| StoreError::Worker("blob already closed".into()))?;
        file.write_all(chunk).await.map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The staged file, readable before commit (to validate the content).
    pub fn staged_path(&self) -> &Path {
        &self.path
    }

    /// Flushes and fsyncs the staged file, then returns its digest; the blob is
    /// not yet visible under that name.
    pub async fn finish(&mut self) -> Result<Digest> {
        if let Some(mut file) = self.file.take() {
            let io = |source| StoreError::Io {
                path: self.path.clone(),
                source,
            };
            file.flush().await.map_err(io)?;
            file.get_ref().sync_all().await.map_err(io)?;
        }
        Ok(Digest(hex::encode(self.hasher.clone().finalize())))
    }

    /// Moves the finished blob to its content address (and, in a cluster,
    /// uploads it to the shared bucket) and returns the digest. Committing
    /// content that already exists keeps the existing file.
    pub async fn commit(mut self) -> Result<Digest> {
        let digest = self.finish().await?;
        let target = self.blobs.join(digest.as_str());
        tokio::fs::rename(&self.path, &target)
            .await
            .map_err(|source| StoreError::Io {
                path: target.clone(),
                source,
            })?;
        sync_dir(&self.blobs).await?;
        if let Some(remote) = &self.remote {
            remote.upload(&digest, &target, self.len).await?;
        }
        Ok(digest)
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        // After a successful commit the staged path no longer exists.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_blob_commits_under_its_digest_and_aborts_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = BlobStore::open(dir.path()).expect("open");

        let mut staged = blobs.stage().await.expect("stage");
        staged.write(b"hello ").await.expect("write");
        staged.write(b"world").await.expect("write");
        let digest = staged.commit().await.expect("commit");
        assert_eq!(digest, Digest::of(b"hello world"));
        assert_eq!(std::fs::read(blobs.path(&digest)).expect("read"), b"hello world");

        let mut aborted = blobs.stage().await.expect("stage");
        aborted.write(b"partial").await.expect("write");
        let staged_path = aborted.staged_path().to_owned();
        drop(aborted);
        assert!(!staged_path.exists());
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }

    #[test]
    fn digests_are_validated() {
        assert!(Digest::parse(&"a".repeat(64)).is_some());
        for bad in [
            "",
            "../etc/passwd",
            &"A".repeat(64),
            &"a".repeat(63),
            &format!("{}/", "a".repeat(63)),
        ] {
            assert!(Digest::parse(bad).is_none(), "{bad}");
        }
    }
}

/// Makes the renames into `dir` durable (a renamed file is on disk only once
/// its directory is).
async fn sync_dir(dir: &Path) -> Result<()> {
    let owned = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&owned).and_then(|d| d.sync_all()))
        .await
        .map_err(|e| StoreError::Io {
            path: dir.to_owned(),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    /// Files removed.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Collected {
    /// Removes the file at `path` if it was last modified longer than
    /// `grace` ago, counting it.
    pub fn remove_if_older(&mut self, path: &Path, grace: std::time::Duration) {
        let Ok(meta) = std::fs::metadata(path) else { return };
        let old = meta
            .modified()
            .ok()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age >= grace);
        if meta.is_file() && old && std::fs::remove_file(path).is_ok() {
            self.files += 1;
            self.bytes += meta.len();
        }
    }
}
