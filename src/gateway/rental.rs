//! The rental authority inside the gateway's loop: TLS 1.3 connections (rustls, non-blocking),
//! one JSON request per line, the permission rule, and replies in request order.
//!
//! `rent`, `renew` and `release` are answered once the change is durable (the reply waits for
//! the store's commit); `inquire` is answered from the live table, or from the history when
//! it asks about a past moment (the reply waits for the store's answer). Every refusal of an
//! inquiry is the same reply. Nothing here blocks: a slow or hostile client only ever costs
//! its own connection, which is closed at its deadline.

use super::durable::Durable;
use crate::authority::{self, Command, Frame, Id, LineFramer, RateLimiter, Reply};
use crate::nat::{LeaseError, Translator};
use crate::tls::Round;
use anyhow::Result;
use ipnet::IpNet;
use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use rustls::{ServerConfig, ServerConnection};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First token of the authority's listeners.
pub const LISTENER_TOKENS: usize = 200;
/// Most listen addresses.
pub const MAX_LISTENERS: usize = 16;
/// First token of its connections.
pub const CONN_TOKENS: usize = 10_000;
/// Most connections at once; more are closed as they arrive.
pub const MAX_CONNS: usize = crate::config::AUTHORITY_CONNS;
/// Time to finish the TLS handshake, from the TCP accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the first request, from the end of the handshake (its own deadline: a handshake
/// that ends just before [`HANDSHAKE_TIMEOUT`] still leaves the client all of it).
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection may stay silent between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most requests a connection may have waiting for the store or for its client to read;
/// past it, the connection is not read from (TCP pushes back on the client).
const MAX_WAITING: usize = 256;
/// Most reply bytes handed to TLS and not yet taken by the socket; past it, replies wait.
const MAX_UNSENT: usize = 32 * 1024;

enum Waiting {
    /// A reply to send as soon as the replies before it are sent.
    Ready(Reply),
    /// A reply to send once everything up to `seq` is durable.
    Commit(u64, Reply),
    /// An inquiry about the past, waiting for the store's answer `token`.
    Query(u64, Id),
}

struct Conn {
    sock: TcpStream,
    tls: ServerConnection,
    peer: IpAddr,
    framer: LineFramer,
    waiting: VecDeque<Waiting>,
    deadline: Instant,
    /// The handshake is over (and the deadline became the first request's).
    handshaken: bool,
    closing: bool,
    /// Reply bytes written into TLS since the socket last took everything.
    unsent: usize,
    /// Reading was paused (too much waiting or unsent): look at it again when things move.
    throttled: bool,
}

/// Counters of the authority.
#[derive(Debug, Default, Clone)]
pub struct RentalStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed at once because too many were open.
    pub refused_connections: u64,
    /// Connections ended by a TLS error or a deadline.
    pub broken_connections: u64,
    /// Requests answered.
    pub requests: u64,
    /// Inquiries refused (any cause).
    pub inquiries_refused: u64,
    /// Inquiries over the rate limit.
    pub rate_limited: u64,
    /// Rents, renews and releases answered `internal` at once while the store was stuck.
    pub store_refused: u64,
    /// Rents, renews and releases over their host's rate.
    pub rents_rate_limited: u64,
}

/// The authority's listeners and connections.
pub struct Rental {
    listeners: Vec<TcpListener>,
    config: Arc<ServerConfig>,
    conns: Vec<Option<Conn>>,
    limiter: RateLimiter,
    /// Connections one source may hold.
    conns_per_source: usize,
    /// Rents, renews and releases per host.
    rent_limiter: RateLimiter,
    served: Vec<IpNet>,
    /// Counters.
    pub stats: RentalStats,
}

/// A per-source limiter of `rate` requests per second (burst: twice that).
fn inquiry_limiter(rate: u32) -> RateLimiter {
    RateLimiter::new(rate, rate.saturating_mul(2), 65_536)
}

impl Rental {
    /// Binds the listen addresses. `[::]:PORT` serves IPv4 too (dual stack); on a box without
    /// IPv6 it falls back to `0.0.0.0:PORT`.
    pub fn bind(
        listen: &[SocketAddr],
        config: Arc<ServerConfig>,
        served: Vec<IpNet>,
        inquiry_rate: u32,
        conns_per_source: usize,
        rent_rate: u32,
        registry: &Registry,
    ) -> Result<Rental> {
        if listen.len() > MAX_LISTENERS {
            anyhow::bail!(
                "at most {MAX_LISTENERS} --authority-listen addresses (a [::]:PORT serves every address)"
            );
        }
        let mut listeners = Vec::new();
        for (k, a) in listen.iter().enumerate() {
            let mut l =
                super::bind_dual(*a, "the authority, see --authority-listen", TcpListener::bind)?;
            registry.register(&mut l, Token(LISTENER_TOKENS + k), Interest::READABLE)?;
            listeners.push(l);
        }
        Ok(Rental {
            listeners,
            config,
            conns: Vec::new(),
            limiter: inquiry_limiter(inquiry_rate),
            conns_per_source,
            rent_limiter: inquiry_limiter(rent_rate),
            served,
            stats: RentalStats::default(),
        })
    }

    /// Answers at most `rate` inquiries per second per source from now on (burst: twice
    /// that); sources start afresh.
    pub fn set_inquiry_rate(&mut self, rate: u32) {
        self.limiter = inquiry_limiter(rate);
    }

    /// Answers at most `rate` rents, renews and releases per second per host from now on.
    pub fn set_rent_rate(&mut self, rate: u32) {
        self.rent_limiter = inquiry_limiter(rate);
    }

    /// The addresses actually bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// True when `t` is one of the authority's tokens.
    pub fn owns(t: Token) -> bool {
        (LISTENER_TOKENS..LISTENER_TOKENS + MAX_LISTENERS).contains(&t.0) || t.0 >= CONN_TOKENS
    }

    /// Handles a readiness event of one of the authority's tokens.
    pub fn ready(
        &mut self,
        t: Token,
        registry: &Registry,
        nat: &mut Translator,
        store: &mut Durable,
    ) {
        if t.0 < CONN_TOKENS {
            self.accept(t.0 - LISTENER_TOKENS, registry);
        } else {
            self.service(t.0 - CONN_TOKENS, registry, nat, store);
        }
    }

    /// How many connections the source of `peer` holds: a host of the LAN is its own
    /// source; outside, an IPv4 address or an IPv6 /64 is one.
    fn held_by(&self, peer: IpAddr) -> usize {
        let key = |a: IpAddr| {
            if self.served.iter().any(|n| n.contains(&a)) {
                a
            } else {
                RateLimiter::source_key(a)
            }
        };
        let k = key(peer);
        self.conns.iter().flatten().filter(|c| key(c.peer) == k).count()
    }

    fn accept(&mut self, k: usize, registry: &Registry) {
        let Some(listener) = self.listeners.get(k) else { return };
        loop {
            let (mut sock, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog until a slot frees.
                    debug!("authority accept failed: {e}");
                    return;
                }
            };
            let peer_ip = authority::peer_ip(peer);
            if self.held_by(peer_ip) >= self.conns_per_source {
                self.stats.refused_connections += 1;
                continue; // dropping `sock` closes it
            }
            let Some(slot) = super::free_slot(&mut self.conns, MAX_CONNS) else {
                self.stats.refused_connections += 1;
                continue;
            };
            let Ok(tls) = ServerConnection::new(self.config.clone()) else { continue };
            if registry.register(&mut sock, Token(CONN_TOKENS + slot), Interest::READABLE).is_err()
            {
                continue;
            }
            self.stats.connections += 1;
            self.conns[slot] = Some(Conn {
                sock,
                tls,
                peer: peer_ip,
                framer: LineFramer::new(),
                waiting: VecDeque::new(),
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                handshaken: false,
                closing: false,
                unsent: 0,
                throttled: false,
            });
        }
    }

    fn service(
        &mut self,
        slot: usize,
        registry: &Registry,
        nat: &mut Translator,
        store: &mut Durable,
    ) {
        let Some(Some(mut c)) = self.conns.get_mut(slot).map(Option::take) else { return };
        let alive = self.progress(&mut c, nat, store);
        self.settle(slot, c, alive, registry);
    }

    /// Puts a connection back with the right interest, or closes it.
    fn settle(&mut self, slot: usize, mut c: Conn, alive: bool, registry: &Registry) {
        let done = c.closing && c.waiting.is_empty() && !c.tls.wants_write();
        if !alive || done {
            let _ = registry.deregister(&mut c.sock);
            return;
        }
        let interest = if c.tls.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ = registry.reregister(&mut c.sock, Token(CONN_TOKENS + slot), interest);
        self.conns[slot] = Some(c);
    }

    /// Reads, decrypts, answers and writes what it can. False when the connection is over.
    ///
    /// Backpressure: while the socket does not take our output, or requests wait in number,
    /// nothing more is read from the connection, so a client that never reads its replies
    /// only fills its own TCP window.
    fn progress(&mut self, c: &mut Conn, nat: &mut Translator, store: &mut Durable) -> bool {
        match Self::pump(c) {
            Err(_) => return false,
            Ok(false) => {
                c.throttled = true;
                return true;
            }
            Ok(true) => {}
        }
        c.throttled = false;
        let mut eof = false;
        loop {
            if c.closing || c.waiting.len() >= MAX_WAITING {
                c.throttled = !c.closing;
                break;
            }
            match crate::tls::read_round(&mut c.tls, &mut c.sock, &mut c.framer) {
                Round::More => {}
                Round::Drained => break,
                Round::Eof => {
                    eof = true;
                    break;
                }
                Round::Broken => {
                    self.stats.broken_connections += 1;
                    return false;
                }
            }
            if !c.handshaken && !c.tls.is_handshaking() {
                c.handshaken = true;
                c.deadline = Instant::now() + FIRST_REQUEST_TIMEOUT;
            }
            while c.waiting.len() < MAX_WAITING && !c.closing {
                let Some(frame) = c.framer.next_frame() else { break };
                c.deadline = Instant::now() + IDLE_TIMEOUT;
                match frame {
                    Frame::Line(line) => {
                        let w = self.handle(&line, c.peer, nat, store);
                        c.waiting.push_back(w);
                    }
                    Frame::TooLong => {
                        c.waiting.push_back(Waiting::Ready(Reply::too_long()));
                        c.closing = true;
                    }
                }
            }
        }
        if eof {
            c.closing = true;
        }
        match Self::pump(c) {
            Err(_) => false,
            Ok(drained) => {
                c.throttled |= !drained;
                true
            }
        }
    }

    /// Moves ready replies into TLS and TLS into the socket until one of them is stuck.
    /// Ok(true) when everything ready went out.
    fn pump(c: &mut Conn) -> io::Result<bool> {
        loop {
            Self::flush(c);
            if !crate::tls::write_round(&mut c.tls, &mut c.sock)? {
                return Ok(false);
            }
            c.unsent = 0;
            if !matches!(c.waiting.front(), Some(Waiting::Ready(_))) {
                return Ok(true);
            }
        }
    }

    /// Moves the replies that may go from `waiting` into the TLS stream, in order, as long as
    /// the socket keeps up.
    fn flush(c: &mut Conn) {
        while c.unsent < MAX_UNSENT {
            let Some(Waiting::Ready(_)) = c.waiting.front() else { break };
            if let Some(Waiting::Ready(r)) = c.waiting.pop_front() {
                let line = r.to_line();
                c.unsent += line.len();
                let _ = c.tls.writer().write_all(&line);
            }
        }
    }

    /// Serves again the connections whose reading was paused (their replies may have gone
    /// out, or their waits ended, since).
    pub fn resume(&mut self, registry: &Registry, nat: &mut Translator, store: &mut Durable) {
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_some_and(|c| c.throttled) {
                self.service(slot, registry, nat, store);
            }
        }
    }

    /// One request line: the reply, or what it waits for.
    fn handle(
        &mut self,
        line: &[u8],
        peer: IpAddr,
        nat: &mut Translator,
        store: &mut Durable,
    ) -> Waiting {
        self.stats.requests += 1;
        let req = match authority::parse_request(line) {
            Ok(r) => r,
            Err(reply) => return Waiting::Ready(reply),
        };
        let now = Instant::now();
        let id = req.id;
        let ttl = |t: Option<Duration>| t.unwrap_or(authority::DEFAULT_TTL).min(authority::MAX_TTL);
        let changes = matches!(
            req.command,
            Command::Rent { .. } | Command::Renew { .. } | Command::Release { .. }
        );
        if changes && store.stuck() {
            // Nothing would be stored: refuse before anything changes.
            self.stats.store_refused += 1;
            return Waiting::Ready(Reply::internal(id));
        }
        // One host's churn never crowds the others (a host of the LAN by its own address).
        if changes && !self.rent_limiter.allow_key(peer, now) {
            self.stats.rents_rate_limited += 1;
            return Waiting::Ready(Reply::rate_limited(id));
        }
        match req.command {
            Command::Rent { partner, ttl: t } => {
                if !authority::may_rent(peer, &self.served) {
                    return Waiting::Ready(Reply::not_served(id, peer));
                }
                match nat.rent(peer, partner, ttl(t), now) {
                    Ok(l) => {
                        let expires = l.expires.map_or(store.wall(now), |e| store.wall(e));
                        let seq = nat.durable_needed().unwrap_or(0);
                        debug!("rent: real={peer} partner={partner} virtual={}", l.virtual_addr);
                        Waiting::Commit(seq, Reply::leased(id, l.virtual_addr, expires))
                    }
                    Err(
                        LeaseError::PoolExhausted | LeaseError::TableFull | LeaseError::HostLimit,
                    ) => Waiting::Ready(Reply::no_address(id)),
                    Err(LeaseError::NotServed) => Waiting::Ready(Reply::not_served(id, peer)),
                    Err(LeaseError::StoreFailing) => {
                        self.stats.store_refused += 1;
                        Waiting::Ready(Reply::internal(id))
                    }
                    Err(e) => Waiting::Ready(Reply::bad_request(id, e.to_string())),
                }
            }
            Command::Renew { virtual_addr, ttl: t } => {
                let mine = nat.leases_on(peer, virtual_addr);
                if mine.is_empty() {
                    return Waiting::Ready(Reply::not_permitted(id));
                }
                let mut expires = store.wall(now);
                for l in mine {
                    if let Ok(r) = nat.renew(l.id, ttl(t), now) {
                        expires = r.expires.map_or(expires, |e| store.wall(e));
                    }
                }
                let seq = nat.durable_needed().unwrap_or(0);
                Waiting::Commit(seq, Reply::leased(id, virtual_addr, expires))
            }
            Command::Release { virtual_addr } => {
                let mine = nat.leases_on(peer, virtual_addr);
                if mine.is_empty() {
                    return Waiting::Ready(Reply::not_permitted(id));
                }
                for l in mine {
                    let _ = nat.release(l.id, now);
                }
                debug!("release: real={peer} virtual={virtual_addr}");
                let seq = nat.durable_needed().unwrap_or(0);
                Waiting::Commit(seq, Reply::released(id))
            }
            Command::Inquire { virtual_addr, at } => {
                if !self.limiter.allow(peer, now) {
                    self.stats.rate_limited += 1;
                    return Waiting::Ready(Reply::rate_limited(id));
                }
                match at {
                    None => match nat.lease_for(virtual_addr, peer) {
                        Some(l) => Waiting::Ready(Reply::real(id, l.real)),
                        None => {
                            self.stats.inquiries_refused += 1;
                            Waiting::Ready(Reply::not_permitted(id))
                        }
                    },
                    Some(t) if t > store.wall(now) => {
                        self.stats.inquiries_refused += 1;
                        Waiting::Ready(Reply::not_permitted(id))
                    }
                    Some(t) => Waiting::Query(store.who_was(virtual_addr, peer, t), id),
                }
            }
        }
    }

    /// Everything up to `seq` is durable: the replies that waited for it may go.
    pub fn committed(&mut self, seq: u64, registry: &Registry) {
        self.each_conn(registry, |c| {
            for w in c.waiting.iter_mut() {
                if let Waiting::Commit(s, r) = w {
                    if *s <= seq {
                        *w = Waiting::Ready(r.clone());
                    }
                }
            }
        });
    }

    /// The store could not write for too long: every reply waiting for a commit becomes
    /// `internal` (its change was not stored). Returns how many.
    pub fn store_failed(&mut self, registry: &Registry) -> usize {
        let mut n = 0;
        self.each_conn(registry, |c| {
            for w in c.waiting.iter_mut() {
                if let Waiting::Commit(_, r) = w {
                    *w = Waiting::Ready(Reply::internal(r.id.clone()));
                    n += 1;
                }
            }
        });
        n
    }

    /// The store answered an inquiry about the past.
    pub fn answered(&mut self, token: u64, real: Option<IpAddr>, registry: &Registry) {
        let mut refused = false;
        self.each_conn(registry, |c| {
            for w in c.waiting.iter_mut() {
                if let Waiting::Query(t, id) = w {
                    if *t == token {
                        let id = id.clone();
                        *w = Waiting::Ready(match real {
                            Some(r) => Reply::real(id, r),
                            None => {
                                refused = true;
                                Reply::not_permitted(id)
                            }
                        });
                    }
                }
            }
        });
        if refused {
            self.stats.inquiries_refused += 1;
        }
    }

    /// A store query failed: the waiting inquiry gets `internal`.
    pub fn query_failed(&mut self, token: u64, registry: &Registry) {
        warn!("an inquiry about the past failed in the store");
        self.each_conn(registry, |c| {
            for w in c.waiting.iter_mut() {
                if let Waiting::Query(t, id) = w {
                    if *t == token {
                        *w = Waiting::Ready(Reply::internal(id.clone()));
                    }
                }
            }
        });
    }

    /// Applies `f` to every connection, then sends what became ready.
    fn each_conn(&mut self, registry: &Registry, mut f: impl FnMut(&mut Conn)) {
        for slot in 0..self.conns.len() {
            let Some(mut c) = self.conns[slot].take() else { continue };
            f(&mut c);
            let alive = Self::pump(&mut c).is_ok();
            self.settle(slot, c, alive, registry);
        }
    }

    /// Closes connections past their deadline; returns the earliest deadline left.
    pub fn expire(&mut self, now: Instant, registry: &Registry) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for slot in self.conns.iter_mut() {
            if slot.as_ref().is_some_and(|c| c.deadline <= now) {
                if let Some(mut c) = slot.take() {
                    self.stats.broken_connections += 1;
                    let _ = registry.deregister(&mut c.sock);
                }
            } else if let Some(c) = slot.as_ref() {
                next = Some(next.map_or(c.deadline, |n| n.min(c.deadline)));
            }
        }
        next
    }

    /// Number of open connections.
    pub fn open_connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }
}
