//! The storage seam under the write-ahead log: a directory on disk, or memory (tests).
//!
//! The WAL only appends, syncs, reads, truncates and removes whole named files, so the seam is
//! that small. [`MemStorage`] records every operation in order and can simulate a crash (every
//! byte not yet synced is lost), which lets tests prove that an acknowledgement never precedes
//! the sync that makes it true.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where WAL segments live. All methods block; the WAL calls them from its own thread.
pub trait Storage: Send + Sync + 'static {
    /// Appends `bytes` to `name`, creating it if missing.
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended to `name` durable (fsync), including its directory entry.
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Names of the files present.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of `name`.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// `len` bytes of `name` from `offset`.
    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Cuts `name` to `len` bytes (durably).
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    /// Removes `name`.
    fn remove(&self, name: &str) -> io::Result<()>;
}

impl std::fmt::Debug for dyn Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

/// Segments as files in a directory.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    open: Mutex<HashMap<String, (File, bool)>>,
}

impl DirStorage {
    /// Uses (and creates) `dir`.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<DirStorage> {
        std::fs::create_dir_all(dir.as_ref())?;
        Ok(DirStorage {
            dir: dir.as_ref().to_path_buf(),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (File, bool)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for DirStorage {
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut open = self.lock();
        if !open.contains_key(name) {
            let path = self.dir.join(name);
            let created = !path.exists();
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            open.insert(name.to_string(), (f, created));
        }
        let (f, _) = open
            .get_mut(name)
            .ok_or_else(|| io::Error::other("file vanished"))?;
        f.write_all(bytes)
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut open = self.lock();
        if let Some((f, created)) = open.get_mut(name) {
            f.sync_data()?;
            if *created {
                // A new file's name is durable only once its directory is synced.
                File::open(&self.dir)?.sync_all()?;
                *created = false;
            }
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut f = File::open(self.dir.join(name))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        self.lock().remove(name);
        let f = OpenOptions::new().write(true).open(self.dir.join(name))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.lock().remove(name);
        std::fs::remove_file(self.dir.join(name))?;
        File::open(&self.dir)?.sync_all()
    }
}

/// One operation on a [`MemStorage`], as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `append(name, len bytes)`.
    Append(String, usize),
    /// `sync(name)`.
    Sync(String),
    /// `truncate(name, len)`.
    Truncate(String, u64),
    /// `remove(name)`.
    Remove(String),
    /// A marker pushed by the test (e.g. "acknowledged").
    Mark(String),
}

#[derive(Debug, Default)]
struct MemInner {
    files: HashMap<String, (Vec<u8>, usize)>,
    ops: Vec<Op>,
}

/// In-memory storage for tests: records operations, simulates crashes. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    inner: Arc<Mutex<MemInner>>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every operation so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// Records a marker in the operation log.
    pub fn mark(&self, what: impl Into<String>) {
        self.lock().ops.push(Op::Mark(what.into()));
    }

    /// A crash: every byte not synced is lost.
    pub fn crash(&self) {
        for (data, synced) in self.lock().files.values_mut() {
            data.truncate(*synced);
        }
    }

    /// Overwrites one byte (to simulate corruption).
    pub fn corrupt(&self, name: &str, offset: usize, xor: u8) {
        if let Some((data, _)) = self.lock().files.get_mut(name) {
            if let Some(b) = data.get_mut(offset) {
                *b ^= xor;
            }
        }
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, name.to_string())
}

impl Storage for MemStorage {
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        inner.ops.push(Op::Append(name.to_string(), bytes.len()));
        inner
            .files
            .entry(name.to_string())
            .or_default()
            .0
            .extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut inner = self.lock();
        inner.ops.push(Op::Sync(name.to_string()));
        if let Some((data, synced)) = inner.files.get_mut(name) {
            *synced = data.len();
        }
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = self.lock().files.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.lock()
            .files
            .get(name)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| not_found(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let inner = self.lock();
        let (d, _) = inner.files.get(name).ok_or_else(|| not_found(name))?;
        let start = offset as usize;
        d.get(start..start + len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, name.to_string()))
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        inner.ops.push(Op::Truncate(name.to_string(), len));
        let (d, synced) = inner.files.get_mut(name).ok_or_else(|| not_found(name))?;
        d.truncate(len as usize);
        *synced = d.len();
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut inner = self.lock();
        inner.ops.push(Op::Remove(name.to_string()));
        inner.files.remove(name);
        Ok(())
    }
}
