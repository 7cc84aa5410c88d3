//! STUN (RFC 8489, its predecessor RFC 5389, and "classic" RFC 3489): a basic server and a
//! Binding client.
//!
//! The server half is sans-IO and allocates nothing: hand [`serve`] one received message (a
//! UDP datagram, or one frame cut from a TCP stream with [`message_len`]) and the address it
//! came from; it writes the answer into a buffer of [`MAX_RESPONSE`] bytes, or says to drop the
//! message. It is the "basic server" of RFC 8489 §12: no credentials, no state, Binding only.
//! A request with the magic cookie gets XOR-MAPPED-ADDRESS and MAPPED-ADDRESS (both, so RFC 3489
//! clients and ALG detection work), SOFTWARE and FINGERPRINT; a request without it (an RFC 3489
//! client) gets MAPPED-ADDRESS and SOFTWARE (the SERVER attribute of RFC 3489-era servers).
//!
//! The client half ([`binding_request`], [`parse_binding_response`] and the blocking [`query`])
//! asks a server for a socket's reflexive address.

use anyhow::Context;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The magic cookie of RFC 5389 and later; its absence marks an RFC 3489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// The STUN port for UDP and TCP (RFC 8489 §18.6).
pub const DEFAULT_PORT: u16 = 3478;
/// Length of the message header.
pub const HEADER_LEN: usize = 20;
/// Length of the request [`binding_request`] writes: a header and FINGERPRINT.
pub const REQUEST_LEN: usize = HEADER_LEN + 8;
/// Largest response [`serve`] writes (size your buffers with it): a 420 error listing
/// [`MAX_UNKNOWN`] attributes, with the longest SOFTWARE.
pub const MAX_RESPONSE: usize =
    HEADER_LEN + (4 + 4 + 20) + (4 + 2 * MAX_UNKNOWN) + (4 + 764) + FINGERPRINT_LEN;
/// Most unknown attribute types a 420 response lists.
pub const MAX_UNKNOWN: usize = 16;

/// SOFTWARE is at most 763 bytes (RFC 8489 §14.14).
const MAX_SOFTWARE: usize = 763;
const FINGERPRINT_LEN: usize = 8;
/// RFC 8489 §14.7: the CRC-32 is XORed with this ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// First retransmission timeout of [`query`] (RFC 8489 §6.2.1 suggests 500 ms; a rendezvous
/// server is usually near).
const INITIAL_RTO: Duration = Duration::from_millis(250);

// The largest success response (both addresses IPv6) fits too.
const _: () = assert!(HEADER_LEN + 2 * (4 + 20) + (4 + 764) + FINGERPRINT_LEN <= MAX_RESPONSE);

/// Message types (method and class bits together, RFC 8489 §5).
mod kind {
    pub const BINDING_REQUEST: u16 = 0x0001;
    pub const BINDING_SUCCESS: u16 = 0x0101;
    pub const BINDING_ERROR: u16 = 0x0111;
    /// The two class bits; both zero in a request.
    pub const CLASS: u16 = 0x0110;
    pub const ERROR: u16 = 0x0110;
}

/// Attribute types (RFC 8489 §18.3, RFC 3489 §11.2, RFC 5780 §7, RFC 8445 §16.1).
mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    /// Types from here up are comprehension-optional: ignored when not understood.
    pub const OPTIONAL: u16 = 0x8000;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Bytes that cannot start a STUN message: close the TCP connection they arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not STUN: the first two bits are not zero or the length is not a multiple of 4")]
pub struct NotStun;

/// Why a Binding response gave no address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a well-formed STUN message (framing, attributes, FINGERPRINT or cookie).
    #[error("malformed STUN message: {0}")]
    Malformed(&'static str),
    /// A well-formed message of another type than a Binding response.
    #[error("not a Binding response (message type {0:#06x})")]
    NotBindingResponse(u16),
    /// A response to another transaction.
    #[error("a STUN answer to another transaction")]
    WrongTransaction,
    /// A Binding error response (RFC 8489 §14.8).
    #[error("the server answered with error {code} ({reason})")]
    Rejected {
        /// The error code, 300 to 699.
        code: u16,
        /// The reason phrase the server gave.
        reason: String,
    },
    /// A success response without an address.
    #[error("Binding response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS")]
    NoAddress,
}

/// For TCP framing: the total length of the first STUN message in `buf` (20 + the header's
/// length field) once the header is complete; `Ok(None)` means more bytes are needed.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, NotStun> {
    if buf.first().is_some_and(|b| b & 0xC0 != 0) {
        return Err(NotStun);
    }
    let Some(&[hi, lo]) = buf.get(2..4) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len % 4 != 0 {
        return Err(NotStun);
    }
    Ok((buf.len() >= HEADER_LEN).then_some(HEADER_LEN + len))
}

/// Answers one STUN message received from `source`: writes the response into `out` and
/// returns its length, or `None` when the message must be dropped silently (malformed, not a
/// request, a wrong FINGERPRINT, or `out` too small).
///
/// Comprehension-required attributes understood here, all ignored: USERNAME,
/// MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 (a basic server uses no credentials, RFC 8489
/// §12), PRIORITY and USE-CANDIDATE (sent by ICE agents), and a CHANGE-REQUEST with no flag
/// set (the first test of RFC 3489/5780 clients). Anything else, including a CHANGE-REQUEST
/// with a flag set (this server has no second address, RFC 5780 §6.1), gets error 420; an
/// unknown method gets error 400. Attributes after MESSAGE-INTEGRITY are ignored (§14.5).
pub fn serve(msg: &[u8], source: SocketAddr, software: &str, out: &mut [u8]) -> Option<usize> {
    let typ = check(msg).ok()?;
    if typ & kind::CLASS != 0 {
        return None;
    }
    let classic = !has_cookie(msg);
    let id: &[u8; 16] = msg.get(4..HEADER_LEN)?.try_into().ok()?;
    let software = software_bytes(software);
    if typ != kind::BINDING_REQUEST {
        if classic {
            return None;
        }
        return respond(id, typ | kind::ERROR, software, classic, out, |w| {
            error_code(w, 400, "Bad Request", classic)
        });
    }
    let unknown = unknown_attributes(msg);
    if unknown.n > 0 {
        return respond(id, kind::BINDING_ERROR, software, classic, out, |w| {
            error_code(w, 420, "Unknown Attribute", classic)?;
            unknown.emit(w, classic)
        });
    }
    let source = canonical(source);
    respond(id, kind::BINDING_SUCCESS, software, classic, out, |w| {
        if !classic {
            address(w, attr::XOR_MAPPED_ADDRESS, source, Some(id))?;
        }
        address(w, attr::MAPPED_ADDRESS, source, None)
    })
}

/// Writes a Binding request with transaction id `tid` and FINGERPRINT into `out`, and returns
/// its length, [`REQUEST_LEN`].
///
/// # Panics
/// If `out` is shorter than [`REQUEST_LEN`].
pub fn binding_request(tid: &[u8; 12], out: &mut [u8]) -> usize {
    assert!(out.len() >= REQUEST_LEN, "a Binding request needs {REQUEST_LEN} bytes");
    let mut id = [0; 16];
    id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    id[4..].copy_from_slice(tid);
    let mut w = Writer::header(out, kind::BINDING_REQUEST, &id).expect("room checked above");
    w.fingerprint().expect("room checked above");
    w.len
}

/// Parses a Binding success response to `tid`: its XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS when
/// there is no XOR one.
pub fn parse_binding_response(msg: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, StunError> {
    let typ = check(msg)?;
    if !has_cookie(msg) {
        return Err(StunError::Malformed("no magic cookie"));
    }
    if msg[8..HEADER_LEN] != tid[..] {
        return Err(StunError::WrongTransaction);
    }
    let key: &[u8; 16] = msg[4..HEADER_LEN].try_into().expect("16 bytes");
    let attrs = || attributes(msg).flatten().take_while(|a| !is_integrity(a.typ));
    match typ {
        kind::BINDING_SUCCESS => {
            let mut found = None;
            for a in attrs() {
                match a.typ {
                    attr::XOR_MAPPED_ADDRESS => return read_address(a.value, Some(key)),
                    attr::MAPPED_ADDRESS if found.is_none() => found = Some(a.value),
                    _ => {}
                }
            }
            read_address(found.ok_or(StunError::NoAddress)?, None)
        }
        kind::BINDING_ERROR => {
            let a = attrs().find(|a| a.typ == attr::ERROR_CODE);
            match a.map(|a| a.value) {
                Some([_, _, class, number, reason @ ..]) => Err(StunError::Rejected {
                    code: u16::from(class & 7) * 100 + u16::from(*number),
                    reason: String::from_utf8_lossy(reason).trim_end().to_owned(),
                }),
                _ => Err(StunError::Malformed("error response without ERROR-CODE")),
            }
        }
        other => Err(StunError::NotBindingResponse(other)),
    }
}

/// Asks `server` for this socket's reflexive address over UDP: retransmits (RFC 8489 §6.2.1,
/// RTO starting at 250 ms, doubling) until a matching response arrives or `timeout` passes.
/// Ignores datagrams from other addresses or with other transaction ids. `sock` must be in
/// blocking mode; its previous read timeout is restored before returning.
pub fn query(
    sock: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    let mut tid = [0; 12];
    getrandom::getrandom(&mut tid).context("cannot draw a random STUN transaction id")?;
    let mut request = [0; REQUEST_LEN];
    let len = binding_request(&tid, &mut request);
    let previous = sock.read_timeout().context("cannot read the UDP socket's read timeout")?;
    let answer = exchange(sock, server, &request[..len], &tid, timeout);
    let restored = sock.set_read_timeout(previous);
    let addr = answer?;
    restored.context("cannot restore the UDP socket's read timeout")?;
    Ok(addr)
}

fn exchange(
    sock: &UdpSocket,
    server: SocketAddr,
    request: &[u8],
    tid: &[u8; 12],
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    let server = canonical(server);
    let deadline = Instant::now() + timeout;
    let mut send_at = Instant::now();
    let mut rto = INITIAL_RTO;
    let mut unusable = None;
    let mut buf = [0; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            let last = unusable.map(|e| format!(" (the last answer was unusable: {e})"));
            anyhow::bail!(
                "no STUN answer from {server} within {timeout:?}{}; is `vipgate rendezvous` \
                 running there and UDP port {} open?",
                last.unwrap_or_default(),
                server.port()
            );
        }
        if now >= send_at {
            sock.send_to(request, server)
                .with_context(|| format!("cannot send a STUN Binding request to {server}"))?;
            log::debug!("STUN Binding request to {server}, next retransmission in {rto:?}");
            send_at = now + rto;
            rto *= 2;
        }
        let wait = send_at.min(deadline).saturating_duration_since(now);
        sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .context("cannot set the UDP socket's read timeout")?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot receive a STUN answer from {server}"))
            }
        };
        if canonical(from) != server {
            continue;
        }
        match parse_binding_response(&buf[..n], tid) {
            Ok(addr) => return Ok(addr),
            Err(StunError::WrongTransaction) => {}
            Err(e @ StunError::Rejected { .. }) => {
                anyhow::bail!("STUN server {server} refused the Binding request: {e}")
            }
            Err(e) => unusable = Some(e),
        }
    }
}

/// An IPv4-mapped IPv6 address (from a dual-stack socket) as the IPv4 address it stands for.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

fn has_cookie(msg: &[u8]) -> bool {
    msg.get(4..8) == Some(&MAGIC_COOKIE.to_be_bytes()[..])
}

fn is_integrity(typ: u16) -> bool {
    matches!(typ, attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256)
}

/// The FINGERPRINT value of a message whose bytes before the attribute are `prefix`.
fn fingerprint(prefix: &[u8]) -> u32 {
    crc32fast::hash(prefix) ^ FINGERPRINT_XOR
}

/// Checks the header (RFC 8489 §6.3) and the attribute framing, and a FINGERPRINT when the
/// message has the cookie (§14.7: correct and last); returns the message type.
fn check(msg: &[u8]) -> Result<u16, StunError> {
    if msg.len() < HEADER_LEN {
        return Err(StunError::Malformed("shorter than a STUN header"));
    }
    let typ = be16(msg, 0);
    if typ & 0xC000 != 0 {
        return Err(StunError::Malformed("first two bits not zero"));
    }
    let len = usize::from(be16(msg, 2));
    if len % 4 != 0 || len != msg.len() - HEADER_LEN {
        return Err(StunError::Malformed("length field disagrees with the message"));
    }
    let cookie = has_cookie(msg);
    for a in attributes(msg) {
        let a = a?;
        if cookie
            && a.typ == attr::FINGERPRINT
            && (a.end != msg.len() || a.value != fingerprint(&msg[..a.start]).to_be_bytes())
        {
            return Err(StunError::Malformed("FINGERPRINT wrong or not last"));
        }
    }
    Ok(typ)
}

/// One attribute, at `start..end` of its message (padding included).
struct Attr<'a> {
    typ: u16,
    value: &'a [u8],
    start: usize,
    end: usize,
}

/// The attributes of a message whose header is at least [`HEADER_LEN`] bytes; an error ends
/// the walk when one overruns the message.
fn attributes(msg: &[u8]) -> impl Iterator<Item = Result<Attr<'_>, StunError>> {
    let mut pos = HEADER_LEN;
    std::iter::from_fn(move || {
        if pos >= msg.len() {
            return None;
        }
        let start = pos;
        let attr = msg.get(start..start + 4).and_then(|head| {
            let len = usize::from(be16(head, 2));
            let end = start + 4 + padded(len);
            let value = msg.get(start + 4..start + 4 + len).filter(|_| end <= msg.len())?;
            Some(Attr { typ: be16(head, 0), value, start, end })
        });
        match attr {
            Some(a) => {
                pos = a.end;
                Some(Ok(a))
            }
            None => {
                pos = usize::MAX;
                Some(Err(StunError::Malformed("attribute overruns the message")))
            }
        }
    })
}

/// Comprehension-required attribute types a request carries that this server does not
/// understand, deduplicated, at most [`MAX_UNKNOWN`].
#[derive(Default)]
struct Unknown {
    types: [u16; MAX_UNKNOWN],
    n: usize,
}

impl Unknown {
    fn add(&mut self, typ: u16) {
        if self.n < MAX_UNKNOWN && !self.types[..self.n].contains(&typ) {
            self.types[self.n] = typ;
            self.n += 1;
        }
    }

    /// UNKNOWN-ATTRIBUTES (RFC 8489 §14.9). RFC 3489 §11.2.10 repeats one type when the count
    /// is odd, so that the value is a multiple of 4 bytes.
    fn emit(&self, w: &mut Writer, classic: bool) -> Option<()> {
        let count = if classic { self.n + self.n % 2 } else { self.n };
        let value = w.attr(attr::UNKNOWN_ATTRIBUTES, 2 * count)?;
        for (i, dst) in value.chunks_exact_mut(2).enumerate() {
            dst.copy_from_slice(&self.types[i.min(self.n - 1)].to_be_bytes());
        }
        Some(())
    }
}

/// Walks a checked request for attributes this server does not understand (see [`serve`]).
fn unknown_attributes(msg: &[u8]) -> Unknown {
    let mut unknown = Unknown::default();
    for a in attributes(msg).flatten() {
        match a.typ {
            t if is_integrity(t) => break,
            t if t >= attr::OPTIONAL => {}
            attr::USERNAME | attr::PRIORITY | attr::USE_CANDIDATE => {}
            attr::CHANGE_REQUEST if a.value == [0; 4] => {}
            t => unknown.add(t),
        }
    }
    unknown
}

/// `software` cut to [`MAX_SOFTWARE`] bytes on a character boundary.
fn software_bytes(software: &str) -> &[u8] {
    let mut end = software.len().min(MAX_SOFTWARE);
    while !software.is_char_boundary(end) {
        end -= 1;
    }
    &software.as_bytes()[..end]
}

/// Writes a response with header `typ` and `id` (cookie and transaction id, or the 128-bit
/// RFC 3489 id), the attributes `body` adds, SOFTWARE, and FINGERPRINT unless `classic`.
fn respond(
    id: &[u8; 16],
    typ: u16,
    software: &[u8],
    classic: bool,
    out: &mut [u8],
    body: impl FnOnce(&mut Writer) -> Option<()>,
) -> Option<usize> {
    let mut w = Writer::header(out, typ, id)?;
    body(&mut w)?;
    if !software.is_empty() {
        text(&mut w, attr::SOFTWARE, software, classic)?;
    }
    if classic {
        w.set_length(w.len - HEADER_LEN);
    } else {
        w.fingerprint()?;
    }
    Some(w.len)
}

/// ERROR-CODE (RFC 8489 §14.8): class, number, reason phrase.
fn error_code(w: &mut Writer, code: u16, reason: &str, classic: bool) -> Option<()> {
    let mut value = [0; 4 + 20];
    value[2] = (code / 100) as u8;
    value[3] = (code % 100) as u8;
    let reason = reason.as_bytes();
    value[4..4 + reason.len()].copy_from_slice(reason);
    text(w, attr::ERROR_CODE, &value[..4 + reason.len()], classic)
}

/// A text attribute; RFC 3489 (§11.2.9) wants lengths that are multiples of 4, so `classic`
/// pads with spaces inside the value.
fn text(w: &mut Writer, typ: u16, bytes: &[u8], classic: bool) -> Option<()> {
    let len = if classic { padded(bytes.len()) } else { bytes.len() };
    let value = w.attr(typ, len)?;
    value.fill(b' ');
    value[..bytes.len()].copy_from_slice(bytes);
    Some(())
}

/// (XOR-)MAPPED-ADDRESS (RFC 8489 §14.1, §14.2): with `key` (the cookie and transaction id),
/// the port is XORed with its first 2 bytes and the address with its first 4 or 16.
fn address(w: &mut Writer, typ: u16, addr: SocketAddr, key: Option<&[u8; 16]>) -> Option<()> {
    let mut ip = [0; 16];
    let (family, n) = match addr.ip() {
        IpAddr::V4(v4) => {
            ip[..4].copy_from_slice(&v4.octets());
            (1, 4)
        }
        IpAddr::V6(v6) => {
            ip = v6.octets();
            (2, 16)
        }
    };
    let mut port = addr.port().to_be_bytes();
    if let Some(key) = key {
        xor(&mut port, key);
        xor(&mut ip[..n], key);
    }
    let value = w.attr(typ, 4 + n)?;
    value[1] = family;
    value[2..4].copy_from_slice(&port);
    value[4..].copy_from_slice(&ip[..n]);
    Some(())
}

fn read_address(value: &[u8], key: Option<&[u8; 16]>) -> Result<SocketAddr, StunError> {
    let n = match (value.get(1), value.len()) {
        (Some(1), 8) => 4,
        (Some(2), 20) => 16,
        _ => return Err(StunError::Malformed("bad address family or length")),
    };
    let mut port = [value[2], value[3]];
    let mut ip = [0; 16];
    ip[..n].copy_from_slice(&value[4..]);
    if let Some(key) = key {
        xor(&mut port, key);
        xor(&mut ip[..n], key);
    }
    let ip = match ip {
        [a, b, c, d, ..] if n == 4 => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        _ => IpAddr::V6(Ipv6Addr::from(ip)),
    };
    Ok(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

fn xor(bytes: &mut [u8], key: &[u8]) {
    for (b, k) in bytes.iter_mut().zip(key) {
        *b ^= k;
    }
}

/// Appends a message to a caller's buffer; every write returns `None` when it does not fit.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    /// Starts a message with type `typ` and bytes 4..20 `id`; the length is set at the end.
    fn header(buf: &'a mut [u8], typ: u16, id: &[u8; 16]) -> Option<Writer<'a>> {
        let head = buf.get_mut(..HEADER_LEN)?;
        head[..2].copy_from_slice(&typ.to_be_bytes());
        head[2..4].fill(0);
        head[4..].copy_from_slice(id);
        Some(Writer { buf, len: HEADER_LEN })
    }

    /// Appends an attribute header and `len` value bytes, zero-padded to 4 (RFC 8489 §14),
    /// and returns the value to fill in.
    fn attr(&mut self, typ: u16, len: usize) -> Option<&mut [u8]> {
        let start = self.len + 4;
        let dst = self.buf.get_mut(self.len..start + padded(len))?;
        dst[..2].copy_from_slice(&typ.to_be_bytes());
        dst[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        dst[4..].fill(0);
        self.len = start + padded(len);
        Some(&mut self.buf[start..start + len])
    }

    fn set_length(&mut self, body: usize) {
        self.buf[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    }

    /// Appends FINGERPRINT over everything before it, the length field already counting it
    /// (RFC 8489 §14.7).
    fn fingerprint(&mut self) -> Option<()> {
        self.set_length(self.len + FINGERPRINT_LEN - HEADER_LEN);
        let crc = fingerprint(&self.buf[..self.len]);
        self.attr(attr::FINGERPRINT, 4)?.copy_from_slice(&crc.to_be_bytes());
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5769 §2.1: a request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
    /// MESSAGE-INTEGRITY and FINGERPRINT.
    static SAMPLE_REQUEST: [u8; 108] = [
        0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, // header
        0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73, 0x74, 0x20, 0x63,
        0x6c, 0x69, 0x65, 0x6e, 0x74, // SOFTWARE "STUN test client"
        0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff, // PRIORITY
        0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b,
        0x36, // ICE-CONTROLLED
        0x00, 0x06, 0x00, 0x09, 0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20,
        0x20, // USERNAME "evtj:h6vY"
        0x00, 0x08, 0x00, 0x14, 0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2,
        0xb5, 0xb2, 0xd3, 0xf2, 0x49, 0xc1, 0xb5, 0x71, 0xa2, // MESSAGE-INTEGRITY
        0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf, // FINGERPRINT
    ];

    /// RFC 5769 §2.2: the response reporting 192.0.2.1:32853.
    static RESPONSE_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, // header
        0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72,
        0x20, // SOFTWARE "test vector"
        0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, // XOR-MAPPED
        0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89,
        0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, // MESSAGE-INTEGRITY
        0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96, // FINGERPRINT
    ];

    /// RFC 5769 §2.3: the response reporting [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    static RESPONSE_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, // header
        0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72,
        0x20, // SOFTWARE "test vector"
        0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1,
        0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9, // XOR-MAPPED
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, // MESSAGE-INTEGRITY
        0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb, 0x0b, 0x4c, // FINGERPRINT
    ];

    const VECTOR_TID: [u8; 12] =
        [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
    const TID: [u8; 12] = *b"vipgate-tid!";
    const CLASSIC_ID: [u8; 16] = *b"rfc3489-classic!";
    const SOFTWARE: &str = "vipgate test";

    fn v4() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    /// A request of type `typ` with `attrs`, with the cookie and [`TID`] or the classic id.
    fn request(cookie: bool, typ: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = typ.to_be_bytes().to_vec();
        m.extend([0, 0]);
        if cookie {
            m.extend(MAGIC_COOKIE.to_be_bytes());
            m.extend(TID);
        } else {
            m.extend(CLASSIC_ID);
        }
        for (t, v) in attrs {
            m.extend(t.to_be_bytes());
            m.extend((v.len() as u16).to_be_bytes());
            m.extend(*v);
            m.resize(padded(m.len()), 0);
        }
        let len = (m.len() - HEADER_LEN) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        m
    }

    fn with_fingerprint(mut m: Vec<u8>) -> Vec<u8> {
        let len = (m.len() + 8 - HEADER_LEN) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = fingerprint(&m);
        m.extend([0x80, 0x28, 0, 4]);
        m.extend(crc.to_be_bytes());
        m
    }

    fn serve_vec(msg: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
        let mut out = [0; MAX_RESPONSE];
        serve(msg, source, SOFTWARE, &mut out).map(|n| out[..n].to_vec())
    }

    fn attrs_of(msg: &[u8]) -> Vec<(u16, Vec<u8>)> {
        attributes(msg).map(|a| a.map(|a| (a.typ, a.value.to_vec())).unwrap()).collect()
    }

    #[test]
    fn rfc5769_fingerprints_verify() {
        assert_eq!(fingerprint(&SAMPLE_REQUEST[..100]), 0xe57a_3bcf);
        assert_eq!(fingerprint(&RESPONSE_V4[..72]), 0xc07d_4c96);
        assert_eq!(fingerprint(&RESPONSE_V6[..84]), 0xc8fb_0b4c);
        for msg in [&SAMPLE_REQUEST[..], &RESPONSE_V4, &RESPONSE_V6] {
            assert!(check(msg).is_ok());
        }
    }

    #[test]
    fn rfc5769_responses_parse() {
        let v4 = parse_binding_response(&RESPONSE_V4, &VECTOR_TID).unwrap();
        assert_eq!(v4, "192.0.2.1:32853".parse().unwrap());
        let v6 = parse_binding_response(&RESPONSE_V6, &VECTOR_TID).unwrap();
        assert_eq!(v6, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap());
    }

    #[test]
    fn rfc5769_request_served_with_the_vectors_xor_mapped_address() {
        let v4 = serve_vec(&SAMPLE_REQUEST, "192.0.2.1:32853".parse().unwrap()).unwrap();
        assert_eq!(v4[..2], [0x01, 0x01]);
        assert_eq!(v4[4..20], SAMPLE_REQUEST[4..20]);
        assert_eq!(v4[20..32], RESPONSE_V4[36..48]);
        let source = "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap();
        let v6 = serve_vec(&SAMPLE_REQUEST, source).unwrap();
        assert_eq!(v6[20..44], RESPONSE_V6[36..60]);
    }

    /// Checks a success response to a cookie request from `source` attribute by attribute.
    fn assert_success(resp: &[u8], source: SocketAddr, family: u8) {
        assert_eq!(be16(resp, 0), kind::BINDING_SUCCESS);
        assert_eq!(usize::from(be16(resp, 2)), resp.len() - HEADER_LEN);
        assert_eq!(resp[4..8], MAGIC_COOKIE.to_be_bytes());
        assert_eq!(resp[8..20], TID);
        assert!(check(resp).is_ok(), "FINGERPRINT must verify");
        let attrs = attrs_of(resp);
        let types: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(types, [0x0020, 0x0001, 0x8022, 0x8028]);
        let key: &[u8; 16] = resp[4..20].try_into().unwrap();
        assert_eq!(read_address(&attrs[0].1, Some(key)), Ok(source));
        assert_eq!(read_address(&attrs[1].1, None), Ok(source));
        assert_eq!(attrs[0].1[1], family);
        assert_eq!(attrs[2].1, SOFTWARE.as_bytes());
        assert_eq!(parse_binding_response(resp, &TID), Ok(source));
    }

    #[test]
    fn cookie_request_gets_both_addresses_software_and_fingerprint() {
        let req = with_fingerprint(request(true, 1, &[]));
        assert_success(&serve_vec(&req, v4()).unwrap(), v4(), 1);
        let v6 = "[2001:db8::42]:5060".parse().unwrap();
        assert_success(&serve_vec(&req, v6).unwrap(), v6, 2);
        let mapped = "[::ffff:198.51.100.7]:40000".parse().unwrap();
        assert_success(&serve_vec(&req, mapped).unwrap(), v4(), 1);
    }

    #[test]
    fn classic_request_gets_mapped_address_only() {
        let resp = serve_vec(&request(false, 1, &[]), v4()).unwrap();
        assert_eq!(be16(&resp, 0), kind::BINDING_SUCCESS);
        assert_eq!(usize::from(be16(&resp, 2)), resp.len() - HEADER_LEN);
        assert_eq!(resp[4..20], CLASSIC_ID);
        let attrs = attrs_of(&resp);
        assert_eq!(attrs.len(), 2);
        assert_eq!((attrs[0].0, read_address(&attrs[0].1, None)), (0x0001, Ok(v4())));
        assert_eq!(attrs[1], (0x8022, b"vipgate test".to_vec()));
        let mut out = [0; 64];
        let n = serve(&request(false, 1, &[]), v4(), "abcde", &mut out).unwrap();
        assert_eq!(attrs_of(&out[..n])[1], (0x8022, b"abcde   ".to_vec()));
    }

    fn assert_420(resp: &[u8], listed: &[u16]) {
        assert_eq!(be16(resp, 0), kind::BINDING_ERROR);
        let attrs = attrs_of(resp);
        assert_eq!(attrs[0].0, attr::ERROR_CODE);
        assert_eq!(attrs[0].1[2..4], [4, 20]);
        assert_eq!(attrs[1].0, attr::UNKNOWN_ATTRIBUTES);
        let types: Vec<u16> = attrs[1].1.chunks(2).map(|c| be16(c, 0)).collect();
        assert_eq!(types, listed);
    }

    #[test]
    fn unknown_comprehension_required_attributes_get_420() {
        let req = with_fingerprint(request(true, 1, &[(0x0002, &[1; 4]), (0x7000, b"x")]));
        let resp = serve_vec(&req, v4()).unwrap();
        assert_420(&resp, &[0x0002, 0x7000]);
        assert!(check(&resp).is_ok());
        let rejected = StunError::Rejected { code: 420, reason: "Unknown Attribute".into() };
        assert_eq!(parse_binding_response(&resp, &TID), Err(rejected));
        // Only the first MAX_UNKNOWN are listed; the response stays within MAX_RESPONSE.
        let many: Vec<(u16, &[u8])> = (0x40..0x60).map(|t| (t, &[][..])).collect();
        let mut out = [0; MAX_RESPONSE];
        let n = serve(&request(true, 1, &many), v4(), &"é".repeat(500), &mut out).unwrap();
        assert_420(&out[..n], &(0x40..0x50).collect::<Vec<_>>());
        assert_eq!(attrs_of(&out[..n])[2].1.len(), 762, "SOFTWARE cut on a char boundary");
    }

    #[test]
    fn ignored_and_optional_attributes_get_success() {
        let ice: &[(u16, &[u8])] = &[
            (0x8055, b"optional"),
            (attr::USERNAME, b"a:b"),
            (attr::PRIORITY, &[0; 4]),
            (attr::USE_CANDIDATE, &[]),
            (0x802A, &[0; 8]),
            (attr::CHANGE_REQUEST, &[0; 4]),
            (attr::MESSAGE_INTEGRITY, &[0; 20]),
            (0x0002, b"after MESSAGE-INTEGRITY: ignored"),
        ];
        let resp = serve_vec(&with_fingerprint(request(true, 1, ice)), v4()).unwrap();
        assert_success(&resp, v4(), 1);
    }

    #[test]
    fn change_request_with_flags_gets_420() {
        for flags in [[0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 0, 6]] {
            let req = request(true, 1, &[(attr::CHANGE_REQUEST, &flags)]);
            assert_420(&serve_vec(&req, v4()).unwrap(), &[0x0003]);
        }
        let classic = request(false, 1, &[(attr::CHANGE_REQUEST, &[0, 0, 0, 6])]);
        let resp = serve_vec(&classic, v4()).unwrap();
        assert_420(&resp, &[0x0003, 0x0003]);
        assert_eq!(attrs_of(&resp)[0].1[4..], *b"Unknown Attribute   ");
        assert!(attrs_of(&resp).iter().all(|a| a.1.len() % 4 == 0 && a.0 != attr::FINGERPRINT));
        let classic_zero = request(false, 1, &[(attr::CHANGE_REQUEST, &[0; 4])]);
        assert_eq!(be16(&serve_vec(&classic_zero, v4()).unwrap(), 0), kind::BINDING_SUCCESS);
    }

    #[test]
    fn unknown_method_gets_400_with_cookie_and_nothing_without() {
        let resp = serve_vec(&request(true, 0x0003, &[]), v4()).unwrap();
        assert_eq!(be16(&resp, 0), 0x0113);
        let bad = StunError::Rejected { code: 400, reason: "Bad Request".into() };
        let mut binding = resp.clone();
        binding[..2].copy_from_slice(&[0x01, 0x11]);
        let binding = with_fingerprint(binding[..binding.len() - 8].to_vec());
        assert_eq!(parse_binding_response(&binding, &TID), Err(bad));
        assert_eq!(serve_vec(&request(false, 0x0003, &[]), v4()), None);
    }

    #[test]
    fn bad_messages_are_dropped() {
        let good = with_fingerprint(request(true, 1, &[(0x8055, b"abc")]));
        let mut bad_fingerprint = good.clone();
        *bad_fingerprint.last_mut().unwrap() ^= 1;
        let mut fingerprint_not_last = good.clone();
        fingerprint_not_last.extend([0x80, 0x55, 0, 0]);
        fingerprint_not_last[3] += 4;
        let mut top_bits = good.clone();
        top_bits[0] |= 0x40;
        let mut long_length = good.clone();
        long_length[3] += 4;
        let mut odd_length = good.clone();
        odd_length[3] -= 1;
        let mut overrun = request(true, 1, &[(0x8055, b"abcd")]);
        overrun[23] = 8;
        for (why, msg) in [
            ("bad FINGERPRINT", &bad_fingerprint[..]),
            ("FINGERPRINT not last", &fingerprint_not_last),
            ("truncated", &good[..19]),
            ("truncated attribute", &good[..good.len() - 4]),
            ("first bits", &top_bits),
            ("length too long", &long_length),
            ("length not a multiple of 4", &odd_length[..odd_length.len() - 1]),
            ("attribute overrun", &overrun),
            ("success response", &request(true, 0x0101, &[])),
            ("error response", &request(true, 0x0111, &[])),
            ("indication", &request(true, 0x0011, &[])),
            ("classic response", &request(false, 0x0101, &[])),
        ] {
            assert_eq!(serve_vec(msg, v4()), None, "{why}");
        }
        assert!(serve_vec(&good, v4()).is_some());
        assert_eq!(serve(&good, v4(), SOFTWARE, &mut [0; 40]), None, "out too small");
    }

    #[test]
    fn round_trip_and_client_errors() {
        let mut req = [0; REQUEST_LEN];
        let n = binding_request(&TID, &mut req);
        assert_eq!(n, REQUEST_LEN);
        assert_eq!(req[..], with_fingerprint(request(true, 1, &[]))[..]);
        for source in [v4(), "[2001:db8::1]:1".parse().unwrap()] {
            let resp = serve_vec(&req[..n], source).unwrap();
            assert_eq!(parse_binding_response(&resp, &TID), Ok(source));
            let other = *b"another tid!";
            assert_eq!(parse_binding_response(&resp, &other), Err(StunError::WrongTransaction));
        }
        let as_response = parse_binding_response(&req, &TID);
        assert_eq!(as_response, Err(StunError::NotBindingResponse(1)));
        let empty = request(true, 0x0101, &[]);
        assert_eq!(parse_binding_response(&empty, &TID), Err(StunError::NoAddress));
        let classic = serve_vec(&request(false, 1, &[]), v4()).unwrap();
        assert!(matches!(parse_binding_response(&classic, &TID), Err(StunError::Malformed(_))));
    }

    #[test]
    fn message_len_frames_tcp() {
        let req = with_fingerprint(request(true, 1, &[]));
        assert_eq!(message_len(&[]), Ok(None));
        assert_eq!(message_len(&req[..3]), Ok(None));
        assert_eq!(message_len(&req[..19]), Ok(None));
        assert_eq!(message_len(&req[..20]), Ok(Some(28)));
        assert_eq!(message_len(&[&req[..], &req[..]].concat()), Ok(Some(28)));
        assert_eq!(message_len(b"G"), Err(NotStun), "an HTTP request");
        assert_eq!(message_len(&[0, 1, 0, 6]), Err(NotStun));
    }

    /// A loopback server that answers the `n`th request only, after a stray answer with
    /// another transaction id.
    fn responder(answer_nth: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut buf, mut out) = ([0; 1500], [0; MAX_RESPONSE]);
            for i in 1..=answer_nth {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                if i == answer_nth {
                    let stray =
                        serve(&request(true, 1, &[]), "192.0.2.9:9".parse().unwrap(), "", &mut out);
                    sock.send_to(&out[..stray.unwrap()], from).unwrap();
                    let len = serve(&buf[..n], from, SOFTWARE, &mut out).unwrap();
                    sock.send_to(&out[..len], from).unwrap();
                }
            }
        });
        (addr, handle)
    }

    #[test]
    fn query_retransmits_until_answered_and_restores_the_timeout() {
        let (server, handle) = responder(2);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(7))).unwrap();
        let addr = query(&sock, server, Duration::from_secs(5)).unwrap();
        assert_eq!(addr, sock.local_addr().unwrap());
        assert_eq!(sock.read_timeout().unwrap(), Some(Duration::from_secs(7)));
        handle.join().unwrap();
    }

    #[test]
    fn query_times_out_with_an_actionable_message() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = silent.local_addr().unwrap();
        let err = query(&sock, server, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.starts_with(&format!("no STUN answer from {server} within 300ms")), "{err}");
        assert!(err.contains("vipgate rendezvous"), "{err}");
        assert_eq!(sock.read_timeout().unwrap(), None);
    }

    #[test]
    fn no_input_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds = [
            SAMPLE_REQUEST.to_vec(),
            RESPONSE_V4.to_vec(),
            RESPONSE_V6.to_vec(),
            request(false, 1, &[(attr::CHANGE_REQUEST, &[0, 0, 0, 6])]),
            with_fingerprint(request(true, 1, &[(0x0002, b"abc"), (0x8055, b"")])),
        ];
        let mut out = [0; MAX_RESPONSE];
        for i in 0..300_000 {
            let mut msg = seeds[i % seeds.len()].clone();
            match next() % 4 {
                0 => msg = (0..next() % 96).map(|_| next() as u8).collect(),
                1 => msg.truncate((next() as usize) % (msg.len() + 1)),
                _ => {
                    for _ in 0..1 + next() % 4 {
                        let at = (next() as usize) % msg.len();
                        msg[at] = next() as u8;
                    }
                }
            }
            if next() % 2 == 0 && msg.len() >= 4 {
                let len = msg.len().saturating_sub(HEADER_LEN) as u16;
                msg[2..4].copy_from_slice(&len.to_be_bytes());
            }
            let source = if i % 2 == 0 { v4() } else { "[2001:db8::1]:9".parse().unwrap() };
            let size = if i % 7 == 0 { (next() as usize) % MAX_RESPONSE } else { MAX_RESPONSE };
            if let Some(n) = serve(&msg, source, SOFTWARE, &mut out[..size]) {
                assert_eq!(message_len(&out[..n]), Ok(Some(n)));
            }
            let _ = parse_binding_response(&msg, &VECTOR_TID);
            let _ = parse_binding_response(&msg, &TID);
            let _ = message_len(&msg);
        }
    }
}
