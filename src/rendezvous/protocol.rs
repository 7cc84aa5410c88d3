//! The rendezvous protocol: one JSON object per line over TLS 1.3 (ALPN
//! `vipgate-rendezvous/1`), requests with an `id` the reply echoes, and events pushed by the
//! server without one. `docs/rendezvous.md` is the reference; this module is its code.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::net::{IpAddr, SocketAddr};

/// Default TCP port of the rendezvous service.
pub const DEFAULT_PORT: u16 = 7444;
/// Longest account name.
pub const MAX_NAME: usize = 64;
/// Shortest password.
pub const MIN_PASSWORD: usize = 8;
/// Longest password.
pub const MAX_PASSWORD: usize = 1024;
/// Length of a relay token: 128 bits as lower-case hex.
pub const TOKEN_LEN: usize = 32;

/// Which endpoint an offer or answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The address on the client's own network (same network).
    Local,
    /// The address the rest of the Internet sees (STUN-observed, or a rented virtual one).
    Global,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Global => "global",
        }
    }
}

/// An endpoint offered to a buddy: where to send, and the token that proves the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Local or global.
    pub kind: Kind,
    /// The UDP address.
    pub endpoint: SocketAddr,
    /// 32 lower-case hex digits, chosen at random by the client for this one exchange.
    pub token: String,
}

/// One request (the `op` field selects it).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Creates an account.
    Register {
        /// Account name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
        user: String,
        /// 8 to 1024 bytes.
        password: String,
    },
    /// Logs in; the connection then carries pushed events.
    Login {
        /// Account name.
        user: String,
        /// Its password.
        password: String,
        /// Receive offers for direct sessions on this connection.
        #[serde(default)]
        listen: bool,
    },
    /// Asks for `user` as a buddy (or accepts their request).
    BuddyAdd {
        /// The other account.
        user: String,
    },
    /// Accepts the pending request of `user`.
    BuddyAccept {
        /// The account that asked.
        user: String,
    },
    /// Ends the relation with `user` (or withdraws or declines a request), both ways.
    BuddyRemove {
        /// The other account.
        user: String,
    },
    /// Everyone this account stands to.
    BuddyList {},
    /// One bit: is the mutual, online buddy `user` on this connection's network?
    SameNetwork {
        /// The buddy.
        user: String,
    },
    /// The buddy's registered global address (reveal mode only).
    AddressOf {
        /// The buddy.
        user: String,
    },
    /// The client's STUN-observed address and port, recorded with its session.
    ReportEndpoint {
        /// What STUN reported.
        endpoint: SocketAddr,
    },
    /// An offer of an endpoint to a listening buddy; relayed as an `offer` event.
    Offer {
        /// The buddy.
        user: String,
        /// What is offered.
        #[serde(flatten)]
        endpoint: Endpoint,
    },
    /// The answer to offer `session`; relayed to the offerer as an `answer` event.
    Answer {
        /// The offer's session number.
        session: u64,
        /// What is offered back.
        #[serde(flatten)]
        endpoint: Endpoint,
    },
    /// Keeps a quiet connection alive.
    Ping {},
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The id to echo (a number or a string).
    pub id: Value,
    /// What is asked.
    pub op: Op,
}

/// Error codes of replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The line is not a request of this protocol.
    BadRequest,
    /// Login or register first.
    NotLoggedIn,
    /// Already logged in on this connection.
    AlreadyLoggedIn,
    /// Wrong name or password (one answer for both).
    LoginFailed,
    /// The name is taken.
    NameTaken,
    /// Not a mutual buddy who is online, or no such account: one answer for all.
    NotPermitted,
    /// The buddy is online but not listening for direct sessions.
    NotListening,
    /// No pending request from that account.
    NoRequest,
    /// Unknown, expired, or already answered offer.
    NoSuchOffer,
    /// The operator has not enabled this (reveal mode).
    Disabled,
    /// Too many requests from this address; try later.
    RateLimited,
    /// The server is busy; try later.
    Busy,
    /// A request line longer than the limit (the connection is closed).
    TooLong,
    /// The server failed (its database).
    Internal,
}

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::NotLoggedIn => "not_logged_in",
            Code::AlreadyLoggedIn => "already_logged_in",
            Code::LoginFailed => "login_failed",
            Code::NameTaken => "name_taken",
            Code::NotPermitted => "not_permitted",
            Code::NotListening => "not_listening",
            Code::NoRequest => "no_request",
            Code::NoSuchOffer => "no_such_offer",
            Code::Disabled => "disabled",
            Code::RateLimited => "rate_limited",
            Code::Busy => "busy",
            Code::TooLong => "too_long",
            Code::Internal => "internal",
        }
    }

    /// The default human message.
    pub fn message(self) -> &'static str {
        match self {
            Code::BadRequest => "not a request of the rendezvous protocol",
            Code::NotLoggedIn => "log in first",
            Code::AlreadyLoggedIn => "this connection is already logged in",
            Code::LoginFailed => "wrong user name or password",
            Code::NameTaken => "that user name is taken",
            Code::NotPermitted => "not permitted (only for a mutual buddy who is online)",
            Code::NotListening => "the buddy is online but not listening for direct sessions",
            Code::NoRequest => "no pending buddy request from that user",
            Code::NoSuchOffer => "no such offer (unknown, expired or already answered)",
            Code::Disabled => "the server does not reveal addresses (reveal mode is off)",
            Code::RateLimited => "too many requests from your address; try again later",
            Code::Busy => "the server is busy; try again later",
            Code::TooLong => "request line too long",
            Code::Internal => "the server failed; try again later",
        }
    }
}

/// A successful reply with `fields` (an object) added to `{"id":..,"ok":true}`.
pub fn ok(id: &Value, fields: Value) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("id".into(), id.clone());
    m.insert("ok".into(), Value::Bool(true));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    line(Value::Object(m))
}

/// An error reply.
pub fn error(id: &Value, code: Code) -> Vec<u8> {
    error_msg(id, code, code.message())
}

/// An error reply with its own message.
pub fn error_msg(id: &Value, code: Code, message: &str) -> Vec<u8> {
    line(json!({"id": id, "ok": false, "error": code.as_str(), "message": message}))
}

/// A pushed event: `{"event": name, ...fields}`.
pub fn event(name: &str, fields: Value) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("event".into(), Value::String(name.into()));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    line(Value::Object(m))
}

fn line(v: Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parses one request line. `Err` is the reply to send (a `bad_request`, with the id when
/// one could be read).
pub fn parse(bytes: &[u8]) -> Result<Request, Vec<u8>> {
    let bad = |id: &Value, why: String| error_msg(id, Code::BadRequest, &why);
    let mut obj = match crate::json::parse(bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad(&Value::Null, "a request is a JSON object".into())),
        Err(e) => return Err(bad(&Value::Null, format!("not JSON: {e}"))),
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    if !(id.is_u64() || id.is_string()) {
        return Err(bad(&Value::Null, "`id` must be a non-negative integer or a string".into()));
    }
    let op: Op = serde_json::from_value(Value::Object(obj)).map_err(|e| bad(&id, e.to_string()))?;
    check(&op).map_err(|why| bad(&id, why))?;
    Ok(Request { id, op })
}

/// Field rules serde cannot say.
fn check(op: &Op) -> Result<(), String> {
    match op {
        Op::Register { user, password } | Op::Login { user, password, .. } => {
            check_name(user)?;
            if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&password.len()) {
                return Err(format!("a password has {MIN_PASSWORD} to {MAX_PASSWORD} bytes"));
            }
            Ok(())
        }
        Op::BuddyAdd { user }
        | Op::BuddyAccept { user }
        | Op::BuddyRemove { user }
        | Op::SameNetwork { user }
        | Op::AddressOf { user } => check_name(user),
        Op::Offer { user, endpoint } => {
            check_name(user)?;
            check_endpoint(endpoint)
        }
        Op::Answer { endpoint, .. } => check_endpoint(endpoint),
        Op::ReportEndpoint { endpoint } => check_addr(*endpoint),
        Op::BuddyList {} | Op::Ping {} => Ok(()),
    }
}

/// 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("a user name is 1 to {MAX_NAME} of A-Z a-z 0-9 . _ - (got {name:?})"))
    }
}

fn check_endpoint(e: &Endpoint) -> Result<(), String> {
    check_addr(e.endpoint)?;
    let hex = e.token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if e.token.len() != TOKEN_LEN || !hex {
        return Err(format!("a token is {TOKEN_LEN} lower-case hex digits"));
    }
    Ok(())
}

fn check_addr(a: SocketAddr) -> Result<(), String> {
    let ip = a.ip().to_canonical();
    if a.port() == 0 || ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
        return Err(format!("{a} is not a usable unicast endpoint"));
    }
    Ok(())
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_code(line: &[u8]) -> String {
        let v: Value = serde_json::from_slice(line).expect("json");
        v["error"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn parses_every_op() {
        let cases: &[(&str, Op)] = &[
            (
                r#"{"id":1,"op":"login","user":"alice","password":"secret-pw","listen":true}"#,
                Op::Login { user: "alice".into(), password: "secret-pw".into(), listen: true },
            ),
            (r#"{"id":"x","op":"buddy_list"}"#, Op::BuddyList {}),
            (
                r#"{"id":2,"op":"same_network","user":"bob"}"#,
                Op::SameNetwork { user: "bob".into() },
            ),
            (
                r#"{"id":3,"op":"offer","user":"bob","kind":"local","endpoint":"198.18.0.10:4000","token":"0123456789abcdef0123456789abcdef"}"#,
                Op::Offer {
                    user: "bob".into(),
                    endpoint: Endpoint {
                        kind: Kind::Local,
                        endpoint: "198.18.0.10:4000".parse().unwrap(),
                        token: "0123456789abcdef0123456789abcdef".into(),
                    },
                },
            ),
        ];
        for (text, op) in cases {
            assert_eq!(parse(text.as_bytes()).expect(text).op, *op, "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_request() {
        for text in [
            "",
            "garbage",
            "[1,2]",
            r#"{"id":1}"#,
            r#"{"id":1,"op":"nope"}"#,
            r#"{"id":-1,"op":"ping"}"#,
            r#"{"id":1,"op":"ping","extra":1}"#,
            r#"{"id":1,"op":"login","user":"a b","password":"secret-pw"}"#,
            r#"{"id":1,"op":"login","user":"alice","password":"short"}"#,
            r#"{"id":1,"op":"offer","user":"bob","kind":"local","endpoint":"198.18.0.10:4000","token":"XYZ"}"#,
            r#"{"id":1,"op":"offer","user":"bob","kind":"local","endpoint":"0.0.0.0:4000","token":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"id":1,"op":"offer","user":"bob","kind":"local","endpoint":"198.18.0.10:4000","token":"0123456789abcdef0123456789abcdef","message":"hi"}"#,
            r#"{"id":1,"op":"report_endpoint","endpoint":"198.18.0.10:0"}"#,
        ] {
            let reply = parse(text.as_bytes()).expect_err(text);
            assert_eq!(err_code(&reply), "bad_request", "{text}");
        }
    }

    /// A key given twice is not taken last-wins: the line is a bad request.
    #[test]
    fn duplicate_keys_are_bad_requests() {
        for line in [
            &br#"{"id":1,"op":"bogus","op":"buddy_list"}"#[..],
            br#"{"id":1,"op":"same_network","user":"bob","user":"carol"}"#,
        ] {
            let reply = parse(line).expect_err("refused");
            assert_eq!(err_code(&reply), "bad_request");
            let v: Value = serde_json::from_slice(&reply).expect("json");
            assert!(v.to_string().contains("duplicate key"), "{v}");
        }
        assert!(parse(br#"{"id":1,"op":"buddy_list"}"#).is_ok());
    }

    #[test]
    fn replies_and_events_are_single_lines() {
        let r = ok(&json!(7), json!({"same": true}));
        assert_eq!(r, b"{\"id\":7,\"ok\":true,\"same\":true}\n");
        let e = event("presence", json!({"user": "bob", "online": false}));
        assert_eq!(e.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&e).expect("json");
        assert_eq!(v, json!({"event": "presence", "user": "bob", "online": false}));
        let x = error(&json!("a"), Code::NotPermitted);
        assert_eq!(err_code(&x), "not_permitted");
    }
}
