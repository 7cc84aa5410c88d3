//! `vipgate peer`: the client of seed 003. It logs in to a `vipgate rendezvous` server, keeps
//! buddies, and opens a direct UDP path to a buddy: it asks the server the one bit (same
//! network?), exchanges local or global endpoints through it, then both sides send until
//! each hears the other's token-authenticated hello, from wherever it actually comes. The
//! message goes over that direct path; the server only ever relays the endpoints.
//!
//! Datagrams on the direct path are text: `VGP1 <kind> <token of the recipient>[ <text>]`,
//! kinds `hello`, `msg` and `ack`. A token is 128 random bits the recipient chose and gave
//! only to the server, for this buddy and this exchange: a datagram that carries it comes
//! from the buddy (or the server), whatever its source address says.

use crate::rendezvous::protocol::{self, Kind, DEFAULT_PORT, TOKEN_LEN};
use crate::tls::{LineClient, Service};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use log::{debug, info};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How the peer names the rendezvous server in errors.
pub const SERVICE: Service = Service {
    name: "rendezvous server",
    alpn: crate::tls::RENDEZVOUS_ALPN,
    running: "`vipgate rendezvous` running there",
    cert_hint: "copy the server's certificate (<state-dir>/tls/cert.pem, or the one given to \
                it) here and pass it with --ca",
};

/// How often a quiet session pings the server.
const PING_EVERY: Duration = Duration::from_secs(30);
/// How often hellos (and unacknowledged messages) are sent on the direct path.
const RESEND: Duration = Duration::from_millis(100);
/// Most bytes of a message (it must fit one datagram with room to spare).
pub const MAX_MESSAGE: usize = 1200;
/// How long a listener keeps answering a session after delivering its message (for
/// retransmissions whose acknowledgement was lost).
const LINGER: Duration = Duration::from_secs(3);

/// Flags of `vipgate peer`.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The rendezvous server: IP:PORT, [IPv6]:PORT, or a bare IP address (port 7444).
    #[arg(long, value_name = "ADDR", value_parser = parse_server)]
    pub server: SocketAddr,
    /// The server's certificate (PEM) to pin, or the CA that issued it.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Account name.
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// File holding the password (one line; a trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    pub password_file: PathBuf,
    /// STUN server to learn the global endpoint from [default: the server's address, port
    /// 3478].
    #[arg(long, value_name = "ADDR", value_parser = parse_stun)]
    pub stun: Option<SocketAddr>,
    /// A vipgate rental authority (`listen` only): when answering an offer from a different
    /// network, rent a virtual address for the offering buddy's address and answer with it
    /// instead of the STUN one (the way back is then open before the buddy's first packet).
    #[arg(long, value_name = "ADDR", value_parser = parse_authority, requires = "authority_ca")]
    pub authority: Option<SocketAddr>,
    /// The authority's certificate (PEM) to pin.
    #[arg(long, value_name = "FILE", requires = "authority")]
    pub authority_ca: Option<PathBuf>,
    /// Seconds to wait for the server's replies, and for a direct path to open.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: PeerCommand,
}

/// Subcommands of `vipgate peer`.
#[derive(Debug, Clone, Subcommand)]
pub enum PeerCommand {
    /// Create the account (name from --user, password from --password-file).
    Register,
    /// Manage buddies.
    Buddy {
        /// What to do.
        #[command(subcommand)]
        action: BuddyAction,
    },
    /// Stay logged in and print presence and buddy events, one per line, until stopped.
    Online,
    /// Stay logged in and accept direct sessions; print each message received as
    /// `from=BUDDY path=local|global message=TEXT`.
    Listen,
    /// Open a direct path to BUDDY (who runs `listen`) and deliver TEXT over it; print
    /// `path=local|global peer=IP:PORT`.
    Connect {
        /// The buddy.
        buddy: String,
        /// What to deliver.
        #[arg(long, value_name = "TEXT")]
        message: String,
    },
}

/// `vipgate peer buddy ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum BuddyAction {
    /// Ask NAME to be your buddy (or accept NAME's request).
    Add {
        /// The other account.
        name: String,
    },
    /// Accept NAME's pending request.
    Accept {
        /// The account that asked.
        name: String,
    },
    /// End the relation with NAME (or withdraw or decline a request).
    Remove {
        /// The other account.
        name: String,
    },
    /// List everyone you stand to.
    List,
}

/// The server refused a request.
#[derive(Debug, thiserror::Error)]
#[error("the rendezvous server refused {op}: {message} ({code})")]
pub struct Refused {
    /// The request.
    pub op: String,
    /// The error code (`not_permitted`, ...).
    pub code: String,
    /// The server's message.
    pub message: String,
}

fn parse_server(s: &str) -> Result<SocketAddr, String> {
    crate::tls::parse_endpoint(s, DEFAULT_PORT, "the server")
}

fn parse_stun(s: &str) -> Result<SocketAddr, String> {
    crate::tls::parse_endpoint(s, crate::stun::DEFAULT_PORT, "the STUN server")
}

fn parse_authority(s: &str) -> Result<SocketAddr, String> {
    crate::tls::parse_endpoint(s, crate::authority::DEFAULT_PORT, "the authority")
}

/// A logged-in (or not yet) connection to the rendezvous server.
pub struct Session {
    line: LineClient,
    next_id: u64,
    events: VecDeque<Value>,
    last_sent: Instant,
}

impl Session {
    /// Connects (TLS) to the server.
    pub fn connect(server: SocketAddr, ca: &std::path::Path, timeout: Duration) -> Result<Session> {
        let line = LineClient::connect(&SERVICE, server, ca, timeout)?;
        Ok(Session { line, next_id: 1, events: VecDeque::new(), last_sent: Instant::now() })
    }

    /// This end's address of the connection: the address on the local network.
    pub fn local_ip(&self) -> Result<IpAddr> {
        Ok(self.line.local_addr().context("no local address")?.ip().to_canonical())
    }

    /// Sends `request` (an object with `op`) and waits for its reply; events that arrive
    /// first are kept for [`Session::next_event`]. A refusal is an `Err` holding [`Refused`].
    pub fn call(&mut self, mut request: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        let op = request["op"].as_str().unwrap_or("?").to_string();
        let mut bytes = serde_json::to_vec(&request)?;
        bytes.push(b'\n');
        self.line.send(&bytes)?;
        self.last_sent = Instant::now();
        loop {
            let line = self.line.read_line(None)?.context("no reply")?;
            let v: Value = serde_json::from_slice(&line).with_context(|| {
                format!("the rendezvous server sent an unreadable line to {op}")
            })?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if v["id"] != json!(id) {
                bail!("the rendezvous server answered {op} with a reply to another request");
            }
            if v["ok"] == json!(true) {
                return Ok(v);
            }
            return Err(Refused {
                op,
                code: v["error"].as_str().unwrap_or("unknown").to_string(),
                message: v["message"].as_str().unwrap_or("").to_string(),
            }
            .into());
        }
    }

    /// The next pushed event, waiting until `until` (pinging the server meanwhile so the
    /// session stays alive); `None` at `until`.
    pub fn next_event(&mut self, until: Option<Instant>) -> Result<Option<Value>> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let ping_at = self.last_sent + PING_EVERY;
            let wake = until.map_or(ping_at, |u| u.min(ping_at));
            if let Some(line) = self.line.read_line(Some(wake))? {
                let v: Value = serde_json::from_slice(&line)
                    .context("the rendezvous server sent an unreadable event")?;
                if v.get("event").is_some() {
                    return Ok(Some(v));
                }
                continue; // a late reply (to a ping)
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(None);
            }
            if Instant::now() >= ping_at {
                self.call(json!({"op": "ping"}))?;
            }
        }
    }

    /// Logs in; returns the address the server registered for this session.
    pub fn login(&mut self, user: &str, password: &str, listen: bool) -> Result<String> {
        let r = self
            .call(json!({"op": "login", "user": user, "password": password, "listen": listen}))?;
        Ok(r["address"].as_str().unwrap_or("?").to_string())
    }
}

/// Runs a `vipgate peer` command.
pub fn run(args: PeerArgs) -> Result<()> {
    let password = std::fs::read_to_string(&args.password_file).with_context(|| {
        format!("cannot read the password file {}", args.password_file.display())
    })?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    protocol::check_name(&args.user).map_err(|e| anyhow!("--user: {e}"))?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut s = Session::connect(args.server, &args.ca, timeout)?;
    if let PeerCommand::Register = args.command {
        s.call(json!({"op": "register", "user": args.user, "password": password}))?;
        println!("registered {}", args.user);
        return Ok(());
    }
    let listen = matches!(args.command, PeerCommand::Listen);
    let address = s.login(&args.user, &password, listen)?;
    match &args.command {
        PeerCommand::Register => Ok(()),
        PeerCommand::Buddy { action } => buddy(&mut s, action),
        PeerCommand::Online => {
            say(&format!("online user={} address={address}", args.user));
            loop {
                if let Some(e) = s.next_event(None)? {
                    say(&describe(&e));
                }
            }
        }
        PeerCommand::Listen => {
            say(&format!("listening user={} address={address}", args.user));
            listen_loop(&mut s, &args, timeout)
        }
        PeerCommand::Connect { buddy, message } => {
            if message.len() > MAX_MESSAGE {
                bail!("--message has {} bytes; at most {MAX_MESSAGE}", message.len());
            }
            let (kind, peer) = connect(&mut s, &args, buddy, message, timeout)?;
            say(&format!("path={} peer={peer}", kind.as_str()));
            Ok(())
        }
    }
}

/// Prints a line on stdout at once (tests and scripts read it while the process runs).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// An event as one line of `key=value` words.
fn describe(e: &Value) -> String {
    let name = e["event"].as_str().unwrap_or("?");
    let user = e["user"].as_str().unwrap_or("?");
    match name {
        "presence" => format!("presence user={user} online={}", e["online"] == json!(true)),
        other => format!("{other} user={user}"),
    }
}

fn buddy(s: &mut Session, action: &BuddyAction) -> Result<()> {
    match action {
        BuddyAction::Add { name } => {
            let r = s.call(json!({"op": "buddy_add", "user": name}))?;
            say(&format!("{name}: {}", r["state"].as_str().unwrap_or("?")));
        }
        BuddyAction::Accept { name } => {
            let r = s.call(json!({"op": "buddy_accept", "user": name}))?;
            say(&format!("{name}: {}", r["state"].as_str().unwrap_or("?")));
        }
        BuddyAction::Remove { name } => {
            s.call(json!({"op": "buddy_remove", "user": name}))?;
            say(&format!("{name}: removed"));
        }
        BuddyAction::List => {
            let r = s.call(json!({"op": "buddy_list"}))?;
            for b in r["buddies"].as_array().into_iter().flatten() {
                let online = match b.get("online") {
                    Some(Value::Bool(true)) => " online",
                    Some(_) => " offline",
                    None => "",
                };
                say(&format!(
                    "{} {}{online}",
                    b["user"].as_str().unwrap_or("?"),
                    b["state"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Ok(())
}

/// 128 random bits as lower-case hex.
fn new_token() -> Result<String> {
    let mut b = [0u8; TOKEN_LEN / 2];
    getrandom::getrandom(&mut b).context("no randomness from the kernel")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A UDP socket on this host's address toward the server, and the endpoint of `kind` to
/// offer for it: the local address, or the global one STUN reports (or a virtual address
/// rented for `partner` from the authority).
fn endpoint(
    s: &mut Session,
    args: &PeerArgs,
    kind: Kind,
    partner: Option<IpAddr>,
    timeout: Duration,
) -> Result<(UdpSocket, SocketAddr)> {
    let local = s.local_ip()?;
    let sock = UdpSocket::bind(SocketAddr::new(local, 0))
        .with_context(|| format!("cannot bind a UDP socket on {local}"))?;
    let mine = sock.local_addr()?;
    let offered = match kind {
        Kind::Local => mine,
        Kind::Global => {
            let stun = args
                .stun
                .unwrap_or_else(|| SocketAddr::new(args.server.ip(), crate::stun::DEFAULT_PORT));
            let reflexive = crate::stun::query(&sock, stun, timeout.min(Duration::from_secs(5)))?;
            s.call(json!({"op": "report_endpoint", "endpoint": reflexive.to_string()}))?;
            match (args.authority, &args.authority_ca, partner) {
                (Some(auth), Some(ca), Some(partner)) => {
                    let v = rent(auth, ca, partner, timeout)?;
                    info!("rented {v} for {partner}; offering it instead of {reflexive}");
                    SocketAddr::new(v, mine.port())
                }
                _ => reflexive,
            }
        }
    };
    debug!("UDP socket {mine}, offering {offered}");
    Ok((sock, offered))
}

/// Rents a virtual address for `partner` from the authority at `auth`.
fn rent(
    auth: SocketAddr,
    ca: &std::path::Path,
    partner: IpAddr,
    timeout: Duration,
) -> Result<IpAddr> {
    use crate::authority::{AuthorityClient, Command, Outcome};
    let mut c = AuthorityClient::connect(auth, ca, timeout)?;
    let reply = c.call(&Command::Rent { partner, ttl: None })?;
    match reply.outcome {
        Outcome::Leased { virtual_addr, .. } => Ok(virtual_addr),
        _ => bail!("the authority at {auth} did not rent an address for {partner}: {reply}"),
    }
}

fn connect(
    s: &mut Session,
    args: &PeerArgs,
    buddy: &str,
    message: &str,
    timeout: Duration,
) -> Result<(Kind, SocketAddr)> {
    let same = s.call(json!({"op": "same_network", "user": buddy}))?["same"] == json!(true);
    let kind = if same { Kind::Local } else { Kind::Global };
    info!("{buddy} is {} network", if same { "on the same" } else { "on a different" });
    let (sock, offered) = endpoint(s, args, kind, None, timeout)?;
    let token = new_token()?;
    let r = s.call(json!({"op": "offer", "user": buddy, "kind": kind.as_str(),
                          "endpoint": offered.to_string(), "token": token}))?;
    let session = r["session"].as_u64().context("the offer reply has no session")?;
    let deadline = Instant::now() + timeout;
    let answer = loop {
        let Some(e) = s.next_event(Some(deadline))? else {
            bail!("{buddy} did not answer the offer within {timeout:?}");
        };
        if e["event"] == json!("answer") && e["session"] == json!(session) {
            break e;
        }
    };
    let their_token = answer["token"].as_str().unwrap_or_default().to_string();
    let their: SocketAddr = answer["endpoint"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .context("the answer carries no endpoint")?;
    let mut path = Path { sock, mine: token, theirs: their_token, told: their, peer: None };
    path.deliver(message, deadline).map(|peer| (kind, peer)).with_context(|| {
        format!(
            "no direct path to {buddy} opened within {timeout:?} (offered {offered}, sent to \
             {their}; see docs/rendezvous.md for which NATs allow one)"
        )
    })
}

/// One direct UDP exchange with a buddy.
struct Path {
    sock: UdpSocket,
    /// Our token: what the buddy's datagrams must carry.
    mine: String,
    /// Theirs: what ours carry.
    theirs: String,
    /// The endpoint the server relayed.
    told: SocketAddr,
    /// Where the buddy's hello actually came from.
    peer: Option<SocketAddr>,
}

impl Path {
    fn send(&self, to: SocketAddr, kind: &str, text: &str) {
        let mut d = format!("VGP1 {kind} {}", self.theirs);
        if !text.is_empty() {
            d.push(' ');
            d.push_str(text);
        }
        if let Err(e) = self.sock.send_to(d.as_bytes(), to) {
            debug!("send to {to}: {e}");
        }
    }

    /// The next datagram that carries our token, as (kind, text, source), within `until`.
    fn recv(&self, until: Instant) -> Option<(String, String, SocketAddr)> {
        let mut buf = [0u8; 2048];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.sock.set_read_timeout(Some(left));
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None
                }
                Err(_) => continue, // ICMP errors reported on the socket
            };
            let Ok(text) = std::str::from_utf8(&buf[..n]) else { continue };
            let mut parts = text.splitn(4, ' ');
            if parts.next() != Some("VGP1") {
                continue;
            }
            let kind = parts.next().unwrap_or_default().to_string();
            if parts.next() != Some(self.mine.as_str()) {
                debug!("datagram from {from} without our token: ignored");
                continue;
            }
            return Some((kind, parts.next().unwrap_or_default().to_string(), from));
        }
    }

    /// The connecting side: hello until the buddy's hello arrives, then the message until it
    /// is acknowledged. Returns where the buddy was reached.
    fn deliver(&mut self, message: &str, deadline: Instant) -> Result<SocketAddr> {
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                match self.peer {
                    None => self.send(self.told, "hello", ""),
                    Some(p) => self.send(p, "msg", message),
                }
                next_send = Instant::now() + RESEND;
            }
            let Some((kind, _, from)) = self.recv(next_send.min(deadline)) else { continue };
            match kind.as_str() {
                "hello" if self.peer.is_none() => {
                    debug!("hello from {from}");
                    self.peer = Some(from);
                    next_send = Instant::now();
                }
                "ack" => return Ok(self.peer.unwrap_or(from)),
                _ => {}
            }
        }
        bail!("timed out")
    }

    /// The listening side: answers hellos where they come from; prints the message once;
    /// acknowledges every copy. Ends `LINGER` after the message, or at `deadline`.
    fn serve(&mut self, from_user: &str, kind: Kind, deadline: Instant) {
        let mut next_send = Instant::now();
        let mut end = deadline;
        let mut delivered = false;
        while Instant::now() < end {
            if !delivered && Instant::now() >= next_send {
                self.send(self.peer.unwrap_or(self.told), "hello", "");
                next_send = Instant::now() + RESEND;
            }
            let Some((k, text, from)) = self.recv(next_send.min(end)) else { continue };
            match k.as_str() {
                "hello" => {
                    self.peer = Some(from);
                    self.send(from, "hello", "");
                }
                "msg" => {
                    self.peer = Some(from);
                    self.send(from, "ack", "");
                    if !delivered {
                        delivered = true;
                        end = Instant::now() + LINGER;
                        say(&format!("from={from_user} path={} message={text}", kind.as_str()));
                    }
                }
                _ => {}
            }
        }
        if !delivered {
            eprintln!(
                "vipgate: no direct path from {from_user} opened (sent to {}); see \
                 docs/rendezvous.md for which NATs allow one",
                self.told
            );
        }
    }
}

fn listen_loop(s: &mut Session, args: &PeerArgs, timeout: Duration) -> Result<()> {
    loop {
        let Some(e) = s.next_event(None)? else { continue };
        if e["event"] != json!("offer") {
            say(&describe(&e));
            continue;
        }
        let from = e["user"].as_str().unwrap_or("?").to_string();
        let session = e["session"].as_u64().unwrap_or(0);
        let parsed = (|| -> Option<(Kind, SocketAddr, String)> {
            let kind: Kind = serde_json::from_value(e["kind"].clone()).ok()?;
            let told: SocketAddr = e["endpoint"].as_str()?.parse().ok()?;
            Some((kind, told, e["token"].as_str()?.to_string()))
        })();
        let Some((kind, told, theirs)) = parsed else { continue };
        let (sock, offered) = match endpoint(s, args, kind, Some(told.ip()), timeout) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("vipgate: cannot answer {from}: {e:#}");
                continue;
            }
        };
        let mine = new_token()?;
        let answer = json!({"op": "answer", "session": session, "kind": kind.as_str(),
                            "endpoint": offered.to_string(), "token": mine});
        if let Err(e) = s.call(answer) {
            eprintln!("vipgate: cannot answer {from}: {e:#}");
            continue;
        }
        let mut path = Path { sock, mine, theirs, told, peer: None };
        let deadline = Instant::now() + timeout;
        std::thread::spawn(move || path.serve(&from, kind, deadline));
    }
}
