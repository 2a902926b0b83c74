//! Per-slot log files (`log_dir`), for people who run herd without a log
//! collector (PM2's `logs/` habit), and `herd logs` reading them.
//!
//! Owns the files: `<log_dir>/worker-<slot>.out.log` and `.err.log` (a Node
//! app's own primary: `primary.out.log`, `primary.err.log`), each line
//! `<RFC 3339 UTC time> <line>`. A file that would pass `log_file_size` is
//! rotated first: `.log` becomes `.log.1`, `.1` becomes `.2`, ..., and
//! what would pass `log_file_keep` is deleted, so the files take at most
//! `(log_file_keep + 1) × log_file_size` per stream and slot.
//!
//! Lines reach the files through one bounded queue ([`QUEUE_LINES`]) and a
//! writer thread of its own, so a slow disk blocks that thread, never the
//! main loop; past the bound lines are dropped from the files (not from
//! herd's stdout and stderr) and counted, and the count is logged with
//! the next line that gets through.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::line_format::{rfc3339, Origin, SPLIT_MARKER};

/// Lines waiting for the writer thread: with lines of at most 64 KiB
/// (`MAX_LINE_BYTES`) at most 16 MiB, usually a few KiB.
pub const QUEUE_LINES: usize = 256;

/// Where the files go and how big they get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFileSettings {
    pub dir: PathBuf,
    /// Bytes a file may hold before it is rotated.
    pub max_size: u64,
    /// Rotated files kept per stream (`.log.1` ... `.log.N`).
    pub keep: u32,
}

struct Entry {
    file: String,
    line: Vec<u8>,
}

struct Files {
    queue: SyncSender<Entry>,
    dropped: AtomicU64,
}

static FILES: OnceLock<Files> = OnceLock::new();

/// Starts writing log files as `settings` say: creates the directory and
/// the writer thread. Once per herd; a second call changes nothing.
pub fn start(settings: LogFileSettings) -> io::Result<()> {
    std::fs::create_dir_all(&settings.dir)?;
    let (queue, entries) = sync_channel::<Entry>(QUEUE_LINES);
    if FILES
        .set(Files {
            queue,
            dropped: AtomicU64::new(0),
        })
        .is_err()
    {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("herd-log-files".into())
        .spawn(move || {
            let mut writer = Writer::new(settings);
            for entry in entries {
                writer.write(&entry);
            }
        })?;
    Ok(())
}

/// The file a line of `origin` goes to.
pub fn file_name(origin: Origin) -> String {
    let stream = if origin.stderr { "err" } else { "out" };
    match origin.slot {
        Some(slot) => format!("worker-{slot}.{stream}.log"),
        None => format!("primary.{stream}.log"),
    }
}

/// Queues one line of `origin` for its file, if herd writes log files.
pub fn record(origin: Origin, content: &[u8], split: bool) {
    let Some(files) = FILES.get() else {
        return;
    };
    let mut line = Vec::with_capacity(content.len() + 32);
    line.extend_from_slice(rfc3339(SystemTime::now()).as_bytes());
    line.push(b' ');
    line.extend_from_slice(content);
    if split {
        line.extend_from_slice(SPLIT_MARKER);
    }
    line.push(b'\n');
    let entry = Entry {
        file: file_name(origin),
        line,
    };
    match files.queue.try_send(entry) {
        Ok(()) => {
            let dropped = files.dropped.swap(0, Relaxed);
            if dropped > 0 {
                warn!(
                    dropped,
                    event = "log_file_lines_dropped",
                    "{dropped} worker lines were not written to the log files: the disk did not keep up"
                );
            }
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            files.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// The writer thread's open files and their sizes.
struct Writer {
    settings: LogFileSettings,
    open: HashMap<String, (File, u64)>,
    /// Write errors, logged at the 1st, 2nd, 4th, ... (a full disk repeats).
    failures: crate::rate_limit::Occurrences,
}

impl Writer {
    fn new(settings: LogFileSettings) -> Writer {
        Writer {
            settings,
            open: HashMap::new(),
            failures: Default::default(),
        }
    }

    fn write(&mut self, entry: &Entry) {
        if let Err(e) = self.try_write(entry) {
            if let Some(total) = self.failures.record() {
                warn!(
                    file = entry.file,
                    total,
                    event = "log_file_failed",
                    "cannot write the log file {}: {e}",
                    entry.file
                );
            }
            // Opened again next time: the file may have been moved away.
            self.open.remove(&entry.file);
        }
    }

    fn try_write(&mut self, entry: &Entry) -> io::Result<()> {
        let path = self.settings.dir.join(&entry.file);
        let len = entry.line.len() as u64;
        let full = self
            .open
            .get(&entry.file)
            .is_some_and(|(_, size)| *size > 0 && size + len > self.settings.max_size);
        if full {
            self.open.remove(&entry.file);
            rotate(&path, self.settings.keep)?;
        }
        if !self.open.contains_key(&entry.file) {
            let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.seek(io::SeekFrom::End(0))?;
            self.open.insert(entry.file.clone(), (file, size));
        }
        let (file, size) = self.open.get_mut(&entry.file).expect("opened above");
        file.write_all(&entry.line)?;
        *size += len;
        Ok(())
    }
}

/// `path` becomes `path.1`, each `path.N` becomes `path.N+1`, and what
/// would pass `keep` is removed (with `keep` 0, `path` is removed).
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        if numbered(n).exists() {
            std::fs::rename(numbered(n), numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

/// `herd logs`: the last `lines` lines of each file in `dir` (of `slot`
/// only, if given), oldest rotated file first; with `follow`, then what is
/// appended, as `tail -F` does (a rotated file is followed to its new one).
/// Each line is written as `[worker N] line` (or `[primary] `).
pub fn show(
    dir: &Path,
    slot: Option<usize>,
    lines: usize,
    follow: Option<Duration>,
    out: &mut impl Write,
) -> io::Result<()> {
    let names = names_in(dir, slot)?;
    if names.is_empty() && follow.is_none() {
        writeln!(out, "no log files in {}", dir.display())?;
    }
    // Where each file has been read to; a file that appears later (a new
    // slot) is read from its start.
    let mut positions: HashMap<String, u64> = HashMap::new();
    for name in &names {
        let text = std::fs::read(dir.join(name)).unwrap_or_default();
        let all: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        let tag = tag_of(name);
        for line in &all[all.len().saturating_sub(lines)..] {
            out.write_all(tag.as_bytes())?;
            out.write_all(line)?;
        }
        positions.insert(name.clone(), text.len() as u64);
    }
    out.flush()?;
    let Some(interval) = follow else {
        return Ok(());
    };
    loop {
        for name in names_in(dir, slot)? {
            let at = positions.entry(name.clone()).or_insert(0);
            follow_file(&dir.join(&name), &tag_of(&name), at, out)?;
        }
        out.flush()?;
        std::thread::sleep(interval);
    }
}

/// Writes what `path` holds past `*at`; a file shorter than `*at` was
/// rotated and is read from its start.
fn follow_file(path: &Path, tag: &str, at: &mut u64, out: &mut impl Write) -> io::Result<()> {
    let Ok(mut file) = File::open(path) else {
        return Ok(());
    };
    let len = file.metadata()?.len();
    if len < *at {
        *at = 0;
    }
    file.seek(io::SeekFrom::Start(*at))?;
    let mut reader = io::BufReader::new(file);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        if line.last() != Some(&b'\n') {
            break; // half a line: the rest next time
        }
        *at += line.len() as u64;
        out.write_all(tag.as_bytes())?;
        out.write_all(&line)?;
        line.clear();
    }
    Ok(())
}

/// The current files in `dir` (not the rotated ones), sorted, of `slot`.
fn names_in(dir: &Path, slot: Option<usize>) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".log"))
        .filter(|n| match slot {
            Some(slot) => n.starts_with(&format!("worker-{slot}.")),
            None => n.starts_with("worker-") || n.starts_with("primary."),
        })
        .collect();
    names.sort();
    Ok(names)
}

/// `[worker N] ` for `worker-N.out.log`, `[primary] ` for the primary's.
fn tag_of(name: &str) -> String {
    match name
        .strip_prefix("worker-")
        .and_then(|rest| rest.split('.').next())
    {
        Some(slot) => format!("[worker {slot}] "),
        None => "[primary] ".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("herd-log-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry(file: &str, line: &str) -> Entry {
        Entry {
            file: file.into(),
            line: format!("{line}\n").into_bytes(),
        }
    }

    #[test]
    fn files_rotate_at_their_size_and_keep_only_so_many() {
        let dir = scratch("rotate");
        let settings = LogFileSettings {
            dir: dir.clone(),
            max_size: 20,
            keep: 2,
        };
        let mut writer = Writer::new(settings);
        for n in 0..10 {
            writer.write(&entry("worker-0.out.log", &format!("line number {n}")));
        }
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        // 14 bytes a line, 20 a file: one line each; two rotated kept.
        assert_eq!(read("worker-0.out.log"), "line number 9\n");
        assert_eq!(read("worker-0.out.log.1"), "line number 8\n");
        assert_eq!(read("worker-0.out.log.2"), "line number 7\n");
        assert!(!dir.join("worker-0.out.log.3").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn show_tags_the_last_lines_of_each_slot() {
        let dir = scratch("show");
        std::fs::write(dir.join("worker-0.out.log"), "a\nb\nc\n").unwrap();
        std::fs::write(dir.join("worker-1.err.log"), "x\n").unwrap();
        std::fs::write(dir.join("worker-1.err.log.1"), "old\n").unwrap();
        let mut out = Vec::new();
        show(&dir, None, 2, None, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[worker 0] b\n[worker 0] c\n[worker 1] x\n"
        );
        let mut out = Vec::new();
        show(&dir, Some(1), 10, None, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[worker 1] x\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_followed_file_that_was_rotated_is_read_from_its_start() {
        let dir = scratch("follow");
        let path = dir.join("worker-0.out.log");
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let (mut at, mut out) = (0, Vec::new());
        follow_file(&path, "[worker 0] ", &mut at, &mut out).unwrap();
        std::fs::write(&path, "3\n").unwrap();
        follow_file(&path, "[worker 0] ", &mut at, &mut out).unwrap();
        std::fs::write(&path, "3\nhalf").unwrap();
        follow_file(&path, "[worker 0] ", &mut at, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[worker 0] one\n[worker 0] two\n[worker 0] 3\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
