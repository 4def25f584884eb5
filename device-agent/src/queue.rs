//! The on-disk queue of QoS 1 messages not yet acknowledged by the broker.
//!
//! One file per message, named by a sequence number: written to a temporary name, synced, renamed
//! and the directory synced, so a message accepted by [`Queue::push`] survives `kill -9` and a
//! power cut, and a reader never sees half a message. The file is removed when the broker
//! acknowledges it. When the queue is full the oldest messages are dropped, and counted.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// A queued message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Order of acceptance.
    pub seq: u64,
    /// The topic below `devices/<id>/`.
    pub suffix: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// The queue directory and what it holds.
pub struct Queue {
    dir: PathBuf,
    max: usize,
    seqs: BTreeSet<u64>,
    next: u64,
    dropped: u64,
}

impl Queue {
    /// Opens (creating if needed) the queue in `dir`, bounded to `max` messages.
    pub fn open(dir: &Path, max: usize) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut seqs = BTreeSet::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("msg") => {
                    if let Some(seq) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()) {
                        seqs.insert(seq);
                    }
                }
                // A write interrupted before its rename: never accepted, so never promised.
                Some("tmp") => fs::remove_file(&path)?,
                _ => {}
            }
        }
        let next = seqs.last().map_or(1, |last| last + 1);
        Ok(Self {
            dir: dir.to_owned(),
            max,
            seqs,
            next,
            dropped: 0,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.msg"))
    }

    /// Stores a message durably; returns its sequence number. Drops the oldest beyond the bound.
    pub fn push(&mut self, suffix: &str, payload: &[u8]) -> io::Result<u64> {
        let seq = self.next;
        let temp = self.dir.join(format!("{seq:020}.tmp"));
        let mut file = File::create(&temp)?;
        file.write_all(suffix.as_bytes())?;
        file.write_all(b"\n")?;
        file.write_all(payload)?;
        file.sync_all()?;
        fs::rename(&temp, self.path(seq))?;
        File::open(&self.dir)?.sync_all()?;
        self.next += 1;
        self.seqs.insert(seq);
        while self.seqs.len() > self.max {
            if let Some(oldest) = self.seqs.pop_first() {
                let _ = fs::remove_file(self.path(oldest));
                self.dropped += 1;
                tracing::warn!(
                    event = "queue_full",
                    dropped_total = self.dropped,
                    "queue full ({} messages): dropped the oldest message",
                    self.max
                );
            }
        }
        Ok(seq)
    }

    /// Reads message `seq`, if it is still queued.
    pub fn read(&self, seq: u64) -> io::Result<Option<Message>> {
        if !self.seqs.contains(&seq) {
            return Ok(None);
        }
        let bytes = fs::read(self.path(seq))?;
        let split = bytes.iter().position(|b| *b == b'\n').unwrap_or(bytes.len());
        let suffix = String::from_utf8_lossy(&bytes[..split]).into_owned();
        let payload = bytes.get(split + 1..).unwrap_or_default().to_vec();
        Ok(Some(Message { seq, suffix, payload }))
    }

    /// Forgets a message the broker acknowledged.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        if self.seqs.remove(&seq) {
            fs::remove_file(self.path(seq))?;
        }
        Ok(())
    }

    /// Queued sequence numbers after `after`, in order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = u64> + '_ {
        self.seqs.range(after + 1..).copied()
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Messages dropped because the queue was full, since it was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_reopening_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path(), 10).unwrap();
        let a = queue.push("telemetry", b"one").unwrap();
        let b = queue.push("telemetry", b"two\nlines").unwrap();
        drop(queue);
        let mut queue = Queue::open(dir.path(), 10).unwrap();
        assert_eq!(queue.after(0).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(queue.read(b).unwrap().unwrap().payload, b"two\nlines");
        queue.ack(a).unwrap();
        let c = queue.push("x", b"three").unwrap();
        assert!(c > b, "sequence numbers keep growing across restarts");
        assert_eq!(
            Queue::open(dir.path(), 10).unwrap().after(0).collect::<Vec<_>>(),
            vec![b, c]
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path(), 2).unwrap();
        for n in 0..5 {
            queue.push("t", format!("{n}").as_bytes()).unwrap();
        }
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.dropped(), 3);
        let first = queue.after(0).next().unwrap();
        assert_eq!(queue.read(first).unwrap().unwrap().payload, b"3");
    }

    #[test]
    fn an_interrupted_write_is_discarded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("00000000000000000001.tmp"), "half").unwrap();
        let queue = Queue::open(dir.path(), 2).unwrap();
        assert!(queue.is_empty());
        assert!(!dir.path().join("00000000000000000001.tmp").exists());
    }
}
