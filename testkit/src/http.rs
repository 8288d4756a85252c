//! The one HTTP/1.1 request reader the tests' local servers share (the webhook receiver, the
//! LINE and voice API servers): a request line, headers, a body of `content-length` bytes.

use std::io::BufRead;

use anyhow::Result;

/// One request.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `POST`.
    pub method: String,
    /// `/v2/bot/message/push`.
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (at most 1 MiB is read).
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value (`name` lowercase), or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
    }
}

/// Read the next request on a kept-alive connection; `None` when the client closed it.
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(None);
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let mut r = Request { method, path, headers, body: Vec::new() };
    let length: usize = r.header("content-length").parse().unwrap_or(0);
    r.body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut r.body)?;
    Ok(Some(r))
}
