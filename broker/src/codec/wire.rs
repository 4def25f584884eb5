//! MQTT's data representations (MQTT 5 section 1.5), read with every length checked against
//! what is left of the packet, and written.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::FrameError;

/// The largest Variable Byte Integer: four bytes of seven bits.
pub(super) const MAX_VARINT: u32 = 268_435_455;

/// A packet's bytes being read. Every read that would cross the end is an error, never a panic.
pub(super) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The rest, consumed.
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn need(&self, n: usize, what: &str) -> Result<(), FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Malformed(format!("packet ends inside {what}")));
        }
        Ok(())
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8, FrameError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    pub(super) fn u16(&mut self, what: &str) -> Result<u16, FrameError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, FrameError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    /// A Variable Byte Integer, in its shortest or any valid form up to four bytes.
    pub(super) fn varint(&mut self, what: &str) -> Result<u32, FrameError> {
        let mut value = 0u32;
        for i in 0..4 {
            let byte = self.u8(what)?;
            value |= u32::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(FrameError::Malformed(format!(
            "{what}: a variable byte integer longer than four bytes"
        )))
    }

    /// `n` bytes.
    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<Bytes, FrameError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }

    /// Binary Data: a two-byte length and that many bytes.
    pub(super) fn binary(&mut self, what: &str) -> Result<Bytes, FrameError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A UTF-8 Encoded String: valid UTF-8 without U+0000 (MQTT-1.5.4-1, -2).
    pub(super) fn string(&mut self, what: &str) -> Result<Bytes, FrameError> {
        let bytes = self.binary(what)?;
        check_utf8(&bytes, what)?;
        Ok(bytes)
    }

    /// The same as [`Reader::string`], as an owned `String`.
    pub(super) fn owned_string(&mut self, what: &str) -> Result<String, FrameError> {
        let bytes = self.string(what)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Checks that `bytes` are an MQTT UTF-8 string's content.
pub(super) fn check_utf8(bytes: &[u8], what: &str) -> Result<(), FrameError> {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => Ok(()),
        Ok(_) => Err(FrameError::Malformed(format!("{what} contains U+0000"))),
        Err(_) => Err(FrameError::Malformed(format!("{what} is not UTF-8"))),
    }
}

/// The bytes a Variable Byte Integer of `value` takes.
pub(super) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `value` (at most [`MAX_VARINT`]) as a Variable Byte Integer.
pub(super) fn put_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// Writes Binary Data or a string: a two-byte length and the bytes (at most 65,535).
pub(super) fn put_binary(buf: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    buf.put_u16(len as u16);
    buf.put_slice(&bytes[..len]);
}
