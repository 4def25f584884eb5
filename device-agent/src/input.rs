//! The device application's messages: lines `<topic-suffix> <payload>` on stdin or on a
//! `--listen-socket` connection.
//!
//! Lines are read as bytes and bounded by `max_packet_bytes`: a PUBLISH carries all of a line but
//! its space, plus the `devices/<id>/` prefix and headers, so a longer line could never be sent.
//! A line too long is discarded up to its newline without being kept, a line that is not UTF-8 is
//! skipped; both are logged and reading goes on with the next line, so one bad line never ends
//! the input and no peer can make the agent buffer without bound. Whether a line makes a message
//! the agent can send is decided where it is queued ([`crate::outbound`]).

use std::io;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tracing::warn;

use crate::session::Outbound;

/// What [`next_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line no longer than the bound, now in the caller's buffer.
    Kept,
    /// A line longer than the bound, of this many bytes (newline excluded): consumed, not kept.
    TooLong(usize),
}

/// Reads lines from `reader` into `tx` until the input ends, fails, or the agent stops
/// listening. Lines longer than `max_line_bytes` are refused.
pub async fn read_messages(mut reader: impl AsyncBufRead + Unpin, tx: mpsc::Sender<Outbound>, max_line_bytes: usize) {
    let mut line = Vec::new();
    loop {
        match next_line(&mut reader, &mut line, max_line_bytes).await {
            Ok(None) => return,
            Err(e) => {
                warn!(event = "input_failed", error = %e, "cannot read input any more: {e}");
                return;
            }
            Ok(Some(Line::TooLong(bytes))) => warn!(
                event = "line_refused",
                bytes,
                max_packet_bytes = max_line_bytes,
                "refused a line of {bytes} bytes: longer than max_packet_bytes ({max_line_bytes}), it could never be sent; not queued"
            ),
            Ok(Some(Line::Kept)) => match std::str::from_utf8(&line) {
                Err(e) => warn!(
                    event = "line_refused",
                    bytes = line.len(),
                    "refused a line of {} bytes that is not UTF-8 ({e}); not queued",
                    line.len()
                ),
                Ok(text) => {
                    let (suffix, payload) = text.split_once(' ').unwrap_or((text, ""));
                    if tx.send((suffix.to_owned(), payload.as_bytes().to_vec())).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
}

/// Reads the next line into `line` (cleared first, newline removed), keeping it only if it is at
/// most `bound` bytes long; a longer one is consumed up to its newline and only counted. `None`
/// at the end of the input; a last line without a newline counts as a line.
async fn next_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    bound: usize,
) -> io::Result<Option<Line>> {
    line.clear();
    let mut length = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok((length > 0).then(|| judged(length, bound)));
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let piece = &available[..newline.unwrap_or(available.len())];
        length += piece.len();
        if length <= bound {
            line.extend_from_slice(piece);
        } else {
            line.clear();
        }
        let used = piece.len() + usize::from(newline.is_some());
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(judged(length, bound)));
        }
    }
}

fn judged(length: usize, bound: usize) -> Line {
    if length <= bound {
        Line::Kept
    } else {
        Line::TooLong(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn messages(input: &[u8], bound: usize) -> Vec<Outbound> {
        let (tx, mut rx) = mpsc::channel(16);
        read_messages(input, tx, bound).await;
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            out.push(message);
        }
        out
    }

    #[tokio::test]
    async fn a_line_that_is_not_utf8_is_skipped_and_reading_goes_on() {
        let read = messages(b"t one\nt \xff\xfe\nt three", 64).await;
        assert_eq!(
            read,
            vec![("t".into(), b"one".to_vec()), ("t".into(), b"three".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_line_longer_than_the_bound_is_discarded_up_to_its_newline() {
        let mut input = b"t ".to_vec();
        input.extend(vec![b'x'; 100_000]);
        input.extend(b"\nt after\n");
        assert_eq!(messages(&input, 64).await, vec![("t".into(), b"after".to_vec())]);
        // A line exactly at the bound is kept; its message is judged when it is queued.
        assert_eq!(messages(b"t 123456\n", 8).await, vec![("t".into(), b"123456".to_vec())]);
    }

    #[tokio::test]
    async fn a_long_line_is_never_held_whole() {
        // Fed through a small buffer: the line is counted piece by piece, never kept.
        let mut input = vec![b'x'; 10_000];
        input.push(b'\n');
        let mut reader = tokio::io::BufReader::with_capacity(256, &input[..]);
        let mut line = Vec::new();
        let found = next_line(&mut reader, &mut line, 1024).await.unwrap();
        assert_eq!(found, Some(Line::TooLong(10_000)));
        assert!(line.capacity() <= 2 * 1024, "kept {} bytes", line.capacity());
        assert_eq!(next_line(&mut reader, &mut line, 1024).await.unwrap(), None);
    }
}
