//! A function's source directory: its `hearth.toml` and built component.

use std::path::{Path, PathBuf};

use hearth_manifest::Manifest;

use crate::{ClientError, Result};

/// Name of the manifest file.
pub const MANIFEST_FILE: &str = "hearth.toml";

/// A project on disk, with its manifest parsed.
#[derive(Debug, Clone)]
pub struct Project {
    dir: PathBuf,
    manifest_text: String,
    manifest: Manifest,
}

impl Project {
    /// Loads `path`: a directory holding `hearth.toml`, or the manifest itself.
    pub fn load(path: &Path) -> Result<Project> {
        let manifest_path = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_owned()
        };
        let manifest_text = std::fs::read_to_string(&manifest_path).map_err(|source| ClientError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::from_toml(&manifest_text)?;
        let dir = manifest_path.parent().map(Path::to_owned).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        Ok(Project {
            dir,
            manifest_text,
            manifest,
        })
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest as written (what is uploaded).
    pub fn manifest_text(&self) -> &str {
        &self.manifest_text
    }

    /// The project directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path from the manifest (a model or asset), resolved against the
    /// project directory.
    pub fn path_of(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// Where the built component is: `component` from the manifest, relative
    /// to the project directory.
    pub fn component_path(&self) -> Result<PathBuf> {
        let component = self.manifest.component.as_deref().ok_or_else(|| {
            ClientError::Project(format!(
                "{}: set `component` to the path of the built .wasm",
                self.dir.join(MANIFEST_FILE).display()
            ))
        })?;
        let path = self.dir.join(component);
        if !path.is_file() {
            let hint = if self.manifest.build.is_some() {
                "the build command ran but did not produce it"
            } else {
                "build it first, or set `build` in hearth.toml"
            };
            return Err(ClientError::Project(format!(
                "component {} not found: {hint}",
                path.display()
            )));
        }
        Ok(path)
    }

    /// Runs the manifest's `build` command (if any) in the project directory,
    /// with its output passed through. Blocking.
    pub fn build(&self) -> Result<()> {
        let Some(command) = &self.manifest.build else {
            return Ok(());
        };
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(&self.dir)
            .status()
            .map_err(|source| ClientError::Io {
                path: self.dir.clone(),
                source,
            })?;
        if !status.success() {
            return Err(ClientError::Project(format!(
                "build command `{command}` failed ({status})"
            )));
        }
        Ok(())
    }
}
