//! The decoding contract every device codec follows, and a buffered stream over it.
//!
//! A [`Decoder`] is given the bytes received so far (`buf`, starting where the previous call
//! stopped) and answers one of:
//! - `Ok(Decoded::Complete(item, n))`: `item` was decoded from the first `n` bytes;
//! - `Ok(Decoded::Progress(n))`: the first `n` bytes were used but produced no item yet
//!   (a blank line, a header, one frame of a multi-frame packet);
//! - `Ok(Decoded::Incomplete)`: `buf` holds the start of something; call again with more;
//! - `Err(DecodeError { skip, .. })`: the first `skip` bytes (always ≥ 1) cannot be decoded;
//!   drop them and call again. This is how every codec resynchronises after garbage.
//!
//! Decoders may keep state between calls (a Nonin packet under assembly), but never hold on to
//! bytes: the caller owns the buffer. [`Stream`] is that caller: the `decode` CLI and the tests
//! feed it a plain byte source, and the agent's serial and NUT sessions
//! (`agent/src/sources.rs`) feed it what each read returns.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;
#[cfg(feature = "alloc")]
use core::fmt;

/// What a decoder made of the bytes it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// An item, decoded from the first `usize` bytes.
    Complete(T, usize),
    /// The first `usize` bytes were used, with no item yet.
    Progress(usize),
    /// Not enough bytes to decide; call again with more.
    Incomplete,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// Bytes that do not start any frame of this format.
    #[error("bytes that do not start a frame")]
    Garbage,
    /// No terminator within the format's maximum frame length.
    #[error("frame longer than {max} bytes")]
    TooLong {
        /// The format's maximum frame length.
        max: usize,
    },
    /// The checksum did not match.
    #[error("checksum mismatch (computed {computed:#x}, received {received:#x})")]
    Checksum {
        /// What the bytes add up to.
        computed: u32,
        /// What the frame says they add up to.
        received: u32,
    },
    /// A bridge frame from a protocol version this code does not know.
    #[error("unknown frame version {0}")]
    UnknownVersion(u8),
    /// A frame of the right shape whose content does not parse.
    #[error("malformed {what}")]
    Malformed {
        /// Which part did not parse.
        what: &'static str,
    },
    /// The input ended inside a frame.
    #[error("truncated frame at end of input")]
    Truncated,
}

/// A decoding failure: what went wrong and how many bytes to drop to resynchronise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} ({skip} bytes skipped)")]
pub struct DecodeError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// How many bytes at the start of the buffer to drop (always at least 1).
    pub skip: usize,
}

impl DecodeError {
    /// An error that drops `skip` bytes (at least one, so decoding always advances).
    pub fn new(kind: ErrorKind, skip: usize) -> Self {
        Self { kind, skip: skip.max(1) }
    }

    /// A malformed frame of `skip` bytes.
    pub fn malformed(what: &'static str, skip: usize) -> Self {
        Self::new(ErrorKind::Malformed { what }, skip)
    }
}

/// The result of one decoding step.
pub type DecodeResult<T> = Result<Decoded<T>, DecodeError>;

/// A sans-IO decoder for one wire format.
pub trait Decoder {
    /// What one complete frame (or packet) decodes to.
    type Item;
    /// Decode from the start of `buf`. See the module docs for the contract.
    fn decode(&mut self, buf: &[u8]) -> DecodeResult<Self::Item>;
    /// The largest number of bytes one call may need to see before it can decide.
    fn max_frame_len(&self) -> usize;
}

/// One thing a [`Stream`] yields: an item or an error, with the byte offset in the stream
/// where the frame (or the skipped bytes) began.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent<T> {
    /// A decoded item.
    Item {
        /// The item.
        item: T,
        /// Offset in the whole stream of its first byte.
        offset: u64,
    },
    /// Bytes that were skipped.
    Error {
        /// Why they were skipped.
        error: DecodeError,
        /// Offset in the whole stream of the first skipped byte.
        offset: u64,
    },
}

impl<T> StreamEvent<T> {
    /// The item, if this is one.
    pub fn item(self) -> Option<T> {
        match self {
            StreamEvent::Item { item, .. } => Some(item),
            StreamEvent::Error { .. } => None,
        }
    }
}

#[cfg(feature = "alloc")]
/// A buffer in front of a [`Decoder`]: push bytes as they arrive, pull items and errors.
///
/// The buffer never grows beyond the decoder's [`Decoder::max_frame_len`] plus one push:
/// decoders report oversize frames as [`ErrorKind::TooLong`] themselves.
pub struct Stream<D: Decoder> {
    decoder: D,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    offset: u64,
}

#[cfg(feature = "alloc")]
impl<D: Decoder> Stream<D> {
    /// A stream over `decoder`, starting at offset 0.
    pub fn new(decoder: D) -> Self {
        Self { decoder, buf: Vec::new(), offset: 0 }
    }

    /// The decoder, for formats whose decoder carries context.
    pub fn decoder_mut(&mut self) -> &mut D {
        &mut self.decoder
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next item or error from the buffered bytes, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<StreamEvent<D::Item>> {
        loop {
            if self.buf.is_empty() {
                return None;
            }
            match self.decoder.decode(&self.buf) {
                Ok(Decoded::Complete(item, n)) => {
                    let offset = self.offset;
                    self.consume(n);
                    return Some(StreamEvent::Item { item, offset });
                }
                Ok(Decoded::Progress(n)) => self.consume(n),
                Ok(Decoded::Incomplete) => return None,
                Err(error) => {
                    let offset = self.offset;
                    self.consume(error.skip);
                    return Some(StreamEvent::Error { error, offset });
                }
            }
        }
    }

    /// The input has ended: report what is left in the buffer, if it is more than line
    /// terminators and padding, as a truncated frame, and clear it.
    pub fn finish(&mut self) -> Option<StreamEvent<D::Item>> {
        let leftover = core::mem::take(&mut self.buf);
        let offset = self.offset;
        self.offset += leftover.len() as u64;
        let meaningful = leftover.iter().any(|b| !matches!(b, b'\r' | b'\n' | b' ' | 0));
        meaningful.then(|| StreamEvent::Error { error: DecodeError::new(ErrorKind::Truncated, leftover.len()), offset })
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.buf.len()).max(1);
        self.buf.drain(..n);
        self.offset += n as u64;
    }
}

#[cfg(feature = "alloc")]
impl<D: Decoder> fmt::Debug for Stream<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream").field("buffered", &self.buf.len()).field("offset", &self.offset).finish()
    }
}

#[cfg(feature = "alloc")]
/// Decode a whole byte slice: every item and error, in order, with offsets. Used by tests and
/// by the `decode` CLI.
pub fn decode_all<D: Decoder>(decoder: D, bytes: &[u8]) -> Vec<StreamEvent<D::Item>> {
    let mut stream = Stream::new(decoder);
    stream.push(bytes);
    let mut out = Vec::new();
    while let Some(ev) = stream.next_event() {
        out.push(ev);
    }
    out.extend(stream.finish());
    out
}
