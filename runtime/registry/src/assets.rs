//! A function version's `[[files]]`, laid out as the directory its guests
//! see at `/`.
//!
//! The directory is built from the blobs once, under a name derived from the
//! exact set of (guest path, content) pairs, so versions and functions with
//! the same assets share one directory, and a restart finds it again. It is
//! built in a temporary directory and renamed into place, so a directory
//! under its final name is always complete.

use std::path::{Path, PathBuf};

use hearth_store::{Artifact, ArtifactKind, BlobStore, Digest};

/// The directories of every asset set, under one root.
#[derive(Debug, Clone)]
pub(crate) struct AssetDirs {
    root: PathBuf,
}

impl AssetDirs {
    pub(crate) fn new(root: PathBuf) -> AssetDirs {
        AssetDirs { root }
    }

    /// Where the asset directories live.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding `artifacts`' files (their targets already
    /// validated by the manifest), built from `blobs` if it is not there yet.
    /// `None` when there are no files. Blocking.
    pub(crate) fn ensure(&self, artifacts: &[Artifact], blobs: &BlobStore) -> std::io::Result<Option<PathBuf>> {
        let files: Vec<&Artifact> = artifacts.iter().filter(|a| a.kind == ArtifactKind::File).collect();
        if files.is_empty() {
            return Ok(None);
        }
        let listing: String = files.iter().map(|f| format!("{}\0{}\n", f.name, f.digest)).collect();
        let dir = self.root.join(Digest::of(listing.as_bytes()).as_str());
        if dir.is_dir() {
            return Ok(Some(dir));
        }
        std::fs::create_dir_all(&self.root)?;
        let building = self.root.join(format!(".building-{}", uuid::Uuid::now_v7()));
        let result = build(&building, &files, blobs).and_then(|()| std::fs::rename(&building, &dir));
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&building);
            // Another deploy may have built the same set meanwhile.
            if dir.is_dir() {
                return Ok(Some(dir));
            }
        }
        result.map(|()| Some(dir))
    }
}

fn build(dir: &Path, files: &[&Artifact], blobs: &BlobStore) -> std::io::Result<()> {
    for file in files {
        // Validated by the manifest: absolute, no `.`/`..`/empty parts.
        let target = dir.join(file.name.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let blob = blobs.path(&file.digest);
        // A hard link shares the blob's bytes; across file systems, copy.
        if std::fs::hard_link(&blob, &target).is_err() {
            std::fs::copy(&blob, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_each_set_once_with_files_at_their_targets() {
        let data = tempfile::tempdir().expect("tempdir");
        let blobs = BlobStore::open(data.path()).expect("blobs");
        let mut artifacts = Vec::new();
        for (target, content) in [("/labels.txt", &b"cat\ndog\n"[..]), ("/vocab/en.json", b"{}")] {
            let mut staged = blobs.stage().await.expect("stage");
            staged.write(content).await.expect("write");
            let digest = staged.commit().await.expect("commit");
            artifacts.push(Artifact {
                kind: ArtifactKind::File,
                name: target.into(),
                digest,
                size: content.len() as u64,
            });
        }
        let dirs = AssetDirs::new(data.path().join("assets"));
        let dir = dirs.ensure(&artifacts, &blobs).expect("ensure").expect("dir");
        assert_eq!(std::fs::read(dir.join("labels.txt")).expect("read"), b"cat\ndog\n");
        assert_eq!(std::fs::read(dir.join("vocab/en.json")).expect("read"), b"{}");
        assert_eq!(dirs.ensure(&artifacts, &blobs).expect("again"), Some(dir.clone()));
        let entries = std::fs::read_dir(data.path().join("assets")).expect("list").count();
        assert_eq!(entries, 1, "no leftovers from building");
        assert_eq!(dirs.ensure(&artifacts[..0], &blobs).expect("none"), None);
    }
}
