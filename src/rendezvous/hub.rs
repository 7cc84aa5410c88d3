//! The rendezvous server's logic without I/O: sessions, presence, the same-network bit, the
//! relay of offers and answers. The event loop feeds it connections and request lines and
//! sends what it puts in [`Hub::outbox`]; password hashing, the one slow step, is handed back
//! to the loop ([`Outcome`]) to run off the loop's thread.

use super::protocol::{self, Code, Endpoint, Op, Request};
use super::store::{Accounts, Standing};
use ipnet::IpNet;
use log::{info, warn};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

/// A connection, as the loop numbers them.
pub type ConnId = usize;

/// How long an offer may wait for its answer.
pub const OFFER_TTL: Duration = Duration::from_secs(30);
/// Most unanswered offers one connection may have.
pub const MAX_OFFERS_PER_CONN: usize = 16;
/// Most logged-in connections per account.
pub const MAX_SESSIONS_PER_USER: usize = 16;

/// When two registered global addresses count as one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    /// IPv4 addresses are compared on this many leading bits (32: exactly).
    pub mask_v4: u8,
    /// IPv6 addresses are compared on this many leading bits.
    pub mask_v6: u8,
    /// Address pools of gateways (e.g. a vipgate pool): any two addresses inside the same
    /// prefix are one network.
    pub pools: Vec<IpNet>,
}

impl Default for Locality {
    fn default() -> Self {
        Locality { mask_v4: 32, mask_v6: 64, pools: Vec::new() }
    }
}

impl Locality {
    /// The one bit: are `a` and `b` on the same network?
    pub fn same(&self, a: IpAddr, b: IpAddr) -> bool {
        let (a, b) = (a.to_canonical(), b.to_canonical());
        if self.pools.iter().any(|p| p.contains(&a) && p.contains(&b)) {
            return true;
        }
        match (a, b) {
            (IpAddr::V4(x), IpAddr::V4(y)) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.mask_v4.min(32))).unwrap_or(0);
                u32::from(x) & m == u32::from(y) & m
            }
            (IpAddr::V6(x), IpAddr::V6(y)) => {
                let m = u128::MAX.checked_shl(128 - u32::from(self.mask_v6.min(128))).unwrap_or(0);
                u128::from(x) & m == u128::from(y) & m
            }
            _ => false,
        }
    }
}

/// What the loop must do to finish a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing: the reply is in the outbox.
    Done,
    /// Check `password` against `phc` (`None`: the account does not exist; check against a
    /// dummy hash so both cases take the same time), then call [`Hub::logged_in_checked`].
    Verify {
        /// The request id.
        id: Value,
        /// The account.
        user: String,
        /// The password given.
        password: String,
        /// The stored hash.
        phc: Option<String>,
        /// The login asked to listen.
        listen: bool,
    },
    /// Hash `password`, then call [`Hub::registered`].
    Hash {
        /// The request id.
        id: Value,
        /// The new account.
        user: String,
        /// Its password.
        password: String,
    },
}

/// Counters of the hub.
#[derive(Debug, Default, Clone)]
pub struct HubStats {
    /// Successful logins.
    pub logins: u64,
    /// Refused logins.
    pub failed_logins: u64,
    /// Accounts created.
    pub registrations: u64,
    /// Same-network questions answered (either way).
    pub same_network: u64,
    /// Requests refused with `not_permitted`.
    pub not_permitted: u64,
    /// Offers and answers relayed.
    pub relayed: u64,
}

struct Session {
    addr: IpAddr,
    user: Option<String>,
    listen: bool,
    reported: Option<SocketAddr>,
}

struct Offer {
    from_conn: ConnId,
    from_user: String,
    to_user: String,
    expires: Instant,
}

/// The rendezvous state. See the module docs.
pub struct Hub {
    locality: Locality,
    reveal: bool,
    accounts: Accounts,
    sessions: HashMap<ConnId, Session>,
    /// Logged-in connections of each online account, oldest first.
    online: HashMap<String, Vec<ConnId>>,
    offers: HashMap<u64, Offer>,
    next_offer: u64,
    /// Lines to send: (connection, line).
    pub outbox: Vec<(ConnId, Vec<u8>)>,
    /// Counters.
    pub stats: HubStats,
}

impl Hub {
    /// A hub over `accounts`.
    pub fn new(accounts: Accounts, locality: Locality, reveal: bool, first_offer: u64) -> Hub {
        Hub {
            locality,
            reveal,
            accounts,
            sessions: HashMap::new(),
            online: HashMap::new(),
            offers: HashMap::new(),
            next_offer: first_offer.max(1),
            outbox: Vec::new(),
            stats: HubStats::default(),
        }
    }

    /// A connection from `addr` was accepted.
    pub fn connected(&mut self, conn: ConnId, addr: IpAddr) {
        let s = Session { addr: addr.to_canonical(), user: None, listen: false, reported: None };
        self.sessions.insert(conn, s);
    }

    /// A connection closed: its account may go offline.
    pub fn closed(&mut self, conn: ConnId) {
        let Some(s) = self.sessions.remove(&conn) else { return };
        self.offers.retain(|_, o| o.from_conn != conn);
        let Some(user) = s.user else { return };
        let Some(list) = self.online.get_mut(&user) else { return };
        list.retain(|&c| c != conn);
        if list.is_empty() {
            self.online.remove(&user);
            info!("{user} is offline");
            self.announce(&user, false);
        }
    }

    /// Number of online accounts.
    pub fn online_users(&self) -> usize {
        self.online.len()
    }

    /// Number of open connections (logged in or not).
    pub fn connections(&self) -> usize {
        self.sessions.len()
    }

    /// True when `conn` is logged in.
    pub fn logged_in(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_some_and(|s| s.user.is_some())
    }

    fn reply(&mut self, conn: ConnId, line: Vec<u8>) {
        self.outbox.push((conn, line));
    }

    fn refuse(&mut self, conn: ConnId, id: &Value, code: Code) -> Outcome {
        if code == Code::NotPermitted {
            self.stats.not_permitted += 1;
        }
        self.reply(conn, protocol::error(id, code));
        Outcome::Done
    }

    fn internal(&mut self, conn: ConnId, id: &Value, e: impl std::fmt::Display) -> Outcome {
        warn!("rendezvous database: {e}");
        self.refuse(conn, id, Code::Internal)
    }

    /// Handles one request of `conn`.
    pub fn request(&mut self, conn: ConnId, req: Request, now: Instant) -> Outcome {
        let Request { id, op } = req;
        let Some(session) = self.sessions.get(&conn) else { return Outcome::Done };
        let me = session.user.clone();
        match (op, me) {
            (Op::Ping {}, _) => {
                self.reply(conn, protocol::ok(&id, json!({})));
                Outcome::Done
            }
            (Op::Register { .. } | Op::Login { .. }, Some(_)) => {
                self.refuse(conn, &id, Code::AlreadyLoggedIn)
            }
            (Op::Register { user, password }, None) => match self.accounts.password_hash(&user) {
                Ok(Some(_)) => self.refuse(conn, &id, Code::NameTaken),
                Ok(None) => Outcome::Hash { id, user, password },
                Err(e) => self.internal(conn, &id, e),
            },
            (Op::Login { user, password, listen }, None) => {
                match self.accounts.password_hash(&user) {
                    Ok(phc) => Outcome::Verify { id, user, password, phc, listen },
                    Err(e) => self.internal(conn, &id, e),
                }
            }
            (_, None) => self.refuse(conn, &id, Code::NotLoggedIn),
            (op, Some(me)) => self.logged_in_request(conn, &id, &me, op, now),
        }
    }

    fn logged_in_request(
        &mut self,
        conn: ConnId,
        id: &Value,
        me: &str,
        op: Op,
        now: Instant,
    ) -> Outcome {
        match op {
            Op::BuddyAdd { user } => {
                if user == me {
                    let msg = "you cannot be your own buddy";
                    self.reply(conn, protocol::error_msg(id, Code::BadRequest, msg));
                    return Outcome::Done;
                }
                self.ask(conn, id, me, &user, false)
            }
            Op::BuddyAccept { user } => self.ask(conn, id, me, &user, true),
            Op::BuddyRemove { user } => match self.accounts.remove(me, &user) {
                Ok(before) => {
                    if before != Standing::None {
                        info!("{me} removed {user}");
                        self.push_to(&user, "buddy_removed", json!({"user": me}));
                    }
                    self.reply(conn, protocol::ok(id, json!({})));
                    Outcome::Done
                }
                Err(e) => self.internal(conn, id, e),
            },
            Op::BuddyList {} => match self.accounts.relations(me) {
                Ok(rel) => {
                    let list: Vec<Value> = rel
                        .into_iter()
                        .map(|(name, st)| {
                            let mut v = json!({"user": name, "state": st.as_str()});
                            if st == Standing::Mutual {
                                v["online"] = Value::Bool(self.online.contains_key(&name));
                            }
                            v
                        })
                        .collect();
                    self.reply(conn, protocol::ok(id, json!({ "buddies": list })));
                    Outcome::Done
                }
                Err(e) => self.internal(conn, id, e),
            },
            Op::SameNetwork { user } => {
                let Some(theirs) = self.buddy_session(me, &user) else {
                    return self.refuse(conn, id, Code::NotPermitted);
                };
                let mine = self.sessions[&conn].addr;
                let same = self.locality.same(mine, self.sessions[&theirs].addr);
                self.stats.same_network += 1;
                self.reply(conn, protocol::ok(id, json!({ "same": same })));
                Outcome::Done
            }
            Op::AddressOf { user } => {
                if !self.reveal {
                    return self.refuse(conn, id, Code::Disabled);
                }
                let Some(theirs) = self.buddy_session(me, &user) else {
                    return self.refuse(conn, id, Code::NotPermitted);
                };
                let s = &self.sessions[&theirs];
                let mut fields = json!({ "address": s.addr.to_string() });
                if let Some(r) = s.reported {
                    fields["endpoint"] = Value::String(r.to_string());
                }
                self.reply(conn, protocol::ok(id, fields));
                Outcome::Done
            }
            Op::ReportEndpoint { endpoint } => {
                if let Some(s) = self.sessions.get_mut(&conn) {
                    s.reported = Some(endpoint);
                }
                self.reply(conn, protocol::ok(id, json!({})));
                Outcome::Done
            }
            Op::Offer { user, endpoint } => self.offer(conn, id, me, &user, endpoint, now),
            Op::Answer { session, endpoint } => self.answer(conn, id, me, session, endpoint, now),
            Op::Ping {} | Op::Register { .. } | Op::Login { .. } => Outcome::Done,
        }
    }

    /// `buddy_add` (`accept_only` false) and `buddy_accept` (true).
    fn ask(
        &mut self,
        conn: ConnId,
        id: &Value,
        me: &str,
        user: &str,
        accept_only: bool,
    ) -> Outcome {
        let before = match self.accounts.standing(me, user) {
            Ok(st) => st,
            Err(e) => return self.internal(conn, id, e),
        };
        if accept_only && !matches!(before, Standing::Incoming | Standing::Mutual) {
            return self.refuse(conn, id, Code::NoRequest);
        }
        let st = match self.accounts.ask(me, user) {
            Ok(st) => st,
            Err(e) => return self.internal(conn, id, e),
        };
        match st {
            // Asked again: nothing changed, nobody is told again.
            _ if st == before => {}
            Standing::Mutual => {
                info!("{me} and {user} are buddies");
                self.push_to(user, "buddy_accepted", json!({"user": me}));
                // Each sees the other's presence from now on.
                if self.online.contains_key(user) {
                    self.push_to(me, "presence", json!({"user": user, "online": true}));
                    self.push_to(user, "presence", json!({"user": me, "online": true}));
                }
            }
            _ => self.push_to(user, "buddy_request", json!({"user": me})),
        }
        self.reply(conn, protocol::ok(id, json!({ "state": st.as_str() })));
        Outcome::Done
    }

    /// The newest logged-in connection of `user` if it is a mutual buddy of `me` and online.
    fn buddy_session(&self, me: &str, user: &str) -> Option<ConnId> {
        let newest = *self.online.get(user)?.last()?;
        match self.accounts.standing(me, user) {
            Ok(Standing::Mutual) => Some(newest),
            _ => None,
        }
    }

    fn offer(
        &mut self,
        conn: ConnId,
        id: &Value,
        me: &str,
        user: &str,
        endpoint: Endpoint,
        now: Instant,
    ) -> Outcome {
        if self.buddy_session(me, user).is_none() {
            return self.refuse(conn, id, Code::NotPermitted);
        }
        let listeners: Vec<ConnId> = self.online[user]
            .iter()
            .copied()
            .filter(|c| self.sessions.get(c).is_some_and(|s| s.listen))
            .collect();
        if listeners.is_empty() {
            return self.refuse(conn, id, Code::NotListening);
        }
        self.expire(now);
        if self.offers.values().filter(|o| o.from_conn == conn).count() >= MAX_OFFERS_PER_CONN {
            return self.refuse(conn, id, Code::Busy);
        }
        let session = self.next_offer;
        self.next_offer += 1;
        let offer = Offer {
            from_conn: conn,
            from_user: me.to_string(),
            to_user: user.to_string(),
            expires: now + OFFER_TTL,
        };
        self.offers.insert(session, offer);
        let ev = relayed("offer", me, session, &endpoint);
        for c in listeners {
            self.outbox.push((c, ev.clone()));
        }
        self.stats.relayed += 1;
        info!("offer {session}: {me} -> {user} ({})", endpoint.kind.as_str());
        self.reply(conn, protocol::ok(id, json!({ "session": session })));
        Outcome::Done
    }

    fn answer(
        &mut self,
        conn: ConnId,
        id: &Value,
        me: &str,
        session: u64,
        endpoint: Endpoint,
        now: Instant,
    ) -> Outcome {
        self.expire(now);
        let mine = self.offers.get(&session).is_some_and(|o| o.to_user == me);
        if !mine {
            return self.refuse(conn, id, Code::NoSuchOffer);
        }
        let Some(o) = self.offers.remove(&session) else { return Outcome::Done };
        // Still buddies? (A removal between offer and answer ends the exchange.)
        if self.buddy_session(me, &o.from_user).is_none() {
            return self.refuse(conn, id, Code::NotPermitted);
        }
        self.outbox.push((o.from_conn, relayed("answer", me, session, &endpoint)));
        self.stats.relayed += 1;
        info!("answer {session}: {me} -> {} ({})", o.from_user, endpoint.kind.as_str());
        self.reply(conn, protocol::ok(id, json!({})));
        Outcome::Done
    }

    /// Drops offers past their time.
    pub fn expire(&mut self, now: Instant) {
        self.offers.retain(|_, o| o.expires > now);
    }

    /// The worker checked a login's password.
    pub fn logged_in_checked(
        &mut self,
        conn: ConnId,
        id: &Value,
        user: &str,
        listen: bool,
        ok: bool,
    ) {
        let Some(s) = self.sessions.get(&conn) else { return };
        if !ok {
            self.stats.failed_logins += 1;
            info!("login as {user} from {} refused", s.addr);
            self.refuse(conn, id, Code::LoginFailed);
            return;
        }
        if s.user.is_some() {
            self.refuse(conn, id, Code::AlreadyLoggedIn);
            return;
        }
        if self.online.get(user).is_some_and(|l| l.len() >= MAX_SESSIONS_PER_USER) {
            let msg = format!("{user} has {MAX_SESSIONS_PER_USER} sessions already; log one out");
            self.reply(conn, protocol::error_msg(id, Code::Busy, &msg));
            return;
        }
        let addr = s.addr;
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.user = Some(user.to_string());
            s.listen = listen;
        }
        self.stats.logins += 1;
        let first = !self.online.contains_key(user);
        self.online.entry(user.to_string()).or_default().push(conn);
        info!("{user} logged in from {addr}{}", if listen { " (listening)" } else { "" });
        self.reply(conn, protocol::ok(id, json!({ "address": addr.to_string() })));
        // The new session learns who is online; the buddies learn about it (once).
        let buddies = self.accounts.buddies(user).unwrap_or_default();
        for b in buddies {
            if self.online.contains_key(&b) {
                self.outbox
                    .push((conn, protocol::event("presence", json!({"user": b, "online": true}))));
            }
        }
        if first {
            self.announce(user, true);
        }
    }

    /// The worker hashed a new account's password (`Err`: it failed).
    pub fn registered(
        &mut self,
        conn: ConnId,
        id: &Value,
        user: &str,
        phc: Result<String, String>,
    ) {
        let created = match phc {
            Ok(phc) => self.accounts.create(user, &phc, SystemTime::now()),
            Err(e) => {
                self.internal(conn, id, e);
                return;
            }
        };
        match created {
            Ok(true) => {
                self.stats.registrations += 1;
                info!("account {user} registered");
                self.reply(conn, protocol::ok(id, json!({})));
            }
            Ok(false) => {
                self.refuse(conn, id, Code::NameTaken);
            }
            Err(e) => {
                self.internal(conn, id, e);
            }
        }
    }

    /// Tells the online mutual buddies of `user` that it came online or went offline.
    fn announce(&mut self, user: &str, online: bool) {
        let buddies = self.accounts.buddies(user).unwrap_or_default();
        for b in buddies {
            self.push_to(&b, "presence", json!({"user": user, "online": online}));
        }
    }

    /// Pushes an event to every logged-in connection of `user`.
    fn push_to(&mut self, user: &str, name: &str, fields: Value) {
        let Some(conns) = self.online.get(user) else { return };
        let ev = protocol::event(name, fields);
        for &c in conns {
            self.outbox.push((c, ev.clone()));
        }
    }
}

fn relayed(name: &str, from: &str, session: u64, e: &Endpoint) -> Vec<u8> {
    protocol::event(
        name,
        json!({
            "user": from,
            "session": session,
            "kind": e.kind.as_str(),
            "endpoint": e.endpoint.to_string(),
            "token": e.token,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::TempDir;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn locality_masks_and_pools() {
        let exact = Locality::default();
        assert!(exact.same(ip("203.0.113.5"), ip("203.0.113.5")));
        assert!(!exact.same(ip("203.0.113.5"), ip("203.0.113.6")));
        assert!(exact.same(ip("::ffff:203.0.113.5"), ip("203.0.113.5")), "v4-mapped is v4");
        assert!(exact.same(ip("2001:db8:1:2::1"), ip("2001:db8:1:2::99")), "IPv6 /64 by default");
        assert!(!exact.same(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1")));
        assert!(!exact.same(ip("203.0.113.5"), ip("2001:db8::1")), "families never match");
        let masked = Locality { mask_v4: 24, mask_v6: 48, pools: vec![] };
        assert!(masked.same(ip("203.0.113.5"), ip("203.0.113.200")));
        assert!(!masked.same(ip("203.0.113.5"), ip("198.51.100.5")));
        assert!(masked.same(ip("2001:db8:1:2::1"), ip("2001:db8:1:ffff::1")));
        let zero = Locality { mask_v4: 0, mask_v6: 0, pools: vec![] };
        assert!(zero.same(ip("192.0.2.1"), ip("198.51.100.1")), "/0: every address");
        let pooled =
            Locality { pools: vec!["198.51.100.0/24".parse().unwrap()], ..Locality::default() };
        assert!(pooled.same(ip("198.51.100.7"), ip("198.51.100.200")));
        assert!(!pooled.same(ip("198.51.100.7"), ip("203.0.113.7")), "one inside, one outside");
    }

    struct Fixture {
        _dir: TempDir,
        hub: Hub,
        now: Instant,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = TempDir::new("hub");
            let accounts = Accounts::open(&dir.path().join("r.db")).expect("open");
            let locality =
                Locality { pools: vec!["198.51.100.0/24".parse().unwrap()], ..Locality::default() };
            Fixture {
                _dir: dir,
                hub: Hub::new(accounts, locality, false, 100),
                now: Instant::now(),
            }
        }

        /// Connection `conn` from `addr`, logged in as `user` (account created if missing).
        fn login(&mut self, conn: ConnId, addr: &str, user: &str, listen: bool) {
            let _ = self.hub.accounts.create(user, "phc", SystemTime::now());
            self.hub.connected(conn, ip(addr));
            self.hub.logged_in_checked(conn, &json!(0), user, listen, true);
            self.take(conn);
        }

        fn buddies(&mut self, x: &str, y: &str) {
            self.hub.accounts.ask(x, y).unwrap();
            self.hub.accounts.ask(y, x).unwrap();
        }

        fn call(&mut self, conn: ConnId, op: Value) -> Value {
            let mut req = op;
            req["id"] = json!(1);
            let r = protocol::parse(&serde_json::to_vec(&req).unwrap()).expect("valid request");
            assert_eq!(self.hub.request(conn, r, self.now), Outcome::Done);
            let mine: Vec<Value> =
                self.take(conn).into_iter().filter(|v| v.get("id").is_some()).collect();
            assert_eq!(mine.len(), 1, "one reply: {mine:?}");
            mine[0].clone()
        }

        /// The lines queued for `conn` (removed from the outbox), parsed.
        fn take(&mut self, conn: ConnId) -> Vec<Value> {
            let (mine, rest): (Vec<_>, Vec<_>) =
                self.hub.outbox.drain(..).partition(|(c, _)| *c == conn);
            self.hub.outbox = rest;
            mine.into_iter().map(|(_, l)| serde_json::from_slice(&l).unwrap()).collect()
        }
    }

    fn token() -> &'static str {
        "0123456789abcdef0123456789abcdef"
    }

    #[test]
    fn the_bit_goes_only_to_mutual_online_buddies_and_refusals_are_identical() {
        let mut f = Fixture::new();
        f.login(1, "198.51.100.7", "alice", false);
        f.login(2, "198.51.100.99", "bob", false);
        f.login(3, "203.0.113.20", "carol", false);
        f.buddies("alice", "bob");
        f.buddies("alice", "carol");
        assert_eq!(f.call(1, json!({"op": "same_network", "user": "bob"}))["same"], true);
        assert_eq!(f.call(1, json!({"op": "same_network", "user": "carol"}))["same"], false);
        f.hub.accounts.ask("bob", "carol").unwrap(); // one way only
        let mut refusals: Vec<Value> = ["carol", "nobody", "bob"]
            .iter()
            .map(|u| {
                f.call(if *u == "bob" { 3 } else { 2 }, json!({"op": "same_network", "user": u}))
            })
            .collect();
        for r in &mut refusals {
            assert_eq!(r["error"], "not_permitted", "{r}");
        }
        assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
        // Offline buddy: the same refusal.
        f.hub.closed(2);
        assert_eq!(
            f.call(1, json!({"op": "same_network", "user": "bob"}))["error"],
            "not_permitted"
        );
        // Never an address in any reply.
        assert_eq!(f.call(1, json!({"op": "address_of", "user": "carol"}))["error"], "disabled");
    }

    #[test]
    fn presence_is_announced_once_per_account_and_only_to_buddies() {
        let mut f = Fixture::new();
        f.buddies("alice", "bob");
        f.login(1, "192.0.2.1", "alice", false);
        f.login(2, "192.0.2.2", "bob", false);
        let ev = f.take(1);
        assert_eq!(ev, vec![json!({"event": "presence", "user": "bob", "online": true})]);
        f.login(3, "192.0.2.3", "bob", false); // a second session: no new announcement
        assert!(f.take(1).is_empty());
        f.login(4, "192.0.2.4", "mallory", false);
        assert!(f.take(1).is_empty(), "a stranger's login is not announced");
        f.hub.closed(2);
        assert!(f.take(1).is_empty(), "bob still has a session");
        f.hub.closed(3);
        assert_eq!(f.take(1), vec![json!({"event": "presence", "user": "bob", "online": false})]);
    }

    #[test]
    fn offers_reach_listening_buddies_and_answers_only_the_offerer() {
        let mut f = Fixture::new();
        f.buddies("alice", "bob");
        f.login(1, "192.0.2.1", "alice", false);
        f.login(2, "192.0.2.2", "bob", false);
        let offer = json!({"op": "offer", "user": "bob", "kind": "global",
                           "endpoint": "192.0.2.1:4000", "token": token()});
        assert_eq!(f.call(1, offer.clone())["error"], "not_listening");
        f.login(3, "192.0.2.2", "bob", true);
        let r = f.call(1, offer.clone());
        let session = r["session"].as_u64().expect("session");
        let ev = f.take(3);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0]["event"], "offer");
        assert_eq!(ev[0]["user"], "alice");
        assert_eq!(ev[0]["endpoint"], "192.0.2.1:4000");
        assert!(f.take(2).is_empty(), "only listening sessions get offers");
        // Someone else cannot answer it.
        f.login(4, "192.0.2.9", "mallory", false);
        let answer = json!({"op": "answer", "session": session, "kind": "global",
                            "endpoint": "192.0.2.2:5000", "token": token()});
        assert_eq!(f.call(4, answer.clone())["error"], "no_such_offer");
        assert_eq!(f.call(3, answer.clone())["ok"], true);
        let ev = f.take(1);
        assert_eq!(ev[0]["event"], "answer");
        assert_eq!(ev[0]["session"], session);
        assert_eq!(ev[0]["endpoint"], "192.0.2.2:5000");
        assert_eq!(f.call(3, answer)["error"], "no_such_offer", "answered once");
        // Expired offers cannot be answered.
        let s2 = f.call(1, offer)["session"].as_u64().unwrap();
        f.now += OFFER_TTL + Duration::from_secs(1);
        let late = json!({"op": "answer", "session": s2, "kind": "global",
                          "endpoint": "192.0.2.2:5000", "token": token()});
        assert_eq!(f.call(3, late)["error"], "no_such_offer");
        // A non-buddy's offer is refused like everything else.
        let to_alice = json!({"op": "offer", "user": "alice", "kind": "global",
                              "endpoint": "192.0.2.9:4000", "token": token()});
        assert_eq!(f.call(4, to_alice)["error"], "not_permitted");
    }

    #[test]
    fn reveal_mode_hands_a_buddy_the_registered_address_and_nothing_to_others() {
        let mut f = Fixture::new();
        f.hub.reveal = true;
        f.buddies("alice", "bob");
        f.login(1, "192.0.2.1", "alice", false);
        f.login(2, "::ffff:203.0.113.9", "bob", false);
        f.login(3, "192.0.2.3", "mallory", false);
        let report = json!({"op": "report_endpoint", "endpoint": "203.0.113.9:40000"});
        assert_eq!(f.call(2, report)["ok"], true);
        let r = f.call(1, json!({"op": "address_of", "user": "bob"}));
        assert_eq!(r["address"], "203.0.113.9");
        assert_eq!(r["endpoint"], "203.0.113.9:40000");
        let r = f.call(3, json!({"op": "address_of", "user": "bob"}));
        assert_eq!(r["error"], "not_permitted");
    }

    #[test]
    fn a_password_check_that_ends_after_its_connection_changes_nothing() {
        let mut f = Fixture::new();
        let _ = f.hub.accounts.create("alice", "phc", SystemTime::now());
        f.hub.connected(7, ip("192.0.2.1"));
        f.hub.closed(7);
        f.hub.connected(8, ip("192.0.2.2")); // the next connection
        f.hub.logged_in_checked(7, &json!(1), "alice", false, true);
        assert!(!f.hub.logged_in(7) && !f.hub.logged_in(8));
        assert_eq!(f.hub.online_users(), 0);
        assert!(f.hub.outbox.is_empty(), "{:?}", f.hub.outbox);
    }

    #[test]
    fn requests_before_login_and_double_logins_are_refused() {
        let mut f = Fixture::new();
        f.hub.connected(1, ip("192.0.2.1"));
        assert_eq!(f.call(1, json!({"op": "buddy_list"}))["error"], "not_logged_in");
        assert_eq!(f.call(1, json!({"op": "ping"}))["ok"], true);
        f.login(2, "192.0.2.2", "alice", false);
        let again = json!({"op": "login", "user": "alice", "password": "whatever-1"});
        assert_eq!(f.call(2, again)["error"], "already_logged_in");
        f.hub.logged_in_checked(1, &json!(5), "alice", false, false);
        assert_eq!(f.take(1)[0]["error"], "login_failed");
        assert_eq!(f.call(2, json!({"op": "buddy_add", "user": "alice"}))["error"], "bad_request");
    }
}
