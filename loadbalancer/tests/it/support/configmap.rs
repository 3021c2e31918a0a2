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
//! directory: the file never appears half-written or missing. A Secret volume
//! (`tls.crt` and `tls.key`) is mounted the same way, with several files.

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
        Self::with_files(&[("config.json", json.as_bytes())])
    }

    /// A mount holding each `(name, content)` of `files`, every one linked as
    /// `<mount>/<name> -> ..data/<name>`.
    pub(crate) fn with_files(files: &[(&str, &[u8])]) -> Self {
        let mut mount = Self {
            dir: temp_dir(),
            current: None,
            version: 0,
        };
        mount.update_files(files);
        for (name, _) in files {
            symlink(Path::new("..data").join(name), mount.dir.join(name))
                .expect("link the file into ..data");
        }
        mount
    }

    /// The path of `name` in the mount, as a pod sees it.
    #[allow(
        dead_code,
        reason = "the load balancer's TLS tests use it; the backend's, which compile this file too, do not"
    )]
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
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
        self.update_files(&[("config.json", json.as_bytes())]);
    }

    /// Publishes new contents for every file at once, as the kubelet does.
    pub(crate) fn update_files(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is past 1970")
            .as_nanos();
        let name = format!("..{nanos}.{}", self.version);
        let version_dir = self.dir.join(&name);
        std::fs::create_dir(&version_dir).expect("create the version directory");
        for (file, content) in files {
            std::fs::write(version_dir.join(file), content).expect("write the new content");
        }
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
