//! Config watch: notices when a config file mounted from a Kubernetes ConfigMap
//! changes, so a program can reload it while it runs. Each binary's reloader polls
//! a [`ConfigFile`] and decides itself what a new text means; this module only
//! answers "what is the file's text, if it changed since the last look?".
//!
//! Kubernetes updates a mounted ConfigMap by writing a new timestamped directory,
//! pointing a `..data_tmp` symlink at it and renaming that over `..data`; the file
//! a program is given (`config.json`) is a symlink to `..data/config.json`. The
//! swap is atomic, but it replaces the *directory*, so an inotify watch on the old
//! file sees nothing useful. So a reloader polls (every [`POLL_INTERVAL`]), and
//! each check re-resolves the path and compares a fingerprint: the resolved target,
//! its modification time and a hash of its content. The file is read only when
//! target or modification time moved, and reported only when the content did.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often a reloader checks the file: a change is live within about this long,
/// and a check (a `stat` and, on a change only, one small read) costs nothing.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// One config file, and the version of it last seen.
#[derive(Debug)]
pub struct ConfigFile {
    /// The path as given (`--config`), re-resolved on every check because the
    /// symlinks behind it are swapped.
    path: PathBuf,
    /// The file as last seen, so an unchanged file is not read or reported again.
    /// `None` while the file cannot be read, so that it counts as changed when it
    /// is back.
    seen: Option<Fingerprint>,
}

/// What identifies one version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    /// Where the path resolves to now: a ConfigMap update changes it.
    target: PathBuf,
    /// The target's modification time: an in-place edit changes it.
    modified: Option<SystemTime>,
    /// The content's hash: decides whether anything really changed (a swap to
    /// identical content, or a `touch`, is not a change).
    hash: u64,
}

impl ConfigFile {
    /// Watches the file at `path`. Its content now counts as seen: it is what the
    /// program has just loaded (or near enough: a change between loading and here
    /// is reported by the first check).
    pub fn new(path: PathBuf) -> Self {
        let mut file = Self { path, seen: None };
        file.seen = file.read_if_moved().ok().flatten().map(|(seen, _)| seen);
        file
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks at the file once. Returns its text if the content changed since the
    /// last look (a file that was unreadable and is back counts as changed), and
    /// `None` if it did not.
    ///
    /// A file that cannot be read is an error the first time only: until it is
    /// readable again, later checks return `Ok(None)`, so a caller that reports
    /// every error reports a missing file once rather than at every poll.
    pub fn check(&mut self) -> io::Result<Option<String>> {
        let (fingerprint, text) = match self.read_if_moved() {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(None),
            Err(error) => {
                // Forgetting the fingerprint is what makes the error a one-off,
                // and a reappearing file a change.
                return match self.seen.take() {
                    Some(_) => Err(error),
                    None => Ok(None),
                };
            }
        };
        let content_changed = self
            .seen
            .as_ref()
            .is_none_or(|seen| seen.hash != fingerprint.hash);
        self.seen = Some(fingerprint);
        Ok(content_changed.then_some(text))
    }

    /// Resolves the path through every symlink and reads the file it ends at,
    /// unless target and modification time are those already seen.
    fn read_if_moved(&self) -> io::Result<Option<(Fingerprint, String)>> {
        let target = std::fs::canonicalize(&self.path)?;
        let modified = std::fs::metadata(&target)?.modified().ok();
        if self
            .seen
            .as_ref()
            .is_some_and(|seen| seen.target == target && seen.modified == modified)
        {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&target)?;
        let mut hasher = DefaultHasher::new();
        text.hash(&mut hasher);
        let hash = hasher.finish();
        Ok(Some((
            Fingerprint {
                target,
                modified,
                hash,
            },
            text,
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    /// A fresh directory of its own under the system's temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("config-watch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    /// Writes `text` to `path` with a modification time `seconds` after the
    /// epoch: distinct per write, however coarse the file system's clock.
    fn write(path: &Path, text: &str, seconds: u64) {
        std::fs::write(path, text).expect("write the file");
        File::options()
            .write(true)
            .open(path)
            .and_then(|file| {
                file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
            })
            .expect("set the modification time");
    }

    #[test]
    fn only_new_content_is_a_change() {
        let dir = temp_dir("content");
        let path = dir.join("config.json");
        write(&path, "one", 1);
        let mut file = ConfigFile::new(path.clone());
        assert_eq!(file.check().expect("readable"), None);
        // Same content, new modification time: read, not reported.
        write(&path, "one", 2);
        assert_eq!(file.check().expect("readable"), None);
        write(&path, "two", 3);
        assert_eq!(file.check().expect("readable").as_deref(), Some("two"));
        assert_eq!(file.check().expect("readable"), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_symlink_swap_is_seen_through_the_path_as_given() {
        let dir = temp_dir("swap");
        for (version, text) in [("a", "one"), ("b", "two")] {
            std::fs::create_dir(dir.join(version)).expect("create a version directory");
            write(&dir.join(version).join("config.json"), text, 1);
        }
        let data = dir.join("..data");
        std::os::unix::fs::symlink("a", &data).expect("link ..data");
        let path = dir.join("config.json");
        std::os::unix::fs::symlink("..data/config.json", &path).expect("link the file");
        let mut file = ConfigFile::new(path);
        assert_eq!(file.check().expect("readable"), None);
        // As the kubelet does it: a new link, renamed over the old one.
        let swap = dir.join("..data_tmp");
        std::os::unix::fs::symlink("b", &swap).expect("link ..data_tmp");
        std::fs::rename(&swap, &data).expect("swap ..data");
        assert_eq!(file.check().expect("readable").as_deref(), Some("two"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_file_is_an_error_once_and_a_change_when_it_is_back() {
        let dir = temp_dir("missing");
        let path = dir.join("config.json");
        write(&path, "one", 1);
        let mut file = ConfigFile::new(path.clone());
        std::fs::remove_file(&path).expect("remove the file");
        let error = file.check().expect_err("the file is gone");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert_eq!(file.check().expect("reported already"), None);
        // Back with the content it had: still reported, since the fingerprint
        // went with the error; the caller compares the text with what it runs.
        write(&path, "one", 1);
        assert_eq!(file.check().expect("readable").as_deref(), Some("one"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_missing_from_the_start_is_no_error() {
        let dir = temp_dir("never");
        let path = dir.join("config.json");
        let mut file = ConfigFile::new(path.clone());
        assert_eq!(file.check().expect("nothing was ever read"), None);
        write(&path, "one", 1);
        assert_eq!(file.check().expect("readable").as_deref(), Some("one"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
