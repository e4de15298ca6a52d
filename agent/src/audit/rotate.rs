// SPDX-License-Identifier: Apache-2.0
//! An append-only log file that rotates by size: `audit.log`, `audit.log.1` (newest
//! rotated) … `audit.log.N` (oldest).

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Group-readable so a log shipper in the node's log group can tail it.
const MODE: u32 = 0o640;

#[derive(Debug)]
pub(super) struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    max_files: u32,
    file: File,
    size: u64,
    /// The log was rotated away but the new file could not be created yet: `file`
    /// is the newest rotated file, and the next write retries the open instead of
    /// rotating again (which would push history out, one file per write).
    reopen_pending: bool,
    open: fn(&Path) -> io::Result<File>,
}

impl RotatingFile {
    /// Opens `path` for appending, creating it and its directory if need be.
    pub(super) fn open(path: &Path, max_size: u64, max_files: u32) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            max_size,
            max_files,
            file,
            size,
            reopen_pending: false,
            open: open_append,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `line` (which ends in a newline) in one write, first rotating if it
    /// would take the file past `max_size`.
    pub(super) fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if len > self.max_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {len}-byte record does not fit in an audit log of max_size {} bytes", self.max_size),
            ));
        }
        if self.reopen_pending {
            self.reopen()?;
        } else if self.size + len > self.max_size {
            self.rotate()?;
        }
        match self.file.write_all(line) {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(e) => {
                // Part of the line may have landed; trust the file, not the count.
                self.size = self.file.metadata().map_or(self.size + len, |m| m.len());
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files == 0 {
            ignore_missing(fs::remove_file(&self.path))?;
        } else {
            // Renaming onto `.N` replaces the oldest file, so nothing needs deleting.
            for n in (1..self.max_files).rev() {
                ignore_missing(fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)))?;
            }
            ignore_missing(fs::rename(&self.path, rotated(&self.path, 1)))?;
        }
        self.reopen_pending = true;
        self.reopen()
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = (self.open)(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = file;
        self.reopen_pending = false;
        Ok(())
    }
}

/// `audit.log` → `audit.log.<n>`.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    match OpenOptions::new().append(true).create_new(true).mode(MODE).open(path) {
        Ok(file) => {
            // The umask must not take the log away from its readers.
            file.set_permissions(Permissions::from_mode(MODE))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new().append(true).open(path),
        Err(e) => Err(e),
    }
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> Vec<u8> {
        // 100 bytes with the newline, numbered so order can be checked.
        format!("{n:099}\n").into_bytes()
    }

    fn numbers_in(path: &Path) -> Vec<usize> {
        fs::read_to_string(path).unwrap().lines().map(|l| l.parse().unwrap()).collect()
    }

    #[test]
    fn rotation_keeps_max_files_and_never_exceeds_max_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/audit.log");
        let mut log = RotatingFile::open(&path, 350, 3).unwrap();
        for n in 0..39 {
            log.write_line(&line(n)).unwrap();
        }

        let mut names: Vec<String> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]);
        for name in &names {
            assert!(fs::metadata(path.with_file_name(name)).unwrap().len() <= 350, "{name} is too big");
        }
        // Three lines fit in a file: the newest 12 lines survive, oldest in `.3`.
        assert_eq!(numbers_in(&rotated(&path, 3)), [27, 28, 29]);
        assert_eq!(numbers_in(&rotated(&path, 2)), [30, 31, 32]);
        assert_eq!(numbers_in(&rotated(&path, 1)), [33, 34, 35]);
        assert_eq!(numbers_in(&path), [36, 37, 38]);
    }

    #[test]
    fn a_new_log_is_mode_0640_and_an_existing_one_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        RotatingFile::open(&path, 1000, 1).unwrap().write_line(&line(1)).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);

        let mut reopened = RotatingFile::open(&path, 1000, 1).unwrap();
        reopened.write_line(&line(2)).unwrap();
        assert_eq!(numbers_in(&path), [1, 2]);
    }

    #[test]
    fn reopening_a_full_log_rotates_before_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        fs::write(&path, [line(1), line(2)].concat()).unwrap();
        let mut log = RotatingFile::open(&path, 250, 2).unwrap();
        log.write_line(&line(3)).unwrap();
        assert_eq!(numbers_in(&rotated(&path, 1)), [1, 2]);
        assert_eq!(numbers_in(&path), [3]);
    }

    #[test]
    fn with_max_files_zero_the_old_log_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = RotatingFile::open(&path, 150, 0).unwrap();
        for n in 0..3 {
            log.write_line(&line(n)).unwrap();
        }
        assert_eq!(numbers_in(&path), [2]);
        assert!(!rotated(&path, 1).exists());
    }

    #[test]
    fn a_record_larger_than_max_size_is_refused_and_the_log_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = RotatingFile::open(&path, 150, 2).unwrap();
        log.write_line(&line(1)).unwrap();
        let err = log.write_line(&[b'x'; 200]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(numbers_in(&path), [1]);
        assert!(!rotated(&path, 1).exists());
    }

    #[test]
    fn a_failed_reopen_after_rotation_never_pushes_history_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = RotatingFile::open(&path, 100, 3).unwrap();
        let line = |c: u8| [vec![c; 59], vec![b'\n']].concat();
        log.write_line(&line(b'a')).unwrap();
        log.write_line(&line(b'b')).unwrap(); // rotates: a → .1
        fn refuse(_: &Path) -> io::Result<File> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        log.open = refuse;
        assert!(log.write_line(&line(b'c')).is_err(), "b → .1, a → .2, then the new file cannot be made");
        for _ in 0..10 {
            assert!(log.write_line(&line(b'd')).is_err(), "still failing: the write is refused, nothing is rotated");
        }
        let read = |p: PathBuf| fs::read_to_string(p).unwrap_or_default();
        assert_eq!(read(rotated(&path, 1)), String::from_utf8(line(b'b')).unwrap());
        assert_eq!(read(rotated(&path, 2)), String::from_utf8(line(b'a')).unwrap());
        assert!(!rotated(&path, 3).exists());
        log.open = open_append;
        log.write_line(&line(b'e')).unwrap();
        assert_eq!(read(path.clone()), String::from_utf8(line(b'e')).unwrap(), "the open is retried, not a rotation");
        assert_eq!(read(rotated(&path, 1)), String::from_utf8(line(b'b')).unwrap());
        assert_eq!(read(rotated(&path, 2)), String::from_utf8(line(b'a')).unwrap());
    }
}
