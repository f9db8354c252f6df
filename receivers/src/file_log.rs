//! A replayable source on plain files: a directory of append-only logs, one per partition,
//! records newline-delimited; offsets are byte positions.
//!
//! ```text
//!  dir/0.log  "r1\nr2\nr3\n"    partition 0: offsets 0, 3, 6, 9 (the end)
//!  dir/1.log  "a\nb"            partition 1: one complete record ("b" is still being written)
//! ```
//!
//! Partitions are the files named `<N>.log` (N a number: the partition); other files are
//! ignored. A range holds complete lines only: a last line without its newline is not read
//! until it is complete. Each record's payload is its line without the newline.
//!
//! What would make a recorded offset point at other data is refused, never skipped:
//! - a file shorter than an offset a batch recorded ([`SourceError::Truncated`], naming the
//!   file and both offsets: truncated, or rewritten shorter);
//! - a file replaced since its offsets were first recorded ([`SourceError::Replaced`]): its
//!   identity is its device and inode plus a fingerprint of its first bytes (up to 4 KiB);
//!   a rotation (rename + new file) or a rewrite in place both change it;
//! - a file that disappeared ([`SourceError::PartitionGone`]);
//! - a line longer than the block size ([`SourceError::RecordTooLarge`]).
//!
//! Write with [`FileLogWriter`] (or anything that appends whole lines).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tributary::{DirectSource, OffsetRange, PlannedRange, RangeLimits, RangeSink, SourceError};

/// Bytes of a file's beginning its identity fingerprints.
const HEAD_BYTES: u64 = 4096;
/// Bytes read at a time when planning.
const SCAN_CHUNK: usize = 1 << 20;

/// A directory of newline-delimited logs, one per partition (`0.log`, `1.log`, …), as a
/// [`DirectSource`] for [`StreamingContext::direct_stream`](tributary::StreamingContext::direct_stream).
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use tributary_receivers::file_log::{FileLog, FileLogWriter};
/// let mut w = FileLogWriter::open("/var/lib/events", 0)?;
/// w.append(b"first record")?;
/// w.sync()?;
/// let source = FileLog::open("/var/lib/events")?; // then ctx.direct_stream("events", source)
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FileLog {
    dir: PathBuf,
}

impl FileLog {
    /// The logs in `dir`, which must exist and be a directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileLog, SourceError> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Ok(FileLog { dir }),
            Ok(_) => Err(SourceError::Invalid {
                what: dir.display().to_string(),
                detail: "is not a directory".into(),
            }),
            Err(e) => Err(SourceError::Invalid {
                what: dir.display().to_string(),
                detail: format!("cannot be read: {e}"),
            }),
        }
    }

    /// The file of `partition`.
    pub fn path(&self, partition: u32) -> PathBuf {
        partition_path(&self.dir, partition)
    }

    fn blocking<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T, SourceError>>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T, SourceError> + Send + 'static,
    {
        let dir = self.dir.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&dir))
                .await
                .map_err(|e| SourceError::Invalid {
                    what: "the file log".into(),
                    detail: e.to_string(),
                })?
        }
    }
}

fn partition_path(dir: &Path, partition: u32) -> PathBuf {
    dir.join(format!("{partition}.log"))
}

fn unavailable(what: &Path, e: std::io::Error) -> SourceError {
    SourceError::Unavailable {
        what: what.display().to_string(),
        source: Box::new(e),
    }
}

/// The partition's file, or `PartitionGone` if it no longer exists.
fn open_partition(dir: &Path, partition: u32, from: u64) -> Result<File, SourceError> {
    let path = partition_path(dir, partition);
    File::open(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SourceError::PartitionGone {
            partition,
            what: path.display().to_string(),
            offset: from,
        },
        _ => unavailable(&path, e),
    })
}

/// FNV-1a: stable across processes and builds.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(unix)]
fn file_key(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_key(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// `dev:ino:n:hash` of the first `n` bytes: given, or the complete lines within the first
/// [`HEAD_BYTES`] (an incomplete line may still be cut off by its writer).
fn identity_of(file: &mut File, head: Option<u64>) -> std::io::Result<String> {
    let m = file.metadata()?;
    let (dev, ino) = file_key(&m);
    let n = head.unwrap_or_else(|| m.len().min(HEAD_BYTES)).min(m.len());
    let mut buf = vec![0; n as usize];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut buf)?;
    if head.is_none() {
        let complete = memchr::memrchr(b'\n', &buf).map_or(0, |i| i + 1);
        buf.truncate(complete);
    }
    Ok(format!("{dev}:{ino}:{}:{:016x}", buf.len(), fnv(&buf)))
}

/// Refuses a file that is not the one `identity` was taken of.
fn check_identity(file: &mut File, path: &Path, identity: Option<&str>) -> Result<(), SourceError> {
    let Some(want) = identity else {
        return Ok(());
    };
    let head = want
        .split(':')
        .nth(2)
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| SourceError::Invalid {
            what: path.display().to_string(),
            detail: format!("recorded identity `{want}` is not one of a file log"),
        })?;
    let len = file.metadata().map_err(|e| unavailable(path, e))?.len();
    if len < head {
        return Err(SourceError::Truncated {
            what: path.display().to_string(),
            end: len,
            recorded: head,
        });
    }
    let got = identity_of(file, Some(head)).map_err(|e| unavailable(path, e))?;
    if got != want {
        let key = |s: &str| s.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
        let detail = if key(&got) != key(want) {
            format!(
                "another file (device:inode {} now, {} recorded): rotated or recreated",
                key(&got),
                key(want)
            )
        } else {
            format!("its first {head} bytes changed: rewritten in place")
        };
        return Err(SourceError::Replaced {
            what: path.display().to_string(),
            detail,
        });
    }
    Ok(())
}

/// Where a range from `from` ends: complete lines only, within `limits`.
fn plan_file(
    dir: &Path,
    partition: u32,
    from: u64,
    limits: RangeLimits,
    identity: Option<&str>,
) -> Result<PlannedRange, SourceError> {
    let path = partition_path(dir, partition);
    let mut file = open_partition(dir, partition, from)?;
    let len = file.metadata().map_err(|e| unavailable(&path, e))?.len();
    if len < from {
        return Err(SourceError::Truncated {
            what: path.display().to_string(),
            end: len,
            recorded: from,
        });
    }
    check_identity(&mut file, &path, identity)?;
    if from > 0 {
        // A range starts after a newline (or at 0): anything else is not an offset of ours.
        let mut prev = [0u8; 1];
        file.seek(SeekFrom::Start(from - 1))
            .and_then(|_| file.read_exact(&mut prev))
            .map_err(|e| unavailable(&path, e))?;
        if prev[0] != b'\n' {
            return Err(SourceError::Invalid {
                what: path.display().to_string(),
                detail: format!("offset {from} is not at the start of a line"),
            });
        }
    }
    file.seek(SeekFrom::Start(from))
        .map_err(|e| unavailable(&path, e))?;
    let max_records = limits.max_records.unwrap_or(u64::MAX);
    let mut until = from;
    let mut records = 0u64;
    let mut bytes = 0usize;
    // Where the line being scanned started, and the bytes of it seen so far.
    let mut line_start = from;
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut pos = from;
    'scan: while records < max_records {
        let n = file.read(&mut buf).map_err(|e| unavailable(&path, e))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let mut i = 0;
        while records < max_records {
            match memchr::memchr(b'\n', &chunk[i..]) {
                Some(j) => {
                    let end = pos + (i + j) as u64; // the newline's offset
                    let line = (end - line_start) as usize;
                    let encoded = line + 4;
                    if encoded > limits.max_bytes {
                        return Err(SourceError::RecordTooLarge {
                            what: path.display().to_string(),
                            offset: Some(line_start),
                            bytes: line,
                            limit: limits.max_bytes.saturating_sub(4),
                        });
                    }
                    if bytes + encoded > limits.max_bytes {
                        break 'scan;
                    }
                    bytes += encoded;
                    records += 1;
                    until = end + 1;
                    line_start = end + 1;
                    i += j + 1;
                }
                None => {
                    // A line still open: it ends in a later chunk, or is not complete yet.
                    let open = (pos + n as u64 - line_start) as usize;
                    if open + 4 > limits.max_bytes {
                        return Err(SourceError::RecordTooLarge {
                            what: path.display().to_string(),
                            offset: Some(line_start),
                            bytes: open,
                            limit: limits.max_bytes.saturating_sub(4),
                        });
                    }
                    break;
                }
            }
        }
        pos += n as u64;
    }
    Ok(PlannedRange { until, records })
}

/// The bytes of `range`, which must be whole lines of the same file.
fn read_file(
    dir: &Path,
    range: OffsetRange,
    identity: Option<&str>,
) -> Result<Vec<u8>, SourceError> {
    let path = partition_path(dir, range.partition);
    let mut file = open_partition(dir, range.partition, range.from)?;
    let len = file.metadata().map_err(|e| unavailable(&path, e))?.len();
    if len < range.until {
        return Err(SourceError::Truncated {
            what: path.display().to_string(),
            end: len,
            recorded: range.until,
        });
    }
    check_identity(&mut file, &path, identity)?;
    let mut data = vec![0u8; (range.until - range.from) as usize];
    file.seek(SeekFrom::Start(range.from))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(|e| unavailable(&path, e))?;
    if data.last().is_some_and(|b| *b != b'\n') {
        return Err(SourceError::Invalid {
            what: path.display().to_string(),
            detail: format!(
                "offsets {}..{} do not end at the end of a line",
                range.from, range.until
            ),
        });
    }
    Ok(data)
}

impl DirectSource for FileLog {
    fn describe(&self, partition: u32) -> String {
        self.path(partition).display().to_string()
    }

    async fn partitions(&self) -> Result<Vec<u32>, SourceError> {
        self.blocking(|dir| {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(|e| unavailable(dir, e))? {
                let entry = entry.map_err(|e| unavailable(dir, e))?;
                let name = entry.file_name();
                let Some(p) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                // `007.log` is not partition 7's file (`7.log` is): ignore it.
                if partition_path(dir, p) == entry.path() {
                    out.push(p);
                }
            }
            out.sort_unstable();
            Ok(out)
        })
        .await
    }

    async fn start_offset(&self, _partition: u32) -> Result<u64, SourceError> {
        Ok(0)
    }

    async fn identity(&self, partition: u32) -> Result<Option<String>, SourceError> {
        self.blocking(move |dir| {
            let path = partition_path(dir, partition);
            let mut file = open_partition(dir, partition, 0)?;
            identity_of(&mut file, None)
                .map(Some)
                .map_err(|e| unavailable(&path, e))
        })
        .await
    }

    async fn plan(
        &self,
        partition: u32,
        from: u64,
        limits: RangeLimits,
        identity: Option<&str>,
    ) -> Result<PlannedRange, SourceError> {
        let identity = identity.map(str::to_owned);
        self.blocking(move |dir| plan_file(dir, partition, from, limits, identity.as_deref()))
            .await
    }

    async fn read(
        &self,
        range: OffsetRange,
        identity: Option<&str>,
        out: &mut RangeSink,
    ) -> Result<(), SourceError> {
        let identity = identity.map(str::to_owned);
        let data = self
            .blocking(move |dir| read_file(dir, range, identity.as_deref()))
            .await?;
        let mut offset = range.from;
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &data) {
            let payload = &data[start..end];
            let line_len = (end + 1 - start) as u64;
            start = end + 1;
            out.push(payload).map_err(|e| match e {
                SourceError::RecordTooLarge { bytes, limit, .. } => SourceError::RecordTooLarge {
                    what: self.describe(range.partition),
                    offset: Some(offset),
                    bytes,
                    limit,
                },
                e => e,
            })?;
            offset += line_len;
        }
        Ok(())
    }
}

/// Appends records to one partition of a [`FileLog`] directory, one line each.
///
/// On open, a last line left incomplete by a writer that crashed mid-write is cut off: it was
/// never complete, so no batch read it.
#[derive(Debug)]
pub struct FileLogWriter {
    file: std::io::BufWriter<File>,
    path: PathBuf,
}

impl FileLogWriter {
    /// Opens (creating it and the directory if needed) partition `partition`'s file in `dir`.
    pub fn open(dir: impl AsRef<Path>, partition: u32) -> std::io::Result<FileLogWriter> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let path = partition_path(dir, partition);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len > 0 {
            // Find the end of the last complete line.
            let mut keep = len;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let start = keep.saturating_sub(buf.len() as u64);
                let n = (keep - start) as usize;
                file.seek(SeekFrom::Start(start))?;
                file.read_exact(&mut buf[..n])?;
                if let Some(i) = memchr::memrchr(b'\n', &buf[..n]) {
                    keep = start + i as u64 + 1;
                    break;
                }
                keep = start;
                if start == 0 {
                    break;
                }
            }
            if keep < len {
                tracing::warn!(file = %path.display(), cut = len - keep, "file log: an incomplete last line was cut off");
                file.set_len(keep)?;
                file.sync_all()?;
            }
        }
        Ok(FileLogWriter {
            file: std::io::BufWriter::new(file),
            path,
        })
    }

    /// Appends one record (it must not contain a newline).
    pub fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
        if memchr::memchr(b'\n', record).is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a record for {} contains a newline: records are lines",
                    self.path.display()
                ),
            ));
        }
        self.file.write_all(record)?;
        self.file.write_all(b"\n")
    }

    /// Writes what is buffered to the file (visible to readers).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    /// Flushes and syncs to disk.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_records: Option<u64>, max_bytes: usize) -> RangeLimits {
        RangeLimits {
            max_records,
            max_bytes,
        }
    }

    fn write(dir: &Path, p: u32, lines: &[&str]) {
        let mut w = FileLogWriter::open(dir, p).unwrap();
        for l in lines {
            w.append(l.as_bytes()).unwrap();
        }
        w.flush().unwrap();
    }

    async fn read_all(log: &FileLog, range: OffsetRange, id: Option<&str>) -> Vec<String> {
        let mut sink = RangeSink::new(1 << 20);
        log.read(range, id, &mut sink).await.unwrap();
        sink.payloads()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn ranges_hold_complete_lines_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0, &["a", "bb", "ccc"]);
        // A line still being written is not read.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("0.log"))
            .unwrap()
            .write_all(b"dd")
            .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("007.log"), "x\n").unwrap();
        let log = FileLog::open(dir.path()).unwrap();
        assert_eq!(log.partitions().await.unwrap(), vec![0]);
        let id = log.identity(0).await.unwrap();
        let all = log
            .plan(0, 0, limits(None, 1 << 20), id.as_deref())
            .await
            .unwrap();
        assert_eq!(
            all,
            PlannedRange {
                until: 9,
                records: 3
            }
        );
        let two = log
            .plan(0, 0, limits(Some(2), 1 << 20), id.as_deref())
            .await
            .unwrap();
        assert_eq!(
            two,
            PlannedRange {
                until: 5,
                records: 2
            }
        );
        // 4 + 1 and 4 + 2 bytes fit in 11, not the third.
        let small = log
            .plan(0, 0, limits(None, 11), id.as_deref())
            .await
            .unwrap();
        assert_eq!(
            small,
            PlannedRange {
                until: 5,
                records: 2
            }
        );
        let range = OffsetRange {
            partition: 0,
            from: 2,
            until: 9,
            records: 2,
        };
        assert_eq!(read_all(&log, range, id.as_deref()).await, ["bb", "ccc"]);
        // A writer reopening cuts the incomplete line, then appends whole lines.
        write(dir.path(), 0, &["e"]);
        let next = log
            .plan(0, 9, limits(None, 1 << 20), id.as_deref())
            .await
            .unwrap();
        assert_eq!(
            next,
            PlannedRange {
                until: 11,
                records: 1
            }
        );
    }

    #[tokio::test]
    async fn truncation_replacement_and_oversized_lines_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0, &["one", "two", "three"]);
        let log = FileLog::open(dir.path()).unwrap();
        let id = log.identity(0).await.unwrap();
        // Truncated under a recorded offset.
        let f = OpenOptions::new().write(true).open(log.path(0)).unwrap();
        f.set_len(4).unwrap();
        let e = log
            .plan(0, 8, limits(None, 1 << 20), id.as_deref())
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::Truncated {
                    end: 4,
                    recorded: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0.log"), "{e}");
        // Replaced: a new file under the same name (rotation).
        std::fs::rename(log.path(0), dir.path().join("0.log.1")).unwrap();
        write(dir.path(), 0, &["other", "content", "longer than before"]);
        let e = log
            .plan(0, 8, limits(None, 1 << 20), id.as_deref())
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Replaced { .. }), "{e}");
        let range = OffsetRange {
            partition: 0,
            from: 0,
            until: 4,
            records: 1,
        };
        let mut sink = RangeSink::new(1 << 20);
        let e = log.read(range, id.as_deref(), &mut sink).await.unwrap_err();
        assert!(matches!(e, SourceError::Replaced { .. }), "{e}");
        // Gone.
        std::fs::remove_file(log.path(0)).unwrap();
        let e = log
            .plan(0, 0, limits(None, 1 << 20), None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, SourceError::PartitionGone { partition: 0, .. }),
            "{e}"
        );
        // A line longer than a block, complete or not.
        write(dir.path(), 1, &["short", &"x".repeat(100)]);
        let e = log.plan(1, 0, limits(None, 64), None).await.unwrap_err();
        assert!(
            matches!(
                e,
                SourceError::RecordTooLarge {
                    offset: Some(6),
                    bytes: 100,
                    ..
                }
            ),
            "{e}"
        );
        // An offset inside a line is not one of ours.
        let e = log
            .plan(1, 2, limits(None, 1 << 20), None)
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Invalid { .. }), "{e}");
        assert!(FileLog::open(dir.path().join("missing")).is_err());
        let mut w = FileLogWriter::open(dir.path(), 2).unwrap();
        assert!(w.append(b"two\nlines").is_err());
    }
}
