//! Helpers shared by the line-oriented codecs: line splitting and "no value" aware numbers.

use crate::codec::{DecodeError, Decoded, ErrorKind};

/// The outcome of looking for one line at the start of a buffer.
pub(crate) enum Line<'a> {
    /// A line without its terminator, and the bytes used including the terminator.
    Found(&'a [u8], usize),
    /// Only terminators so far: these many bytes can be dropped.
    Blank(usize),
    /// No terminator yet.
    Incomplete,
}

/// Find the next line in `buf`. `\r`, `\n` and `\r\n` all end a line (devices differ, and a
/// lone `\r` is Megatec's terminator); blank lines are skipped. A line longer than `max`
/// bytes is an error that drops `max` bytes.
pub(crate) fn next_line(buf: &[u8], max: usize) -> Result<Line<'_>, DecodeError> {
    // Terminators left over from the previous line (the `\n` of `\r\n`) and blank lines are
    // consumed on their own, so the offset of the next line is the offset of its first byte.
    let blank = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
    if blank > 0 {
        return Ok(Line::Blank(blank));
    }
    match buf.iter().position(|b| matches!(b, b'\r' | b'\n')) {
        Some(end) if end <= max => Ok(Line::Found(&buf[..end], end + 1)),
        Some(_) => Err(DecodeError::new(ErrorKind::TooLong { max }, max)),
        None if buf.len() > max => Err(DecodeError::new(ErrorKind::TooLong { max }, max)),
        None => Ok(Line::Incomplete),
    }
}

/// Run `parse` on the next line of `buf`, turning blank lines into progress.
pub(crate) fn decode_line<T>(
    buf: &[u8],
    max: usize,
    parse: impl FnOnce(&[u8], usize) -> Result<Decoded<T>, DecodeError>,
) -> Result<Decoded<T>, DecodeError> {
    match next_line(buf, max)? {
        Line::Found(line, used) => parse(line, used),
        Line::Blank(n) => Ok(Decoded::Progress(n)),
        Line::Incomplete => Ok(Decoded::Incomplete),
    }
}

/// The line as text, or `None` when it holds bytes that are not printable ASCII.
pub(crate) fn ascii(line: &[u8]) -> Option<&str> {
    if line.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t') {
        core::str::from_utf8(line).ok()
    } else {
        None
    }
}

/// Does this token mean "no value"? (`---`, `--.-`, `+--`, `@@@.@`, empty)
pub(crate) fn is_no_value(tok: &str) -> bool {
    tok.bytes().all(|b| matches!(b, b'-' | b'+' | b'.' | b'@'))
}

/// A decimal field: `Ok(None)` for "no value", `Err(())` when it is neither a number nor a
/// "no value" filler.
pub(crate) fn opt_f32(tok: &str) -> Result<Option<f64>, ()> {
    if is_no_value(tok) {
        return Ok(None);
    }
    let v: f64 = tok.parse().map_err(|_| ())?;
    if v.is_finite() {
        Ok(Some(v))
    } else {
        Err(())
    }
}

/// An unsigned integer field, with the same "no value" rule.
pub(crate) fn opt_u32(tok: &str) -> Result<Option<u32>, ()> {
    if is_no_value(tok) {
        return Ok(None);
    }
    if tok.is_empty() || !tok.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    tok.parse().map(Some).map_err(|_| ())
}

/// Parse a run of `'0'`/`'1'` characters, most significant first.
pub(crate) fn bits(tok: &str) -> Option<u16> {
    if tok.is_empty() || tok.len() > 16 || !tok.bytes().all(|b| b == b'0' || b == b'1') {
        return None;
    }
    Some(tok.bytes().fold(0u16, |acc, b| (acc << 1) | u16::from(b == b'1')))
}
