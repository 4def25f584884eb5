//! The on-disk queue of QoS 1 messages not yet acknowledged by the broker.
//!
//! One file per message, named by a sequence number: written to a temporary name, synced, renamed
//! and the directory synced, so a message accepted by [`Queue::push`] survives `kill -9` and a
//! power cut, and a reader never sees half a message. The file is removed when the broker
//! acknowledges it. When the queue is full the oldest messages are dropped, and counted.
//!
//! A file that cannot be read, or does not hold a message, is set aside (renamed `<seq>.corrupt`)
//! rather than retried, and so is a message that can no longer be sent (`<seq>.refused`, e.g.
//! larger than a lowered `max_packet_bytes`): either would otherwise come back on every
//! connection. Set-aside files are kept for the operator and never read again.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Why a queued message cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The file could not be read.
    #[error("{}: unreadable: {source}", path.display())]
    Unreadable {
        /// The message's file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file does not hold `<topic-suffix>\n<payload>`.
    #[error("{}: not a queued message: {reason}", path.display())]
    Malformed {
        /// The message's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file is larger than any message this agent accepts (left unread).
    #[error("{}: {bytes} bytes, larger than any message this agent sends (max_packet_bytes)", path.display())]
    TooLarge {
        /// The message's file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
}

impl EntryError {
    /// How the entry is set aside: a well-formed message too large to send is refused, any
    /// other is corrupt.
    pub fn set_aside(&self) -> SetAside {
        match self {
            EntryError::TooLarge { .. } => SetAside::Refused,
            EntryError::Unreadable { .. } | EntryError::Malformed { .. } => SetAside::Corrupt,
        }
    }
}

/// Why a message leaves the queue without being sent: the extension its file is renamed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetAside {
    /// Unreadable or malformed (`.corrupt`).
    Corrupt,
    /// A message this agent can no longer send (`.refused`).
    Refused,
}

impl SetAside {
    fn extension(self) -> &'static str {
        match self {
            SetAside::Corrupt => "corrupt",
            SetAside::Refused => "refused",
        }
    }
}

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

/// The largest packet MQTT's length field can say: no entry can be a message beyond it.
const MQTT_MAX_PACKET: u64 = 268_435_455;

/// The queue directory and what it holds.
pub struct Queue {
    dir: PathBuf,
    max: usize,
    seqs: BTreeSet<u64>,
    next: u64,
    dropped: u64,
    /// Entries larger than this are set aside unread.
    max_entry_bytes: u64,
}

impl Queue {
    /// Opens (creating if needed) the queue in `dir`, bounded to `max` messages.
    pub fn open(dir: &Path, max: usize) -> io::Result<Self> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut seqs = BTreeSet::new();
        // Numbers of messages set aside count too: a new message never takes a name one had.
        let mut highest = 0;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let seq: Option<u64> = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok());
            highest = highest.max(seq.unwrap_or(0));
            match path.extension().and_then(|e| e.to_str()) {
                Some("msg") => {
                    if let Some(seq) = seq {
                        seqs.insert(seq);
                    }
                }
                // A write interrupted before its rename: never accepted, so never promised. One
                // that cannot be removed is in the way of nothing.
                Some("tmp") => {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(file = %path.display(), error = %e, "cannot remove an interrupted queue write; leaving it");
                    }
                }
                _ => {}
            }
        }
        let next = highest + 1;
        Ok(Self {
            dir: dir.to_owned(),
            max,
            seqs,
            next,
            dropped: 0,
            max_entry_bytes: MQTT_MAX_PACKET,
        })
    }

    /// Sets aside, unread, entries larger than `bytes` (the agent's `max_packet_bytes`: no
    /// message it accepts is larger); by default the largest packet MQTT can frame.
    pub fn limit_entries(mut self, bytes: u64) -> Self {
        self.max_entry_bytes = bytes;
        self
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
    pub fn read(&self, seq: u64) -> Result<Option<Message>, EntryError> {
        if !self.seqs.contains(&seq) {
            return Ok(None);
        }
        let path = self.path(seq);
        // Never read more than a message can be: a file of any size could be in the directory.
        if let Ok(meta) = fs::metadata(&path) {
            if meta.is_file() && meta.len() > self.max_entry_bytes {
                return Err(EntryError::TooLarge {
                    path,
                    bytes: meta.len(),
                });
            }
        }
        let mut bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(source) => return Err(EntryError::Unreadable { path, source }),
        };
        let malformed = |reason| EntryError::Malformed {
            path: path.clone(),
            reason,
        };
        let split = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| malformed("no newline after the topic suffix"))?;
        let payload = bytes.split_off(split + 1);
        bytes.truncate(split);
        let suffix = String::from_utf8(bytes).map_err(|_| malformed("the topic suffix is not UTF-8"))?;
        Ok(Some(Message { seq, suffix, payload }))
    }

    /// Takes message `seq` out of the queue without sending it: renames its file to
    /// `<seq>.corrupt` or `<seq>.refused` and returns the new name. Even if the rename fails the
    /// message is forgotten until the agent restarts, so it is never retried on every connection.
    pub fn set_aside(&mut self, seq: u64, why: SetAside) -> io::Result<PathBuf> {
        self.seqs.remove(&seq);
        let aside = self.path(seq).with_extension(why.extension());
        fs::rename(self.path(seq), &aside)?;
        Ok(aside)
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
    fn corrupt_and_unreadable_entries_are_set_aside_and_the_rest_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = Queue::open(dir.path(), 10).unwrap();
        let first = queue.push("t", b"first").unwrap();
        let name = |seq: u64, ext: &str| dir.path().join(format!("{seq:020}.{ext}"));
        // Damage: no separator, a suffix that is not UTF-8, a file that cannot be read.
        fs::write(name(first + 1, "msg"), b"no newline").unwrap();
        fs::write(name(first + 2, "msg"), b"\xff\xfe\npayload").unwrap();
        fs::create_dir(name(first + 3, "msg")).unwrap();
        drop(queue);
        let mut queue = Queue::open(dir.path(), 10).unwrap();
        let last = queue.push("t", b"last").unwrap();
        for damaged in first + 1..=first + 3 {
            let error = queue.read(damaged).unwrap_err().to_string();
            assert!(error.contains(&format!("{damaged:020}.msg")), "names the file: {error}");
            assert_eq!(
                queue.set_aside(damaged, SetAside::Corrupt).unwrap(),
                name(damaged, "corrupt")
            );
            assert!(!name(damaged, "msg").exists());
        }
        assert_eq!(queue.after(0).collect::<Vec<_>>(), vec![first, last]);
        assert_eq!(queue.read(last).unwrap().unwrap().payload, b"last");
        queue.set_aside(first, SetAside::Refused).unwrap();
        assert!(name(first, "refused").exists());
        // Never read again, after a restart either.
        assert_eq!(
            Queue::open(dir.path(), 10).unwrap().after(0).collect::<Vec<_>>(),
            vec![last]
        );
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
