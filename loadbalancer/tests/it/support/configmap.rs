//! A config file mounted the way the kubelet mounts a ConfigMap volume, so the
//! reload tests meet the same symlinks as a pod:
//!
//! ```text
//! config.json -> ..data/config.json
//! ..data      -> ..2026_11_25_14_00_00.12345   (swapped atomically on update)
//! ..2026_11_25_14_00_00.12345/config.json
//! ```
//!
//! An update writes a new timestamped directory, points a `..data_tmp` symlink
//! at it, renames that over `..data` (one atomic step), then deletes the old
//! directory: the file never appears half-written or missing.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::process::temp_dir;

/// A ConfigMap-style mounted directory holding `config.json`; removed on drop.
#[derive(Debug)]
pub(crate) struct ConfigMapDir {
    dir: PathBuf,
    /// The directory `..data` points at now, deleted by the next update.
    current: Option<PathBuf>,
    /// Distinguishes versions written within the same clock tick.
    version: usize,
}

impl ConfigMapDir {
    /// A mount whose `config.json` holds `json`.
    pub(crate) fn new(json: &str) -> Self {
        let mut mount = Self {
            dir: temp_dir(),
            current: None,
            version: 0,
        };
        mount.update(json);
        symlink("..data/config.json", mount.path()).expect("link config.json into ..data");
        mount
    }

    /// The path a pod is given: `<mount>/config.json`.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The path as a flag value.
    #[allow(
        dead_code,
        reason = "the load balancer's tests use it; the backend's, which compile this file too, do not"
    )]
    pub(crate) fn path_string(&self) -> String {
        self.path().to_str().expect("UTF-8 temp path").to_owned()
    }

    /// Publishes `json` as the kubelet publishes a ConfigMap change.
    pub(crate) fn update(&mut self, json: &str) {
        self.version += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_nanos();
        let name = format!("..{nanos}.{}", self.version);
        let version_dir = self.dir.join(&name);
        std::fs::create_dir(&version_dir).expect("create the version directory");
        std::fs::write(version_dir.join("config.json"), json).expect("write the new config");
        let tmp = self.dir.join("..data_tmp");
        symlink(Path::new(&name), &tmp).expect("link ..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data atomically");
        if let Some(old) = self.current.replace(version_dir) {
            std::fs::remove_dir_all(old).expect("remove the old version");
        }
    }
}

impl Drop for ConfigMapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
