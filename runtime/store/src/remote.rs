//! The shared side of the blob store in a cluster: an S3-compatible bucket
//! (`--blob-url s3://bucket/prefix`), holding every node's blobs under
//! `prefix/sha256/<hex>`. Each node keeps the blobs it needed in its local
//! [`crate::BlobStore`] directory, which acts as a content-addressed cache:
//! a blob's name is its hash, so a cached copy is never stale.

use std::path::Path as FsPath;
use std::sync::Arc;

use futures::StreamExt as _;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::{Digest, Result, StoreError};

/// A bucket (and prefix) of blobs shared by the nodes of a cluster.
#[derive(Debug, Clone)]
pub struct RemoteBlobs {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

impl RemoteBlobs {
    /// The bucket named by `url` (`s3://bucket/prefix`), reached with the
    /// standard variables: `AWS_ENDPOINT_URL` (for a store other than AWS),
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint.
    pub fn from_url(url: &str) -> Result<RemoteBlobs> {
        let unsupported = || {
            StoreError::Config(format!(
                "unknown blob URL {url:?}: use s3://bucket/prefix, or leave it unset for the local blob directory"
            ))
        };
        let rest = url.strip_prefix("s3://").ok_or_else(unsupported)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(unsupported());
        }
        let store = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| StoreError::Config(format!("the object store at {url}: {e}")))?;
        Ok(RemoteBlobs {
            store: Arc::new(store),
            prefix: Path::from(prefix.trim_matches('/')),
            url: url.to_owned(),
        })
    }

    /// Where a blob lives in the bucket.
    fn location(&self, digest: &Digest) -> Path {
        self.prefix.child("sha256").child(digest.as_str())
    }

    fn error(&self, what: &str, digest: &Digest, e: impl std::fmt::Display) -> StoreError {
        StoreError::Remote(format!("{what} sha256:{digest} at {}: {e}", self.url))
    }

    /// Uploads a committed blob unless the bucket already has it.
    pub(crate) async fn upload(&self, digest: &Digest, file: &FsPath, size: u64) -> Result<()> {
        let location = self.location(digest);
        if self.store.head(&location).await.is_ok_and(|meta| meta.size == size) {
            return Ok(());
        }
        let mut source = tokio::fs::File::open(file).await.map_err(|source| StoreError::Io {
            path: file.to_owned(),
            source,
        })?;
        // One PUT for a small blob, a multipart upload for a large one.
        let mut sink = BufWriter::new(self.store.clone(), location);
        let copied = tokio::io::copy(&mut source, &mut sink).await;
        let finished = match copied {
            Ok(_) => sink.shutdown().await,
            Err(e) => {
                let _ = sink.abort().await;
                Err(e)
            }
        };
        finished.map_err(|e| self.error("uploading", digest, e))
    }

    /// Deletes the bucket's blobs whose names are not in `keep` and that
    /// were written longer than `grace` ago (a deploy on another node
    /// uploads its blobs before it records its version: the grace covers
    /// it); returns what went.
    pub(crate) async fn collect(
        &self,
        keep: &std::collections::HashSet<String>,
        grace: std::time::Duration,
    ) -> Result<crate::Collected> {
        let listed = self.prefix.child("sha256");
        let failed = |e: object_store::Error| StoreError::Remote(format!("listing the blobs at {}: {e}", self.url));
        let cutoff = crate::now_ms().saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
        let mut objects = self.store.list(Some(&listed));
        let mut collected = crate::Collected::default();
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(failed)?;
            let Some(name) = meta.location.filename() else { continue };
            if keep.contains(name) || meta.last_modified.timestamp_millis() > cutoff {
                continue;
            }
            match self.store.delete(&meta.location).await {
                Ok(()) => {
                    collected.files += 1;
                    collected.bytes += meta.size;
                }
                Err(e) => tracing::warn!(object = %meta.location, error = %e, "cannot delete an unreferenced blob"),
            }
        }
        Ok(collected)
    }

    /// Downloads a blob into `staged` (a new file), checking its size and
    /// hash: a damaged or wrong object is an error, never a cached blob.
    pub(crate) async fn download(&self, digest: &Digest, size: u64, staged: &FsPath) -> Result<()> {
        let object = self
            .store
            .get(&self.location(digest))
            .await
            .map_err(|e| self.error("fetching", digest, e))?;
        let io = |source| StoreError::Io {
            path: staged.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::create(staged).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut chunks = object.into_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.error("fetching", digest, e))?;
            hasher.update(&chunk);
            len += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        if len != size || hex::encode(hasher.finalize()) != digest.as_str() {
            return Err(self.error(
                "fetching",
                digest,
                format!("the object is damaged ({len} bytes, expected {size}, or its hash differs)"),
            ));
        }
        Ok(())
    }
}
