//! The rental authority's protocol: wire types, parsing, the permission rule, rate limiting,
//! and the blocking client the CLI uses.
//!
//! This is the part of the authority that touches no event loop: everything here is pure
//! (time is passed in, no clock reads, no sockets) except [`AuthorityClient`], the blocking
//! client of the `rent`/`renew`/`release`/`inquire` subcommands. `docs/protocol.md` is the
//! protocol's reference; in short:
//!
//! - **Transport**: TLS 1.3 over TCP, port [`DEFAULT_PORT`], ALPN `vipgate-authority/1` (see
//!   [`crate::tls`]).
//! - **Framing**: one JSON object per line, each at most [`MAX_LINE`] bytes before the `'\n'`.
//!   Every request carries an `id` (a JSON number or string) that its reply echoes.
//! - **Commands**: `rent` (a virtual address for a partner), `renew`, `release`, `inquire`
//!   (who is behind a virtual address).
//! - **Permission rule** (seed 000 claims 4–5, seed 001 claim 3): a host may rent only if the
//!   connection's source address is in a served LAN prefix ([`may_rent`]); only the lease's
//!   host may renew or release it; only the partner recorded for a lease, asking from that
//!   address, is told the real address ([`decide_inquiry`]). Every refusal is the same
//!   [`Reply::not_permitted`] bytes apart from the id, so it reveals nothing, not even whether
//!   the address is leased. Inquiries are rate-limited per source ([`RateLimiter`]).
//!
//! Listing, history, revocation and statistics are never served on this port: they live on
//! the local control socket only (seed 002, claim 2: the table is private to the box).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use ipnet::IpNet;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

/// Longest request or reply line accepted, in bytes, not counting the terminating `'\n'`.
pub const MAX_LINE: usize = 65536;

/// TCP port the authority listens on by default.
pub const DEFAULT_PORT: u16 = 7443;

/// Lease lifetime when a `rent` or `renew` request carries no `ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Longest `ttl` a request may ask for (7 days); longer asks are a `bad_request`.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The one message of every `not_permitted` reply.
pub const NOT_PERMITTED_MESSAGE: &str = "the request is not permitted";

/// Longest piece of client input quoted back in an error message, in characters.
const QUOTE_MAX: usize = 64;

// ---------------------------------------------------------------------------------------------
// Request and reply ids
// ---------------------------------------------------------------------------------------------

/// A request id, echoed verbatim in the reply.
///
/// Requests carry a JSON number or string. [`Id::Null`] appears only in replies to lines whose
/// id could not be read (not JSON, too long, no or bad `id`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    /// No usable id in the request.
    Null,
    /// A JSON number, kept exactly as parsed.
    Number(serde_json::Number),
    /// A JSON string.
    String(String),
}

impl From<u64> for Id {
    fn from(n: u64) -> Id {
        Id::Number(n.into())
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Id {
        Id::String(s.to_string())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Null => f.write_str("null"),
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{s:?}"),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Null => s.serialize_unit(),
            Id::Number(n) => n.serialize(s),
            Id::String(v) => s.serialize_str(v),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Rent a virtual address for talking to `partner`
    /// (`{"cmd":"rent","partner":"198.51.100.2","ttl":3600}`).
    Rent {
        /// Real address of the partner the host will talk to.
        partner: IpAddr,
        /// Requested lifetime; `None` means [`DEFAULT_TTL`].
        ttl: Option<Duration>,
    },
    /// Extend one of the caller's leases (`{"cmd":"renew","virtual":"198.18.0.7","ttl":3600}`).
    Renew {
        /// The leased virtual address.
        virtual_addr: IpAddr,
        /// New lifetime from now; `None` means [`DEFAULT_TTL`].
        ttl: Option<Duration>,
    },
    /// End one of the caller's leases (`{"cmd":"release","virtual":"198.18.0.7"}`).
    Release {
        /// The leased virtual address.
        virtual_addr: IpAddr,
    },
    /// Ask who is behind a virtual address
    /// (`{"cmd":"inquire","virtual":"198.18.0.7","at":"2026-11-22T01:00:00Z"}`).
    Inquire {
        /// The virtual address the asker saw.
        virtual_addr: IpAddr,
        /// When the asker saw it; `None` means now.
        at: Option<SystemTime>,
    },
}

impl Command {
    /// The wire name of the command (`"rent"`, `"renew"`, `"release"`, `"inquire"`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Rent { .. } => "rent",
            Command::Renew { .. } => "renew",
            Command::Release { .. } => "release",
            Command::Inquire { .. } => "inquire",
        }
    }
}

/// One request line: an id and a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the reply.
    pub id: Id,
    /// What is asked.
    pub command: Command,
}

impl Request {
    /// The request as one JSON line, terminated by `'\n'`.
    pub fn to_line(&self) -> Vec<u8> {
        to_json_line(self)
    }
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("cmd", self.command.name())?;
        match &self.command {
            Command::Rent { partner, ttl } => {
                map.serialize_entry("partner", &partner.to_string())?;
                if let Some(ttl) = ttl {
                    map.serialize_entry("ttl", &ttl.as_secs())?;
                }
            }
            Command::Renew { virtual_addr, ttl } => {
                map.serialize_entry("virtual", &virtual_addr.to_string())?;
                if let Some(ttl) = ttl {
                    map.serialize_entry("ttl", &ttl.as_secs())?;
                }
            }
            Command::Release { virtual_addr } => {
                map.serialize_entry("virtual", &virtual_addr.to_string())?;
            }
            Command::Inquire { virtual_addr, at } => {
                map.serialize_entry("virtual", &virtual_addr.to_string())?;
                if let Some(at) = at {
                    map.serialize_entry("at", &format_rfc3339(*at, true))?;
                }
            }
        }
        map.end()
    }
}

/// Parses one request line (with or without its trailing `"\n"` or `"\r\n"`).
///
/// On failure the error is the reply to send: `too_long` for a line over [`MAX_LINE`] bytes,
/// otherwise `bad_request` with a message naming what is wrong. The reply echoes the request's
/// id whenever it could be read.
pub fn parse_request(line: &[u8]) -> Result<Request, Reply> {
    let line = strip_newline(line);
    if line.len() > MAX_LINE {
        return Err(Reply::too_long());
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::bad_request(
            Id::Null,
            "the line is empty; send one JSON object per line",
        ));
    }
    let value: Value = crate::json::parse(line).map_err(|e| {
        Reply::bad_request(
            Id::Null,
            if e.is_data() {
                // The only data error of a plain value: a key given twice (see crate::json).
                format!("the request gives a field twice ({e}); give each field once")
            } else {
                format!("the line is not valid JSON ({e}); send one JSON object per line")
            },
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err(Reply::bad_request(
            Id::Null,
            format!(
                "a request must be a JSON object such as \
                 {{\"id\":1,\"cmd\":\"inquire\",\"virtual\":\"198.18.0.7\"}}, not {}",
                json_type(&value)
            ),
        ));
    };
    let id = match obj.remove("id") {
        None => {
            return Err(Reply::bad_request(
                Id::Null,
                "missing field `id` (a number or a string, echoed in the reply)",
            ))
        }
        Some(Value::Number(n)) => Id::Number(n),
        Some(Value::String(s)) => Id::String(s),
        Some(other) => {
            return Err(Reply::bad_request(
                Id::Null,
                format!("`id` must be a number or a string, not {}", json_type(&other)),
            ))
        }
    };
    let cmd = match obj.remove("cmd") {
        Some(Value::String(s)) => s,
        None => {
            return Err(Reply::bad_request(
                id,
                "missing field `cmd` (one of rent, renew, release, inquire)",
            ))
        }
        Some(other) => {
            return Err(Reply::bad_request(
                id,
                format!(
                    "`cmd` must be a string (one of rent, renew, release, inquire), not {}",
                    json_type(&other)
                ),
            ))
        }
    };
    let mut fields = Fields { obj, id };
    let command = match cmd.as_str() {
        "rent" => {
            fields.only("rent", &["partner", "ttl"])?;
            Command::Rent {
                partner: fields.address("partner", "the partner's real IP address")?,
                ttl: fields.ttl()?,
            }
        }
        "renew" => {
            fields.only("renew", &["virtual", "ttl"])?;
            Command::Renew {
                virtual_addr: fields.address("virtual", "the leased virtual IP address")?,
                ttl: fields.ttl()?,
            }
        }
        "release" => {
            fields.only("release", &["virtual"])?;
            Command::Release {
                virtual_addr: fields.address("virtual", "the leased virtual IP address")?,
            }
        }
        "inquire" => {
            fields.only("inquire", &["virtual", "at"])?;
            Command::Inquire {
                virtual_addr: fields.address("virtual", "the virtual IP address you saw")?,
                at: fields.at()?,
            }
        }
        other => {
            return Err(Reply::bad_request(
                fields.id,
                format!(
                    "unknown cmd {}; expected one of rent, renew, release, inquire",
                    quote(other)
                ),
            ))
        }
    };
    Ok(Request { id: fields.id, command })
}

/// The remaining fields of a request object being parsed, with its id for error replies.
struct Fields {
    obj: Map<String, Value>,
    id: Id,
}

impl Fields {
    fn bad(&self, message: String) -> Reply {
        Reply::bad_request(self.id.clone(), message)
    }

    /// Rejects fields other than `allowed` (typos would otherwise be silently ignored).
    fn only(&self, cmd: &str, allowed: &[&str]) -> Result<(), Reply> {
        match self.obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.bad(format!(
                "unknown field {} for cmd `{cmd}` (it takes id, cmd, {})",
                quote(k),
                allowed.join(", ")
            ))),
        }
    }

    /// A required unicast IP address field.
    fn address(&mut self, name: &str, what: &str) -> Result<IpAddr, Reply> {
        let text = match self.obj.remove(name) {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => {
                return Err(
                    self.bad(format!("missing field `{name}` ({what}, e.g. \"198.51.100.2\")"))
                )
            }
            Some(other) => {
                return Err(self.bad(format!(
                    "`{name}` must be a string holding an IP address, not {}",
                    json_type(&other)
                )))
            }
        };
        let addr: IpAddr = text.trim().parse().map_err(|_| {
            self.bad(format!("`{name}` is not an IPv4 or IPv6 address: {}", quote(&text)))
        })?;
        let addr = addr.to_canonical();
        if addr.is_unspecified()
            || addr.is_multicast()
            || addr == IpAddr::from([255, 255, 255, 255])
        {
            return Err(self.bad(format!("`{name}` must be a unicast address, not {addr}")));
        }
        Ok(addr)
    }

    /// The optional `ttl` field, whole seconds from 1 to [`MAX_TTL`].
    fn ttl(&mut self) -> Result<Option<Duration>, Reply> {
        let max = MAX_TTL.as_secs();
        match self.obj.remove("ttl") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(secs) if (1..=max).contains(&secs) => Ok(Some(Duration::from_secs(secs))),
                _ => Err(self.bad(format!(
                    "`ttl` must be a whole number of seconds from 1 to {max}, not {n}"
                ))),
            },
            Some(other) => Err(self.bad(format!(
                "`ttl` must be a whole number of seconds from 1 to {max}, not {}",
                json_type(&other)
            ))),
        }
    }

    /// The optional `at` field, an RFC 3339 time.
    fn at(&mut self) -> Result<Option<SystemTime>, Reply> {
        match self.obj.remove("at") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => parse_rfc3339(&s).map(Some).ok_or_else(|| {
                self.bad(format!(
                    "`at` is not an RFC 3339 time such as \"2026-11-22T01:00:00Z\": {}",
                    quote(&s)
                ))
            }),
            Some(other) => Err(self.bad(format!(
                "`at` must be a string holding an RFC 3339 time such as \
                 \"2026-11-22T01:00:00Z\", not {}",
                json_type(&other)
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// Error codes of a failed request (`"error"` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Refused by the permission rule. Every inquiry refusal (no such lease, another partner,
    /// not leased at that time) and every renew/release of a lease that is not the caller's
    /// gets the very same reply, [`Reply::not_permitted`].
    NotPermitted,
    /// The pool has no free address.
    NoAddress,
    /// The renter's address is not in a prefix this gateway serves.
    NotServed,
    /// The line is not a well-formed request; the message says what is wrong.
    BadRequest,
    /// The line is longer than [`MAX_LINE`] bytes.
    TooLong,
    /// Too many requests from this source.
    RateLimited,
    /// The authority failed (e.g. its store); the operator's log has the details.
    Internal,
}

impl ErrorCode {
    /// Every code, in documentation order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::NotPermitted,
        ErrorCode::NoAddress,
        ErrorCode::NotServed,
        ErrorCode::BadRequest,
        ErrorCode::TooLong,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
    ];

    /// The code's wire spelling, e.g. `"not_permitted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotPermitted => "not_permitted",
            ErrorCode::NoAddress => "no_address",
            ErrorCode::NotServed => "not_served",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLong => "too_long",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code with wire spelling `s`, if there is one.
    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a reply says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `rent` or `renew` succeeded: `{"ok":true,"virtual":…,"expires":…}`.
    Leased {
        /// The rented virtual address.
        virtual_addr: IpAddr,
        /// When the lease ends unless renewed (sent with whole-second precision).
        expires: SystemTime,
    },
    /// `release` succeeded: `{"ok":true}`.
    Released,
    /// `inquire` succeeded: `{"ok":true,"real":…}`.
    Real {
        /// Real address of the host behind the virtual address.
        real: IpAddr,
    },
    /// The request failed: `{"ok":false,"error":…,"message":…}`.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// One human-readable sentence.
        message: String,
    },
}

/// One reply line: the request's id and the outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The id of the request answered ([`Id::Null`] if it could not be read).
    pub id: Id,
    /// What the reply says.
    pub outcome: Outcome,
}

impl Reply {
    /// `rent`/`renew` success.
    pub fn leased(id: Id, virtual_addr: IpAddr, expires: SystemTime) -> Reply {
        Reply { id, outcome: Outcome::Leased { virtual_addr, expires } }
    }

    /// `release` success.
    pub fn released(id: Id) -> Reply {
        Reply { id, outcome: Outcome::Released }
    }

    /// `inquire` success.
    pub fn real(id: Id, real: IpAddr) -> Reply {
        Reply { id, outcome: Outcome::Real { real } }
    }

    /// A failure with any code and message.
    pub fn error(id: Id, code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply { id, outcome: Outcome::Error { code, message: message.into() } }
    }

    /// The one refusal: identical bytes, apart from the id, whatever the cause.
    pub fn not_permitted(id: Id) -> Reply {
        Reply::error(id, ErrorCode::NotPermitted, NOT_PERMITTED_MESSAGE)
    }

    /// The pool is exhausted.
    pub fn no_address(id: Id) -> Reply {
        Reply::error(
            id,
            ErrorCode::NoAddress,
            "no virtual address is free in the pool; release a lease or try again later",
        )
    }

    /// The renter (the connection's source address `source`) is not in a served prefix.
    pub fn not_served(id: Id, source: IpAddr) -> Reply {
        Reply::error(
            id,
            ErrorCode::NotServed,
            format!(
                "your address {} is not in a LAN prefix this gateway serves, so it cannot rent",
                source.to_canonical()
            ),
        )
    }

    /// A malformed request; `message` says what is wrong.
    pub fn bad_request(id: Id, message: impl Into<String>) -> Reply {
        Reply::error(id, ErrorCode::BadRequest, message)
    }

    /// A line over [`MAX_LINE`] bytes (its id is never read).
    pub fn too_long() -> Reply {
        Reply::error(
            Id::Null,
            ErrorCode::TooLong,
            format!("the request line is longer than {MAX_LINE} bytes"),
        )
    }

    /// The source sends too many requests.
    pub fn rate_limited(id: Id) -> Reply {
        Reply::error(
            id,
            ErrorCode::RateLimited,
            "too many requests from your address; wait a few seconds and retry",
        )
    }

    /// The authority failed; details go to the operator's log, never to the client.
    pub fn internal(id: Id) -> Reply {
        Reply::error(
            id,
            ErrorCode::Internal,
            "the authority could not handle the request; the gateway's log has the details",
        )
    }

    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        !matches!(self.outcome, Outcome::Error { .. })
    }

    /// The error code of a failed request.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self.outcome {
            Outcome::Error { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The reply as one JSON line, terminated by `'\n'`.
    pub fn to_line(&self) -> Vec<u8> {
        to_json_line(self)
    }

    /// Parses a reply line (the client side).
    pub fn parse(line: &[u8]) -> anyhow::Result<Reply> {
        let line = strip_newline(line);
        let value: Value = serde_json::from_slice(line).context("the reply is not JSON")?;
        let Value::Object(obj) = value else {
            bail!("the reply is not a JSON object");
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => Id::Null,
            Some(Value::Number(n)) => Id::Number(n.clone()),
            Some(Value::String(s)) => Id::String(s.clone()),
            Some(other) => bail!("the reply's `id` is {}", json_type(other)),
        };
        let str_field = |name: &str| -> anyhow::Result<&str> {
            obj.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the reply has no string field `{name}`"))
        };
        let addr_field = |name: &str| -> anyhow::Result<IpAddr> {
            let text = str_field(name)?;
            text.parse().map_err(|_| anyhow!("the reply's `{name}` is not an IP address: {text:?}"))
        };
        let outcome = match obj.get("ok").and_then(Value::as_bool) {
            None => bail!("the reply has no boolean field `ok`"),
            Some(true) if obj.contains_key("real") => Outcome::Real { real: addr_field("real")? },
            Some(true) if obj.contains_key("virtual") => {
                let text = str_field("expires")?;
                Outcome::Leased {
                    virtual_addr: addr_field("virtual")?,
                    expires: parse_rfc3339(text).ok_or_else(|| {
                        anyhow!("the reply's `expires` is not an RFC 3339 time: {text:?}")
                    })?,
                }
            }
            Some(true) => Outcome::Released,
            Some(false) => {
                let code = str_field("error")?;
                Outcome::Error {
                    code: ErrorCode::from_wire(code)
                        .ok_or_else(|| anyhow!("the reply has an unknown error code {code:?}"))?,
                    message: obj
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                }
            }
        };
        Ok(Reply { id, outcome })
    }
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("ok", &self.is_ok())?;
        match &self.outcome {
            Outcome::Leased { virtual_addr, expires } => {
                map.serialize_entry("virtual", &virtual_addr.to_string())?;
                map.serialize_entry("expires", &format_rfc3339(*expires, false))?;
            }
            Outcome::Released => {}
            Outcome::Real { real } => map.serialize_entry("real", &real.to_string())?,
            Outcome::Error { code, message } => {
                map.serialize_entry("error", code.as_str())?;
                map.serialize_entry("message", message)?;
            }
        }
        map.end()
    }
}

impl fmt::Display for Reply {
    /// Human-readable form for the CLI, e.g. `198.18.0.7 until 2026-11-22T02:00:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Leased { virtual_addr, expires } => {
                write!(f, "{virtual_addr} until {}", format_rfc3339(*expires, false))
            }
            Outcome::Released => f.write_str("released"),
            Outcome::Real { real } => write!(f, "{real}"),
            Outcome::Error { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The permission rule
// ---------------------------------------------------------------------------------------------

/// The address a connection comes from, as the permission rule compares it: an IPv4-mapped
/// IPv6 address (`::ffff:192.0.2.10`, seen on a dual-stack listener) becomes the IPv4 address.
pub fn peer_ip(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

/// Whether a connection from `source` may rent: its address must be in a served LAN prefix.
/// (Otherwise answer [`Reply::not_served`].)
pub fn may_rent(source: IpAddr, served: &[IpNet]) -> bool {
    let source = source.to_canonical();
    served.iter().any(|net| net.contains(&source))
}

/// Whether a connection from `source` may renew or release the lease of host `lease_real`:
/// only the host itself may. (Otherwise answer [`Reply::not_permitted`], exactly as for an
/// address that is not leased at all.)
pub fn may_manage(source: IpAddr, lease_real: IpAddr) -> bool {
    source.to_canonical() == lease_real.to_canonical()
}

/// One entry of the correspondence table (seed 000 claim 3), current or past, for one virtual
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Real address of the host the virtual address was rented to.
    pub real: IpAddr,
    /// Real address of the partner recorded for the lease.
    pub partner: IpAddr,
    /// When the lease began.
    pub start: SystemTime,
    /// When it ended (released or expired) or will expire; `None` while open-ended.
    pub end: Option<SystemTime>,
}

/// Why an inquiry is refused. For the operator's log and counters only: the client always gets
/// the same [`Reply::not_permitted`] (see [`inquiry_reply`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The virtual address has no lease record at all.
    NoSuchLease,
    /// It has records, none with the asker as partner.
    OtherPartner,
    /// The asker was a partner, but not at the time asked about (lease expired, not yet begun,
    /// or a time in the future).
    NotAtThatTime,
}

impl Refusal {
    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoSuchLease => "no_such_lease",
            Refusal::OtherPartner => "other_partner",
            Refusal::NotAtThatTime => "not_at_that_time",
        }
    }
}

/// The permission rule of an inquiry (seed 000 claims 4–5, seed 001 claim 3).
///
/// `asker` is the connection's source address, `at` the time asked about (`None`: `now`),
/// `records` the correspondence-table entries of the virtual address asked about. The real
/// address is told only if some record has `asker` as partner and covers `at` (start
/// inclusive, end exclusive); of several, the most recent one. A time after `now` is refused.
pub fn decide_inquiry<'a>(
    asker: IpAddr,
    at: Option<SystemTime>,
    now: SystemTime,
    records: impl IntoIterator<Item = &'a LeaseRecord>,
) -> Result<IpAddr, Refusal> {
    let asker = asker.to_canonical();
    let at = at.unwrap_or(now);
    let mut any = false;
    let mut partner = false;
    let mut best: Option<&LeaseRecord> = None;
    for record in records {
        any = true;
        if record.partner.to_canonical() != asker {
            continue;
        }
        partner = true;
        let covers = record.start <= at
            && match record.end {
                Some(end) => at < end,
                None => true,
            };
        let newer = match best {
            Some(b) => record.start > b.start,
            None => true,
        };
        if covers && at <= now && newer {
            best = Some(record);
        }
    }
    match best {
        Some(record) => Ok(record.real),
        None if partner => Err(Refusal::NotAtThatTime),
        None if any => Err(Refusal::OtherPartner),
        None => Err(Refusal::NoSuchLease),
    }
}

/// The reply to an inquiry decided by [`decide_inquiry`]: the real address, or the one
/// refusal whatever its cause.
pub fn inquiry_reply(id: Id, decision: Result<IpAddr, Refusal>) -> Reply {
    match decision {
        Ok(real) => Reply::real(id, real),
        Err(_) => Reply::not_permitted(id),
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limiting
// ---------------------------------------------------------------------------------------------

/// Per-source token-bucket rate limiter with bounded memory.
///
/// Each source may send `burst` requests back to back, then `rate_per_sec` per second
/// (implemented as GCRA: one instant per source, no floating point). IPv4 sources are limited
/// per address; IPv6 sources per /64, since one host commonly holds a whole /64.
///
/// At most `max_sources` sources are tracked. A new source beyond that evicts the least
/// recently seen one (which then starts afresh with a full bucket: the price of bounded
/// memory); sources whose bucket has refilled are dropped as the limiter is used, as
/// forgetting them changes nothing. Time is passed in; the limiter reads no clock.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time one token takes to refill.
    interval: Duration,
    /// How far a source's theoretical arrival time may run ahead of now: (burst − 1) tokens.
    tolerance: Duration,
    max_sources: usize,
    /// Source key → (theoretical arrival time, recency sequence number).
    sources: HashMap<IpAddr, (Instant, u64)>,
    /// Recency sequence number → source key; the first entry is the least recently seen.
    recency: BTreeMap<u64, IpAddr>,
    next_seq: u64,
}

impl RateLimiter {
    /// A limiter allowing `burst` requests at once and `rate_per_sec` per second per source,
    /// tracking at most `max_sources` sources. Zero arguments are taken as 1.
    pub fn new(rate_per_sec: u32, burst: u32, max_sources: usize) -> RateLimiter {
        let interval = Duration::from_secs(1) / rate_per_sec.max(1);
        RateLimiter {
            interval,
            tolerance: interval * (burst.max(1) - 1),
            max_sources: max_sources.max(1),
            sources: HashMap::new(),
            recency: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Whether a request from `src` at `now` is within its limit (and counts it if so).
    pub fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        self.allow_key(Self::source_key(src), now)
    }

    /// [`RateLimiter::allow`] for a key taken as it is (a host of the LAN by its own
    /// address, although an IPv6 /64 holds many of them).
    pub fn allow_key(&mut self, key: IpAddr, now: Instant) -> bool {
        let allowed = match self.sources.get(&key).copied() {
            Some((tat, seq)) => {
                self.recency.remove(&seq);
                let tat = tat.max(now);
                let allowed = tat.saturating_duration_since(now) <= self.tolerance;
                let tat = if allowed { tat.checked_add(self.interval).unwrap_or(tat) } else { tat };
                self.insert(key, tat);
                allowed
            }
            None => {
                while self.sources.len() >= self.max_sources {
                    self.evict_oldest();
                }
                self.insert(key, now.checked_add(self.interval).unwrap_or(now));
                true
            }
        };
        self.forget_idle(now, 2);
        allowed
    }

    /// Number of sources currently tracked (never more than `max_sources`).
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The key a source is limited under: its IPv4 address, or its IPv6 /64.
    pub fn source_key(src: IpAddr) -> IpAddr {
        match src.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
            v4 => v4,
        }
    }

    fn insert(&mut self, key: IpAddr, tat: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sources.insert(key, (tat, seq));
        self.recency.insert(seq, key);
    }

    fn evict_oldest(&mut self) {
        match self.recency.pop_first() {
            Some((_, key)) => {
                self.sources.remove(&key);
            }
            // Unreachable (both maps hold the same sources); never loop forever regardless.
            None => self.sources.clear(),
        }
    }

    /// Drops up to `max` least recently seen sources whose bucket is full again.
    fn forget_idle(&mut self, now: Instant, max: usize) {
        for _ in 0..max {
            let Some((&seq, &key)) = self.recency.first_key_value() else {
                return;
            };
            match self.sources.get(&key) {
                Some(&(tat, _)) if tat > now => return,
                _ => {
                    self.recency.remove(&seq);
                    self.sources.remove(&key);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Line framing
// ---------------------------------------------------------------------------------------------

/// One item cut from a connection's byte stream by [`LineFramer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `'\n'`; hand it to [`parse_request`].
    Line(Vec<u8>),
    /// A line grew past [`MAX_LINE`] bytes: answer [`Reply::too_long`] (the event loop may
    /// also close the connection). Its bytes were dropped up to its end.
    TooLong,
}

/// Cuts the decrypted byte stream of one connection into request lines, with bounded memory.
///
/// Feed it whatever the TLS session yields ([`feed`](Self::feed)), then take frames with
/// [`next_frame`](Self::next_frame) until it returns `None`. It never holds more than
/// [`MAX_LINE`] + 2 bytes plus the last fed chunk: an overlong line is reported once as
/// [`Frame::TooLong`] and the rest of it is skipped as it arrives.
#[derive(Debug, Default)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Bytes of `buf` known to hold no `'\n'`.
    scanned: usize,
    /// Skipping the rest of an overlong line.
    discarding: bool,
}

impl LineFramer {
    /// An empty framer.
    pub fn new() -> LineFramer {
        LineFramer::default()
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.discarding {
            match data.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.discarding = false;
                    data = &data[pos + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line or overlong-line report, if any.
    pub fn next_frame(&mut self) -> Option<Frame> {
        // A line may be MAX_LINE bytes plus "\r" before its "\n" (parse_request strips both).
        let limit = MAX_LINE + 1;
        let newline =
            self.buf[self.scanned..].iter().position(|&b| b == b'\n').map(|p| p + self.scanned);
        match newline {
            Some(pos) if pos <= limit => {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                self.scanned = 0;
                Some(Frame::Line(line))
            }
            Some(pos) => {
                self.buf.drain(..=pos);
                self.scanned = 0;
                Some(Frame::TooLong)
            }
            None if self.buf.len() > limit => {
                self.buf.clear();
                self.scanned = 0;
                self.discarding = true;
                Some(Frame::TooLong)
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Bytes buffered and not yet returned as a frame (a partial line).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

// ---------------------------------------------------------------------------------------------
// The blocking client
// ---------------------------------------------------------------------------------------------

/// A blocking client of the authority, for the CLI: one TLS connection, one request at a time.
#[derive(Debug)]
pub struct AuthorityClient {
    line: crate::tls::LineClient,
    next_id: u64,
}

/// How the authority's client names its server in errors.
pub const SERVICE: crate::tls::Service = crate::tls::Service {
    name: "authority",
    alpn: crate::tls::ALPN,
    running: "`vipgate gateway` running there with its authority enabled",
    cert_hint: "copy the gateway's certificate (<state-dir>/tls/cert.pem, or the one given to \
                it) here and pass it with --ca",
};

impl AuthorityClient {
    /// Connects to the authority at `addr` and completes the TLS 1.3 handshake, authenticating
    /// the server with the certificates of the PEM file `ca` (see [`crate::tls::client_config`];
    /// the TLS server name is the IP address of `addr`). `timeout` bounds the TCP connect, the
    /// handshake, and later each [`call`](Self::call).
    pub fn connect(addr: SocketAddr, ca: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let line = crate::tls::LineClient::connect(&SERVICE, addr, ca, timeout)?;
        Ok(AuthorityClient { line, next_id: 1 })
    }

    /// The authority's address.
    pub fn addr(&self) -> SocketAddr {
        self.line.addr()
    }

    /// Sends `command` with a fresh id and waits at most the connect timeout for its reply.
    ///
    /// An error reply of the authority is `Ok` (a [`Reply`] whose outcome is
    /// [`Outcome::Error`]); `Err` means no usable reply arrived.
    pub fn call(&mut self, command: &Command) -> anyhow::Result<Reply> {
        let id = Id::from(self.next_id);
        self.next_id += 1;
        let request = Request { id: id.clone(), command: command.clone() };
        let addr = self.addr();
        self.line.send(&request.to_line())?;
        let line = self.line.read_line(None)?.context("no reply")?;
        let reply = Reply::parse(&line)
            .with_context(|| format!("the authority at {addr} sent an unreadable reply"))?;
        if reply.id != id && reply.id != Id::Null {
            bail!(
                "the authority at {addr} answered request {id} with a reply to request {}",
                reply.id
            );
        }
        Ok(reply)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Serializes `value` as one JSON line. Serializing these types cannot fail; should it ever,
/// the line is an `internal` error reply rather than a panic.
fn to_json_line<T: Serialize>(value: &T) -> Vec<u8> {
    match serde_json::to_vec(value) {
        Ok(mut line) => {
            line.push(b'\n');
            line
        }
        Err(_) => br#"{"id":null,"ok":false,"error":"internal","message":"cannot encode the reply"}
"#
        .to_vec(),
    }
}

/// `line` without a trailing `"\n"` or `"\r\n"`.
fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The JSON type name of `v`, for error messages.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Client input quoted for an error message, shortened to [`QUOTE_MAX`] characters.
fn quote(s: &str) -> String {
    if s.chars().count() > QUOTE_MAX {
        let short: String = s.chars().take(QUOTE_MAX).collect();
        format!("{short:?}…")
    } else {
        format!("{s:?}")
    }
}

/// Parses an RFC 3339 time (any offset, any fraction); times before 1970 are refused.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, t.nanosecond()))
}

/// Formats `t` as RFC 3339 in UTC (`2026-11-22T02:00:00Z`), with nanoseconds if `fraction` and
/// they are not zero. Times before 1970 or after 9999 are clamped to those years.
pub fn format_rfc3339(t: SystemTime, fraction: bool) -> String {
    const MAX_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, nanos) = if since.as_secs() > MAX_SECS {
        (MAX_SECS, 0)
    } else {
        (since.as_secs(), since.subsec_nanos())
    };
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if fraction && nanos != 0 {
        out.push_str(&format!(".{nanos:09}"));
    }
    out.push('Z');
    out
}

/// Proleptic Gregorian (year, month, day) of `days` after 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::TempDir;
    use rustls::ServerConnection;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::thread;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Parses `line`, expecting success.
    fn ok(line: &[u8]) -> Request {
        parse_request(line).unwrap_or_else(|r| {
            panic!(
                "{} was refused: {}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(&r.to_line())
            )
        })
    }

    /// Parses `line`, expecting a `bad_request` whose message contains `needle`; returns it.
    fn bad(line: &[u8], needle: &str) -> Reply {
        let reply = match parse_request(line) {
            Ok(r) => panic!("{} was accepted as {r:?}", String::from_utf8_lossy(line)),
            Err(reply) => reply,
        };
        assert_eq!(reply.error_code(), Some(ErrorCode::BadRequest), "{reply:?}");
        let Outcome::Error { message, .. } = &reply.outcome else { unreachable!() };
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert!(!message.contains('\n'), "one line: {message:?}");
        reply
    }

    #[test]
    fn every_request_kind_parses() {
        assert_eq!(
            ok(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":3600}"#),
            Request {
                id: Id::from(1),
                command: Command::Rent {
                    partner: ip("198.51.100.2"),
                    ttl: Some(Duration::from_secs(3600))
                }
            }
        );
        assert_eq!(
            ok(b"{\"id\":1,\"cmd\":\"rent\",\"partner\":\"2001:db8::2\"}\n").command,
            Command::Rent { partner: ip("2001:db8::2"), ttl: None }
        );
        assert_eq!(
            ok(br#"{"id":2,"cmd":"renew","virtual":"198.18.0.7","ttl":3600}"#).command,
            Command::Renew { virtual_addr: ip("198.18.0.7"), ttl: Some(Duration::from_secs(3600)) }
        );
        assert_eq!(
            ok(b"{\"id\":3,\"cmd\":\"release\",\"virtual\":\"198.18.0.7\"}\r\n").command,
            Command::Release { virtual_addr: ip("198.18.0.7") }
        );
        assert_eq!(
            ok(br#"{"id":4,"cmd":"inquire","virtual":"198.18.0.7","at":"2026-11-22T01:00:00Z"}"#)
                .command,
            Command::Inquire { virtual_addr: ip("198.18.0.7"), at: Some(at(1_795_309_200)) }
        );
        // An offset and a fraction are RFC 3339 too.
        assert_eq!(
            ok(br#"{"id":4,"cmd":"inquire","virtual":"198.18.0.7","at":"2026-11-22T10:00:00.5+09:00"}"#)
                .command,
            Command::Inquire {
                virtual_addr: ip("198.18.0.7"),
                at: Some(at(1_795_309_200) + Duration::from_millis(500))
            }
        );
        assert_eq!(
            ok(br#"{"id":5,"cmd":"inquire","virtual":"198.18.0.7"}"#).command,
            Command::Inquire { virtual_addr: ip("198.18.0.7"), at: None }
        );
        // Field order and null optional fields do not matter; mapped IPv4 becomes IPv4.
        assert_eq!(
            ok(br#"{"ttl":null,"partner":"::ffff:198.51.100.2","cmd":"rent","id":6}"#).command,
            Command::Rent { partner: ip("198.51.100.2"), ttl: None }
        );
    }

    #[test]
    fn requests_round_trip_through_to_line() {
        let commands = [
            Command::Rent { partner: ip("198.51.100.2"), ttl: Some(Duration::from_secs(60)) },
            Command::Rent { partner: ip("2001:db8::2"), ttl: None },
            Command::Renew { virtual_addr: ip("198.18.0.7"), ttl: None },
            Command::Release { virtual_addr: ip("2001:db8:ff::7") },
            Command::Inquire {
                virtual_addr: ip("198.18.0.7"),
                at: Some(at(1_795_309_200) + Duration::from_nanos(1)),
            },
        ];
        for (n, command) in commands.into_iter().enumerate() {
            let request = Request { id: Id::from(n as u64), command };
            let line = request.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(ok(&line), request);
        }
        assert_eq!(
            Request {
                id: Id::from(1),
                command: Command::Rent {
                    partner: ip("198.51.100.2"),
                    ttl: Some(Duration::from_secs(3600))
                }
            }
            .to_line(),
            b"{\"id\":1,\"cmd\":\"rent\",\"partner\":\"198.51.100.2\",\"ttl\":3600}\n"
        );
    }

    #[test]
    fn ids_are_echoed() {
        let req = ok(br#"{"id":"abc-1","cmd":"release","virtual":"198.18.0.7"}"#);
        assert_eq!(req.id, Id::from("abc-1"));
        assert_eq!(Reply::released(req.id).to_line(), b"{\"id\":\"abc-1\",\"ok\":true}\n");
        let req = ok(br#"{"id":18446744073709551615,"cmd":"release","virtual":"198.18.0.7"}"#);
        assert_eq!(
            Reply::released(req.id).to_line(),
            b"{\"id\":18446744073709551615,\"ok\":true}\n"
        );
        let req = ok(br#"{"id":-2.5,"cmd":"release","virtual":"198.18.0.7"}"#);
        assert_eq!(Reply::released(req.id).to_line(), b"{\"id\":-2.5,\"ok\":true}\n");
        // Errors after the id is read echo it too.
        let reply = bad(br#"{"id":"x","cmd":"dance"}"#, "unknown cmd");
        assert_eq!(reply.id, Id::from("x"));
        let reply = bad(br#"{"id":7,"cmd":"rent","partner":"nope"}"#, "partner");
        assert_eq!(reply.id, Id::from(7));
    }

    #[test]
    fn reply_lines_are_exact() {
        let expires = at(1_795_312_800);
        assert_eq!(
            Reply::leased(Id::from(1), ip("198.18.0.7"), expires).to_line(),
            b"{\"id\":1,\"ok\":true,\"virtual\":\"198.18.0.7\",\"expires\":\"2026-11-22T02:00:00Z\"}\n"
        );
        // Sub-second precision is not sent.
        assert_eq!(
            Reply::leased(Id::from(1), ip("198.18.0.7"), expires + Duration::from_millis(999))
                .to_line(),
            Reply::leased(Id::from(1), ip("198.18.0.7"), expires).to_line()
        );
        assert_eq!(
            Reply::real(Id::from(4), ip("192.0.2.10")).to_line(),
            b"{\"id\":4,\"ok\":true,\"real\":\"192.0.2.10\"}\n"
        );
        assert_eq!(
            Reply::not_permitted(Id::from(4)).to_line(),
            b"{\"id\":4,\"ok\":false,\"error\":\"not_permitted\",\"message\":\"the request is not permitted\"}\n"
        );
        for reply in [
            Reply::leased(Id::from(1), ip("2001:db8:ff::7"), expires),
            Reply::released(Id::from("r")),
            Reply::real(Id::from(4), ip("192.0.2.10")),
            Reply::not_permitted(Id::from(5)),
            Reply::no_address(Id::from(6)),
            Reply::not_served(Id::from(7), ip("203.0.113.9")),
            Reply::bad_request(Id::Null, "missing field `id`"),
            Reply::too_long(),
            Reply::rate_limited(Id::from(8)),
            Reply::internal(Id::from(9)),
        ] {
            let line = reply.to_line();
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(Reply::parse(&line).expect("parse"), reply);
        }
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339(UNIX_EPOCH, true), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(at(951_868_799), false), "2000-02-29T23:59:59Z");
        assert_eq!(format_rfc3339(at(253_402_300_799), false), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(at(253_402_300_800 + 1_000_000), false), "9999-12-31T23:59:59Z");
        assert_eq!(
            format_rfc3339(at(1_795_312_800) + Duration::from_nanos(42), true),
            "2026-11-22T02:00:00.000000042Z"
        );
        // Every day of 400 years formats to what `time` parses back.
        for day in (0..146_097u64).step_by(7) {
            let t = at(day * 86_400 + 3_723);
            assert_eq!(parse_rfc3339(&format_rfc3339(t, false)), Some(t));
        }
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), None);
        assert_eq!(parse_rfc3339("2026-11-22 01:00"), None);
    }

    #[test]
    fn malformed_lines_are_bad_requests() {
        let r = bad(b"hello\n", "not valid JSON");
        assert_eq!(r.id, Id::Null);
        bad(b"\n", "empty");
        bad(b"", "empty");
        bad(b"{\"id\":1,", "not valid JSON");
        bad(b"\xff\xfe{}", "not valid JSON");
        bad(b"[1,2]", "JSON object");
        bad(&[b'['; 10_000], "not valid JSON"); // nesting is bounded, no stack overflow
        bad(b"42", "JSON object");
        // Not taken last-wins: the request means two things, so it means nothing.
        let r = bad(br#"{"id":1,"cmd":"bogus","cmd":"inquire","virtual":"198.18.0.7"}"#, "twice");
        assert_eq!(r.id, Id::Null);
        bad(br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","id":2}"#, "duplicate key `id`");
        bad(
            br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","partner":"198.51.100.3"}"#,
            "`partner`",
        );
        bad(br#"{"cmd":"rent","partner":"198.51.100.2"}"#, "missing field `id`");
        bad(br#"{"id":null,"cmd":"rent"}"#, "`id` must be a number or a string");
        bad(br#"{"id":[1],"cmd":"rent"}"#, "not an array");
        bad(br#"{"id":1}"#, "missing field `cmd`");
        bad(br#"{"id":1,"cmd":7}"#, "`cmd` must be a string");
        bad(br#"{"id":1,"cmd":"list"}"#, "unknown cmd \"list\"");
        bad(br#"{"id":1,"cmd":"rent"}"#, "missing field `partner`");
        bad(
            br#"{"id":1,"cmd":"rent","partner":"198.51.100.300"}"#,
            "`partner` is not an IPv4 or IPv6 address",
        );
        bad(br#"{"id":1,"cmd":"rent","partner":3325256706}"#, "`partner` must be a string");
        bad(br#"{"id":1,"cmd":"rent","partner":"0.0.0.0"}"#, "unicast");
        bad(br#"{"id":1,"cmd":"rent","partner":"ff02::1"}"#, "unicast");
        bad(br#"{"id":1,"cmd":"rent","partner":"255.255.255.255"}"#, "unicast");
        bad(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":0}"#, "`ttl` must be");
        bad(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":-5}"#, "`ttl` must be");
        bad(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":1.5}"#, "whole number");
        bad(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":"60"}"#, "not a string");
        bad(br#"{"id":1,"cmd":"rent","partner":"198.51.100.2","ttl":604801}"#, "604800");
        bad(
            br#"{"id":1,"cmd":"rent","partenr":"198.51.100.2"}"#,
            "unknown field \"partenr\" for cmd `rent`",
        );
        bad(br#"{"id":1,"cmd":"release","virtual":"198.18.0.7","ttl":5}"#, "unknown field \"ttl\"");
        bad(br#"{"id":1,"cmd":"renew"}"#, "missing field `virtual`");
        bad(br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","at":"yesterday"}"#, "RFC 3339");
        bad(br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","at":1795309200}"#, "RFC 3339");
        // Quoted input is kept short.
        let long = format!(r#"{{"id":1,"cmd":"{}"}}"#, "x".repeat(1000));
        let r = bad(long.as_bytes(), "unknown cmd");
        assert!(r.to_line().len() < 300);
    }

    #[test]
    fn overlong_lines_are_too_long() {
        let mut line = br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7","x":""#.to_vec();
        line.resize(MAX_LINE + 1, b' ');
        let reply = parse_request(&line).expect_err("too long");
        assert_eq!(reply, Reply::too_long());
        assert_eq!(reply.error_code(), Some(ErrorCode::TooLong));
        // Exactly MAX_LINE bytes (plus the newline) is still parsed.
        let mut line = br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7"}"#.to_vec();
        line.resize(MAX_LINE, b' ');
        line.push(b'\n');
        ok(&line);
    }

    #[test]
    fn framer_cuts_lines_across_chunks() {
        let mut f = LineFramer::new();
        f.feed(b"{\"id\":1,\"cmd\":");
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.buffered(), 14);
        f.feed(b"\"release\",\"virtual\":\"198.18.0.7\"}\r\n{\"id\":2");
        let Some(Frame::Line(line)) = f.next_frame() else { panic!("expected a line") };
        assert_eq!(ok(&line).id, Id::from(1));
        assert_eq!(f.next_frame(), None);
        f.feed(b"}\n\n");
        assert_eq!(f.next_frame(), Some(Frame::Line(b"{\"id\":2}".to_vec())));
        assert_eq!(f.next_frame(), Some(Frame::Line(Vec::new())));
        assert_eq!(f.next_frame(), None);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn framer_reports_overlong_lines_once_with_bounded_memory() {
        let mut f = LineFramer::new();
        let chunk = vec![b'x'; 16 * 1024];
        let mut reports = 0;
        for _ in 0..64 {
            // 1 MiB without a newline
            f.feed(&chunk);
            while let Some(frame) = f.next_frame() {
                assert_eq!(frame, Frame::TooLong);
                reports += 1;
            }
            assert!(f.buffered() <= MAX_LINE + 2 + chunk.len());
        }
        assert_eq!(reports, 1);
        // The rest of the overlong line is skipped; the next line is intact.
        f.feed(b"xxxx\n{\"id\":9}\n");
        assert_eq!(f.next_frame(), Some(Frame::Line(b"{\"id\":9}".to_vec())));
        assert_eq!(f.next_frame(), None);
        // An overlong line arriving in one piece with its newline.
        let mut big = vec![b' '; MAX_LINE + 2];
        big.extend_from_slice(b"\nnext\n");
        f.feed(&big);
        assert_eq!(f.next_frame(), Some(Frame::TooLong));
        assert_eq!(f.next_frame(), Some(Frame::Line(b"next".to_vec())));
        // Exactly MAX_LINE bytes plus "\r\n" is a line, and parses.
        let mut edge = br#"{"id":1,"cmd":"inquire","virtual":"198.18.0.7"}"#.to_vec();
        edge.resize(MAX_LINE, b' ');
        edge.extend_from_slice(b"\r\n");
        f.feed(&edge);
        let Some(Frame::Line(line)) = f.next_frame() else { panic!("expected a line") };
        ok(&line);
    }

    #[test]
    fn error_codes_are_spelled_as_documented() {
        let spelled: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            spelled,
            [
                "not_permitted",
                "no_address",
                "not_served",
                "bad_request",
                "too_long",
                "rate_limited",
                "internal"
            ]
        );
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("nope"), None);
    }

    /// The table of one virtual address: host 192.0.2.10 leased it for partner 198.51.100.2
    /// during [1000, 2000), host 192.0.2.11 holds it for partner 203.0.113.5 since 1500.
    fn table() -> Vec<LeaseRecord> {
        vec![
            LeaseRecord {
                real: ip("192.0.2.10"),
                partner: ip("198.51.100.2"),
                start: at(1000),
                end: Some(at(2000)),
            },
            LeaseRecord {
                real: ip("192.0.2.11"),
                partner: ip("203.0.113.5"),
                start: at(1500),
                end: None,
            },
        ]
    }

    #[test]
    fn only_the_recorded_partner_is_told() {
        let t = table();
        let now = at(3000);
        assert_eq!(
            decide_inquiry(ip("198.51.100.2"), Some(at(1000)), now, &t),
            Ok(ip("192.0.2.10"))
        );
        assert_eq!(
            decide_inquiry(ip("::ffff:198.51.100.2"), Some(at(1999)), now, &t),
            Ok(ip("192.0.2.10"))
        );
        assert_eq!(decide_inquiry(ip("203.0.113.5"), None, now, &t), Ok(ip("192.0.2.11")));
        assert_eq!(
            decide_inquiry(ip("198.51.100.2"), None, now, &t),
            Err(Refusal::NotAtThatTime),
            "expired"
        );
        assert_eq!(
            decide_inquiry(ip("198.51.100.2"), Some(at(999)), now, &t),
            Err(Refusal::NotAtThatTime),
            "before the lease"
        );
        assert_eq!(
            decide_inquiry(ip("203.0.113.5"), Some(at(3001)), now, &t),
            Err(Refusal::NotAtThatTime),
            "the future"
        );
        assert_eq!(decide_inquiry(ip("198.51.100.99"), None, now, &t), Err(Refusal::OtherPartner));
        assert_eq!(
            decide_inquiry(ip("192.0.2.10"), None, now, &t),
            Err(Refusal::OtherPartner),
            "the host itself is not a partner"
        );
        assert_eq!(decide_inquiry(ip("198.51.100.2"), None, now, &[]), Err(Refusal::NoSuchLease));
    }

    #[test]
    fn every_inquiry_refusal_is_the_same_bytes() {
        let t = table();
        let now = at(3000);
        let cases = [
            decide_inquiry(ip("198.51.100.2"), None, now, &[]),
            decide_inquiry(ip("198.51.100.99"), None, now, &t),
            decide_inquiry(ip("198.51.100.2"), None, now, &t),
            decide_inquiry(ip("198.51.100.2"), Some(at(10)), now, &t),
        ];
        let causes: Vec<_> = cases.iter().map(|c| c.expect_err("refused")).collect();
        assert_eq!(
            causes,
            [
                Refusal::NoSuchLease,
                Refusal::OtherPartner,
                Refusal::NotAtThatTime,
                Refusal::NotAtThatTime
            ]
        );
        let lines: Vec<Vec<u8>> =
            cases.into_iter().map(|d| inquiry_reply(Id::from(4), d).to_line()).collect();
        for line in &lines {
            assert_eq!(line, &lines[0]);
        }
        // A refused renew or release is the same reply too, and only the id differs.
        assert_eq!(Reply::not_permitted(Id::from(4)).to_line(), lines[0]);
        let with_string_id = String::from_utf8(Reply::not_permitted(Id::from("q")).to_line())
            .expect("utf-8")
            .replace("\"q\"", "4");
        assert_eq!(with_string_id.into_bytes(), lines[0]);
        // Bad requests about an inquiry never depend on the table: they are decided before it.
        assert_eq!(
            inquiry_reply(Id::from(4), Ok(ip("192.0.2.10"))),
            Reply::real(Id::from(4), ip("192.0.2.10"))
        );
    }

    #[test]
    fn rent_and_manage_permissions() {
        let served: Vec<IpNet> =
            vec!["192.0.2.0/24".parse().expect("net"), "2001:db8:1::/64".parse().expect("net")];
        assert!(may_rent(ip("192.0.2.10"), &served));
        assert!(may_rent(ip("::ffff:192.0.2.10"), &served));
        assert!(may_rent(ip("2001:db8:1::10"), &served));
        assert!(!may_rent(ip("198.51.100.2"), &served));
        assert!(!may_rent(ip("2001:db8:2::10"), &served));
        assert!(may_manage(ip("::ffff:192.0.2.10"), ip("192.0.2.10")));
        assert!(!may_manage(ip("192.0.2.11"), ip("192.0.2.10")));
        assert_eq!(
            peer_ip("[::ffff:192.0.2.10]:5000".parse().expect("sockaddr")),
            ip("192.0.2.10")
        );
    }

    #[test]
    fn rate_limiter_burst_then_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2, 3, 16);
        let a = ip("198.51.100.2");
        let b = ip("198.51.100.3");
        assert!(rl.allow(a, t0));
        assert!(rl.allow(a, t0));
        assert!(rl.allow(a, t0));
        assert!(!rl.allow(a, t0), "burst of 3 spent");
        assert!(!rl.allow(a, t0 + Duration::from_millis(400)));
        assert!(rl.allow(b, t0), "other sources are not affected");
        // One token every 500 ms.
        assert!(rl.allow(a, t0 + Duration::from_millis(500)));
        assert!(!rl.allow(a, t0 + Duration::from_millis(600)));
        assert!(rl.allow(a, t0 + Duration::from_millis(1000)));
        assert!(!rl.allow(a, t0 + Duration::from_millis(1000)));
        // Sustained: over 10 s at 100 tries per second, about 2 per second get through.
        let mut passed = 0;
        for i in 0..1000u64 {
            if rl.allow(a, t0 + Duration::from_millis(1000 + i * 10)) {
                passed += 1;
            }
        }
        assert!((19..=22).contains(&passed), "{passed}");
        // After a long pause the full burst is back.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| rl.allow(a, later)));
        assert!(!rl.allow(a, later));
    }

    #[test]
    fn rate_limiter_groups_ipv6_by_64() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 2, 16);
        assert!(rl.allow(ip("2001:db8:1::1"), t0));
        assert!(rl.allow(ip("2001:db8:1::2"), t0));
        assert!(!rl.allow(ip("2001:db8:1:0:ffff::3"), t0), "same /64");
        assert!(rl.allow(ip("2001:db8:1:1::1"), t0), "another /64");
        assert!(rl.allow(ip("::ffff:192.0.2.1"), t0));
        assert!(rl.allow(ip("192.0.2.1"), t0));
        assert!(!rl.allow(ip("192.0.2.1"), t0), "mapped IPv4 is the IPv4 address");
    }

    #[test]
    fn rate_limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 1, 100);
        // 10 000 distinct sources within one second: never more than 100 tracked.
        for i in 0..10_000u32 {
            let src = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + i)); // 198.18.x.y
            rl.allow(src, t0 + Duration::from_micros(u64::from(i)));
            assert!(rl.len() <= 100);
        }
        assert_eq!(rl.len(), 100);
        // The most recent sources are still limited; the oldest were evicted.
        let last = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000 + 9_999));
        assert!(!rl.allow(last, t0 + Duration::from_millis(20)));
        let first = IpAddr::from(std::net::Ipv4Addr::from(0xC612_0000));
        assert!(rl.allow(first, t0 + Duration::from_millis(20)), "evicted: fresh");
        // Once buckets refill, idle sources are forgotten as the limiter is used.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..100 {
            rl.allow(ip("203.0.113.1"), later);
        }
        assert!(rl.len() <= 2, "{}", rl.len());
        assert!(!rl.is_empty());
    }

    /// A one-connection authority on 127.0.0.1 with canned answers: rent and renew lease
    /// 198.18.0.7, release succeeds, inquire about 198.18.0.7 tells 192.0.2.10, anything else
    /// is not permitted. A request for 198.18.0.99 gets a reply with a wrong id; one for
    /// 198.18.0.98 gets no reply at all.
    fn canned_authority(
        state: &Path,
    ) -> (SocketAddr, PathBuf, thread::JoinHandle<anyhow::Result<usize>>) {
        let (config, cert) = crate::tls::server_config(state, None, None).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handle = thread::spawn(move || -> anyhow::Result<usize> {
            let (sock, _) = listener.accept()?;
            sock.set_read_timeout(Some(Duration::from_secs(5)))?;
            let tls = rustls::StreamOwned::new(ServerConnection::new(config)?, sock);
            let mut reader = BufReader::new(tls);
            let mut served = 0;
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    return Ok(served);
                }
                served += 1;
                let reply = match parse_request(&line) {
                    Err(reply) => reply,
                    Ok(req) => match req.command {
                        Command::Rent { .. } | Command::Renew { .. } => {
                            Reply::leased(req.id, ip("198.18.0.7"), at(1_795_312_800))
                        }
                        Command::Release { virtual_addr } if virtual_addr == ip("198.18.0.99") => {
                            Reply::released(Id::from(12345))
                        }
                        Command::Release { virtual_addr } if virtual_addr == ip("198.18.0.98") => {
                            continue
                        }
                        Command::Release { .. } => Reply::released(req.id),
                        Command::Inquire { virtual_addr, .. } => inquiry_reply(
                            req.id,
                            if virtual_addr == ip("198.18.0.7") {
                                Ok(ip("192.0.2.10"))
                            } else {
                                Err(Refusal::NoSuchLease)
                            },
                        ),
                    },
                };
                reader.get_mut().write_all(&reply.to_line())?;
                reader.get_mut().flush()?;
            }
        });
        (addr, cert, handle)
    }

    #[test]
    fn client_talks_to_an_authority() {
        let state = TempDir::new("client");
        let (addr, cert, handle) = canned_authority(state.path());
        let mut client =
            AuthorityClient::connect(addr, &cert, Duration::from_secs(5)).expect("connect");
        assert_eq!(client.addr(), addr);
        let reply =
            client.call(&Command::Rent { partner: ip("198.51.100.2"), ttl: None }).expect("rent");
        assert_eq!(reply, Reply::leased(Id::from(1), ip("198.18.0.7"), at(1_795_312_800)));
        assert_eq!(reply.to_string(), "198.18.0.7 until 2026-11-22T02:00:00Z");
        let reply = client
            .call(&Command::Inquire { virtual_addr: ip("198.18.0.7"), at: Some(at(1_795_309_200)) })
            .expect("inquire");
        assert_eq!(reply, Reply::real(Id::from(2), ip("192.0.2.10")));
        let reply = client
            .call(&Command::Inquire { virtual_addr: ip("198.18.0.8"), at: None })
            .expect("refused inquiry is a reply");
        assert_eq!(reply, Reply::not_permitted(Id::from(3)));
        assert!(!reply.is_ok());
        let reply =
            client.call(&Command::Release { virtual_addr: ip("198.18.0.7") }).expect("release");
        assert_eq!(reply, Reply::released(Id::from(4)));
        let err = client
            .call(&Command::Release { virtual_addr: ip("198.18.0.99") })
            .expect_err("mismatched id");
        assert!(err.to_string().contains("reply to request 12345"), "{err}");
        drop(client);
        assert_eq!(handle.join().expect("server thread").expect("server"), 5);
    }

    #[test]
    fn client_times_out_without_a_reply() {
        let state = TempDir::new("timeout");
        let (addr, cert, handle) = canned_authority(state.path());
        let mut client =
            AuthorityClient::connect(addr, &cert, Duration::from_millis(300)).expect("connect");
        let started = Instant::now();
        let err = client
            .call(&Command::Release { virtual_addr: ip("198.18.0.98") })
            .expect_err("no reply");
        assert!(err.to_string().contains("300ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(client);
        handle.join().expect("server thread").expect("server");
    }

    #[test]
    fn client_refuses_an_unpinned_authority() {
        let state = TempDir::new("unpinned");
        let other = TempDir::new("unpinned-other");
        let (_, other_cert) = crate::tls::server_config(other.path(), None, None).expect("other");
        let (addr, _, handle) = canned_authority(state.path());
        let err = AuthorityClient::connect(addr, &other_cert, Duration::from_secs(5))
            .expect_err("wrong pin");
        let msg = format!("{err:#}");
        assert!(msg.contains("--ca") && msg.contains("certificate"), "{msg}");
        assert!(handle.join().expect("server thread").is_err());
    }

    #[test]
    fn client_reports_a_closed_port() {
        let state = TempDir::new("closed");
        let (_, cert) = crate::tls::server_config(state.path(), None, None).expect("cert");
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let err =
            AuthorityClient::connect(addr, &cert, Duration::from_secs(2)).expect_err("closed");
        assert!(format!("{err:#}").contains("cannot connect to the authority"), "{err:#}");
    }
}
