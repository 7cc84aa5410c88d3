//! The translator core: pools, the lease (correspondence) table, the flow table, and
//! `translate(packet, now) -> Verdict`. No sockets, no clock reads, no logging, no allocation
//! per packet: time is passed in, randomness is seeded by the caller, capacity is reserved up
//! front and a full table refuses explicitly.
//!
//! # Driving it
//! ```
//! use std::time::Instant;
//! use vipgate::nat::{Config, Translator, Verdict};
//! let now = Instant::now();
//! let config = Config::new(vec!["192.0.2.0/24".parse().unwrap()],
//!                          vec!["198.18.0.0/24".parse().unwrap()]);
//! let mut t = Translator::new(config, [7; 32], now).unwrap();
//! let mut packet = [0u8; 20]; // a packet read from the TUN device
//! match t.translate(&mut packet, now) {
//!     Verdict::Forward(_) => { /* write `packet` back to the TUN */ }
//!     Verdict::Reply(_, reply) => { /* write `reply` to the TUN */ let _ = reply; }
//!     Verdict::Drop(reason) => { let _ = reason; }
//!     Verdict::Hold => { /* keep it until `t.set_durable(..)` covers its lease */ }
//!     Verdict::Pass => { /* not about any lease: write `packet` back as it came */ }
//! }
//! // Sleep until `t.poll_timeout()`, then call `t.handle_timeout(now)`;
//! // drain `t.poll_event()` to log or persist lease changes (each with a sequence number).
//! while let Some((_seq, _event)) = t.poll_event() {}
//! ```
//!
//! # The model (see `docs/architecture.md`)
//! A lease binds *(real, virtual, partner)*. Under [`Mapping::PerPartner`] a host gets a
//! different virtual address per partner and a virtual address may serve several hosts whose
//! partners differ; inbound packets are demultiplexed by *(virtual, sender)*. Under
//! [`Mapping::PerHost`] a host keeps one virtual address for all partners, and each partner it
//! contacts is still recorded as its own lease (the partners allowed back in, and the ones
//! allowed to inquire).

mod fast;
mod flow;
mod host;
mod index;
mod lease;
mod life;
pub use life::{GRANULARITY_MS, PERIOD_MS};
mod pool;
mod prefetch;
mod reply;
mod slab;
mod translate;
mod wheel;

pub use flow::tcp_state;
pub use pool::{Pool, PrefixSet};

use crate::wire::Wide;
use flow::{FlowTable, FlowTimeouts};
use ipnet::IpNet;
use lease::LeaseTable;
use rand_chacha::ChaCha12Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// "No deadline" in the internal millisecond clock.
pub(crate) const NEVER: u64 = u64::MAX;

/// How a host's virtual address is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mapping {
    /// A different virtual address per partner (the seeds' triple; default).
    #[default]
    PerPartner,
    /// One virtual address per host for all partners (endpoint-independent mapping).
    PerHost,
}

impl std::fmt::Display for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mapping::PerPartner => "per-partner",
            Mapping::PerHost => "per-host",
        })
    }
}

/// Who may send to a virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filtering {
    /// Only the lease's partner(s) (address-dependent filtering; default).
    #[default]
    Partner,
    /// Anyone (endpoint-independent filtering); a new sender gets its own lease.
    Any,
}

impl std::fmt::Display for Filtering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Filtering::Partner => "partner",
            Filtering::Any => "any",
        })
    }
}

/// Idle timers. The defaults are the RFC floors; [`Config::validate`] refuses lower values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// UDP flows (RFC 4787 REQ-5: at least 2 min, 5 min recommended).
    pub udp: Duration,
    /// Established TCP flows (RFC 5382 REQ-5: at least 2 h 4 min).
    pub tcp_established: Duration,
    /// Opening or closing TCP flows, and after RST (RFC 5382 REQ-5, RFC 7857 §3.1-3.2).
    pub tcp_transitory: Duration,
    /// ICMP echo flows (RFC 5508 REQ-2: at least 60 s).
    pub icmp_query: Duration,
    /// How long an implicit lease outlives its last flow.
    pub lease_idle: Duration,
    /// How long a released address is held back from other hosts (RFC 6888 REQ-8: 120 s).
    pub quarantine: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            udp: Duration::from_secs(300),
            tcp_established: Duration::from_secs(7440),
            tcp_transitory: Duration::from_secs(240),
            icmp_query: Duration::from_secs(60),
            lease_idle: Duration::ZERO,
            quarantine: Duration::from_secs(120),
        }
    }
}

/// The translator's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The real (served) prefixes: packets from here go out under a virtual address.
    pub lan: Vec<IpNet>,
    /// The pool prefixes: virtual addresses come from here.
    pub pools: Vec<IpNet>,
    /// Pool addresses never handed out.
    pub exclude: Vec<IpNet>,
    /// Mapping policy.
    pub mapping: Mapping,
    /// Filtering policy.
    pub filtering: Filtering,
    /// Idle timers.
    pub timeouts: Timeouts,
    /// Most leases held at once; more are refused (never evicted, RFC 6888 REQ-11).
    pub max_leases: usize,
    /// Most flows held at once.
    pub max_flows: usize,
    /// Most leases one host holds at once (RFC 6888 REQ-4); more are refused and counted.
    pub max_leases_per_host: usize,
    /// Most flows one host holds at once.
    pub max_flows_per_host: usize,
    /// Source of the ICMP errors the translator originates for IPv4 (RFC 7600's dummy
    /// address 192.0.0.8 by default).
    pub icmp_source_v4: Ipv4Addr,
    /// Source of the ICMPv6 errors the translator originates; none: no ICMPv6 errors.
    pub icmp_source_v6: Option<Ipv6Addr>,
    /// Most ICMP errors originated per second (RFC 1812 §4.3.2.8 rate limiting).
    pub icmp_rate: u32,
    /// Lease events kept until [`Translator::poll_event`] takes them; more are counted lost.
    pub event_capacity: usize,
    /// Hold packets of a lease until it is durable: a driver that stores leases turns this on
    /// and reports its commits with [`Translator::set_durable`]; see [`Verdict::Hold`].
    pub hold_until_durable: bool,
}

impl Config {
    /// A configuration with defaults for everything but the served and pool prefixes.
    pub fn new(lan: Vec<IpNet>, pools: Vec<IpNet>) -> Config {
        Config {
            lan,
            pools,
            exclude: Vec::new(),
            mapping: Mapping::default(),
            filtering: Filtering::default(),
            timeouts: Timeouts::default(),
            max_leases: 65_536,
            max_flows: 1 << 20,
            max_leases_per_host: 4096,
            max_flows_per_host: 65_536,
            icmp_source_v4: Ipv4Addr::new(192, 0, 0, 8),
            icmp_source_v6: None,
            icmp_rate: 100,
            event_capacity: 4096,
            hold_until_durable: false,
        }
    }

    /// Checks the configuration; the error says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lan.is_empty() {
            return Err(ConfigError::NoLan);
        }
        if self.pools.is_empty() {
            return Err(ConfigError::NoPool);
        }
        for p in &self.pools {
            for l in &self.lan {
                if p.contains(&l.network()) || l.contains(&p.network()) {
                    return Err(ConfigError::PoolOverlapsLan { pool: *p, lan: *l });
                }
            }
        }
        for l in &self.lan {
            let same = |p: &&IpNet| p.addr().is_ipv4() == l.addr().is_ipv4();
            if !self.pools.iter().any(|p| same(&p)) {
                return Err(ConfigError::LanFamilyWithoutPool { lan: *l });
            }
        }
        for e in &self.exclude {
            if !self.pools.iter().any(|p| p.contains(&e.network()) || e.contains(&p.network())) {
                return Err(ConfigError::ExcludeOutsidePools { exclude: *e });
            }
        }
        for p in &self.pools {
            if fully_excluded(p, &self.exclude) {
                return Err(ConfigError::PoolFullyExcluded { pool: *p });
            }
        }
        let t = &self.timeouts;
        let d = Timeouts::default();
        for (name, got, floor) in [
            ("udp", t.udp, Duration::from_secs(120)),
            ("tcp-established", t.tcp_established, d.tcp_established),
            ("tcp-transitory", t.tcp_transitory, d.tcp_transitory),
            ("icmp-query", t.icmp_query, d.icmp_query),
        ] {
            if got < floor {
                return Err(ConfigError::TimeoutBelowFloor { name, floor });
            }
        }
        if self.max_leases == 0
            || self.max_flows == 0
            || self.max_leases > u32::MAX as usize / 4
            || self.max_flows > u32::MAX as usize / 2
            || self.max_leases_per_host == 0
            || self.max_flows_per_host == 0
        {
            return Err(ConfigError::Capacity);
        }
        Ok(())
    }
}

/// True when no address of `pool` may ever be handed out: the exclusions cover it, or (for a
/// small pool) they cover every address left once the reserved ones are set aside (the
/// network and broadcast addresses, the subnet-router anycast address).
fn fully_excluded(pool: &IpNet, exclude: &[IpNet]) -> bool {
    let pool = pool.trunc();
    let inside: Vec<IpNet> = exclude
        .iter()
        .filter_map(|e| {
            if e.contains(&pool) {
                Some(pool)
            } else if pool.contains(e) {
                Some(e.trunc())
            } else {
                None
            }
        })
        .collect();
    if IpNet::aggregate(&inside).iter().any(|n| n.contains(&pool)) {
        return true;
    }
    let host_bits = u32::from(pool.max_prefix_len() - pool.prefix_len());
    if host_bits > 12 {
        return false;
    }
    let p = pool::Pool::new(&[pool], exclude);
    !pool.hosts().chain([pool.network(), pool.broadcast()]).any(|a| p.is_allocatable(a))
}

/// A configuration the translator refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No served prefix.
    #[error("no served (LAN) prefix: give at least one, e.g. 192.0.2.0/24")]
    NoLan,
    /// No pool prefix.
    #[error("no pool prefix: give at least one, e.g. 198.18.0.0/24")]
    NoPool,
    /// A pool prefix overlaps a served prefix.
    #[error("pool {pool} overlaps served prefix {lan}: virtual and real addresses must differ")]
    PoolOverlapsLan {
        /// The pool prefix.
        pool: IpNet,
        /// The served prefix.
        lan: IpNet,
    },
    /// A served prefix of a family (IPv4, IPv6) that no pool has.
    #[error(
        "--lan {lan} is {} but no --pool is: its hosts could never get a virtual address; \
         add an {} pool (e.g. --pool {}) or drop the prefix",
        family(lan),
        family(lan),
        example_pool(lan)
    )]
    LanFamilyWithoutPool {
        /// The served prefix.
        lan: IpNet,
    },
    /// An exclusion that lies in no pool.
    #[error(
        "--exclude {exclude} is outside every --pool, so it excludes nothing: fix the prefix \
         or drop it"
    )]
    ExcludeOutsidePools {
        /// The exclusion.
        exclude: IpNet,
    },
    /// A pool none of whose addresses may be handed out.
    #[error(
        "--pool {pool} is entirely covered by --exclude: none of its addresses could ever be \
         handed out; narrow the exclusions or drop the pool"
    )]
    PoolFullyExcluded {
        /// The pool prefix.
        pool: IpNet,
    },
    /// A timer below its RFC floor.
    #[error("{name} timeout below the RFC floor of {floor:?}")]
    TimeoutBelowFloor {
        /// Which timer.
        name: &'static str,
        /// Its floor.
        floor: Duration,
    },
    /// A zero or absurd table capacity.
    #[error(
        "max-leases must be between 1 and 2^30, max-flows between 1 and 2^31, and the \
         per-host limits at least 1"
    )]
    Capacity,
}

fn family(n: &IpNet) -> &'static str {
    if n.addr().is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn example_pool(n: &IpNet) -> &'static str {
    if n.addr().is_ipv4() {
        "198.18.0.0/24"
    } else {
        "2001:db8:ff::/64"
    }
}

/// Why a packet was dropped: feeds a counter per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than its headers or length fields say.
    Truncated,
    /// Not IPv4 or IPv6.
    BadVersion,
    /// Bad IHL or total length.
    BadHeaderLength,
    /// Bad TCP data offset or UDP length.
    BadTransportHeader,
    /// IPv6 extension header misplaced or repeated.
    BadExtensionHeader,
    /// Too many IPv6 extension headers.
    ExtensionChainTooLong,
    /// IPv6 routing header with segments left.
    RoutingHeader,
    /// A protocol other than TCP, UDP, ICMP and ICMPv6.
    UnsupportedProtocol,
    /// An ICMP type other than echo and the errors (RFC 5508 REQ-11).
    IcmpUnsupported,
    /// An ICMP error with a bad checksum (RFC 5508 REQ-3).
    IcmpBadChecksum,
    /// An ICMP error whose embedded packet is malformed or does not fit the outer one.
    IcmpErrorMalformed,
    /// An ICMP error whose embedded packet matches no lease (RFC 5508 REQ-4).
    IcmpErrorNoLease,
    /// To a leased virtual address from a sender that is not its partner.
    Filtered,
    /// To a virtual address nobody holds.
    NoLease,
    /// No virtual address free for this host and partner (RFC 5508 REQ-8).
    PoolExhausted,
    /// The lease table is full.
    LeaseTableFull,
    /// The flow table is full.
    FlowTableFull,
    /// The host holds as many leases as one host may (`max-leases-per-host`).
    HostLeaseLimit,
    /// The host holds as many flows as one host may (`max-flows-per-host`).
    HostFlowLimit,
    /// A partial (offloaded) checksum that is not the TCP or UDP checksum of the packet.
    BadOffload,
    /// A new lease was needed while the lease store cannot write
    /// ([`Translator::set_refuse_leases`]).
    StoreFailing,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 21;
    /// Every reason, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Truncated,
        DropReason::BadVersion,
        DropReason::BadHeaderLength,
        DropReason::BadTransportHeader,
        DropReason::BadExtensionHeader,
        DropReason::ExtensionChainTooLong,
        DropReason::RoutingHeader,
        DropReason::UnsupportedProtocol,
        DropReason::IcmpUnsupported,
        DropReason::IcmpBadChecksum,
        DropReason::IcmpErrorMalformed,
        DropReason::IcmpErrorNoLease,
        DropReason::Filtered,
        DropReason::NoLease,
        DropReason::PoolExhausted,
        DropReason::LeaseTableFull,
        DropReason::FlowTableFull,
        DropReason::HostLeaseLimit,
        DropReason::HostFlowLimit,
        DropReason::BadOffload,
        DropReason::StoreFailing,
    ];

    /// A snake_case name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::BadVersion => "bad_version",
            DropReason::BadHeaderLength => "bad_header_length",
            DropReason::BadTransportHeader => "bad_transport_header",
            DropReason::BadExtensionHeader => "bad_extension_header",
            DropReason::ExtensionChainTooLong => "extension_chain_too_long",
            DropReason::RoutingHeader => "routing_header",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::IcmpUnsupported => "icmp_unsupported",
            DropReason::IcmpBadChecksum => "icmp_bad_checksum",
            DropReason::IcmpErrorMalformed => "icmp_error_malformed",
            DropReason::IcmpErrorNoLease => "icmp_error_no_lease",
            DropReason::Filtered => "filtered",
            DropReason::NoLease => "no_lease",
            DropReason::PoolExhausted => "pool_exhausted",
            DropReason::LeaseTableFull => "lease_table_full",
            DropReason::FlowTableFull => "flow_table_full",
            DropReason::HostLeaseLimit => "host_lease_limit",
            DropReason::HostFlowLimit => "host_flow_limit",
            DropReason::BadOffload => "bad_offload",
            DropReason::StoreFailing => "store_failing",
        }
    }

    /// True when the host should be told with ICMP 3/13 (RFC 5508 REQ-8, RFC 6888 REQ-11).
    pub fn wants_reply(self) -> bool {
        matches!(
            self,
            DropReason::PoolExhausted
                | DropReason::LeaseTableFull
                | DropReason::FlowTableFull
                | DropReason::HostLeaseLimit
                | DropReason::HostFlowLimit
        )
    }
}

impl From<crate::wire::Error> for DropReason {
    fn from(e: crate::wire::Error) -> DropReason {
        use crate::wire::Error as E;
        match e {
            E::Truncated => DropReason::Truncated,
            E::BadVersion => DropReason::BadVersion,
            E::BadHeaderLength => DropReason::BadHeaderLength,
            E::BadTransportHeader => DropReason::BadTransportHeader,
            E::BadExtensionHeader => DropReason::BadExtensionHeader,
            E::ExtensionChainTooLong => DropReason::ExtensionChainTooLong,
            E::RoutingHeader => DropReason::RoutingHeader,
        }
    }
}

/// Which way a forwarded packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host → partner: source rewritten real → virtual.
    Outbound,
    /// Partner → host: destination rewritten virtual → real.
    Inbound,
    /// Host → another host's virtual address: both rewritten (RFC 4787 REQ-9).
    Hairpin,
}

/// What to do with a packet after [`Translator::translate`].
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The packet was rewritten in place: send it on.
    Forward(Direction),
    /// Drop the packet.
    Drop(DropReason),
    /// Drop the packet and send this ICMP error (built in the translator's buffer) instead.
    Reply(DropReason, &'a [u8]),
    /// The packet's lease is not durable yet: the packet is untouched; keep it and translate
    /// it again once [`Translator::set_durable`] has reached [`Translator::durable_needed`].
    Hold,
    /// Not about any lease (neither from a served prefix nor to a pool address, LAN to LAN,
    /// not unicast, or an ICMP error about none of these): the packet is untouched. A gateway
    /// passes it on as it came.
    Pass,
}

/// Packet and table counters (serialisable for the control socket and metrics; the drop
/// counters by reason are shown by name there, not as this array).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Packets forwarded host → partner.
    pub outbound: u64,
    /// Packets forwarded partner → host.
    pub inbound: u64,
    /// Packets hairpinned host → host.
    pub hairpinned: u64,
    /// ICMP errors translated (either way).
    pub icmp_errors_translated: u64,
    /// Packets dropped, per [`DropReason`] (index by `reason as usize`).
    #[serde(skip)]
    pub drops: [u64; DropReason::COUNT],
    /// ICMP errors originated.
    pub replies: u64,
    /// ICMP errors not sent because of the rate limit.
    pub replies_rate_limited: u64,
    /// Leases created (implicit and explicit).
    pub leases_created: u64,
    /// Leases ended.
    pub leases_ended: u64,
    /// Flows created.
    pub flows_created: u64,
    /// Flows ended.
    pub flows_ended: u64,
    /// Lease events lost because nobody took them.
    pub events_lost: u64,
    /// Packets held until their lease was durable.
    pub held: u64,
    /// Packets not about any lease, left untouched ([`Verdict::Pass`]).
    pub passed: u64,
    /// Quarantine entries dropped early because the quarantine was full.
    pub quarantine_evicted: u64,
}

impl Counters {
    /// The drop counter of one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    /// All drops together.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// How a lease came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// Rented by the host (or restored as such); lives until its TTL.
    Explicit,
    #[default]
    /// Made by the gateway on a first packet; lives while its flows live.
    Implicit,
}

/// A typed handle to a lease: slot index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId {
    index: u32,
    generation: u32,
}

/// A lease as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its handle.
    pub id: LeaseId,
    /// The host's real address.
    pub real: IpAddr,
    /// The virtual address.
    pub virtual_addr: IpAddr,
    /// The partner.
    pub partner: IpAddr,
    /// Explicit or implicit.
    pub origin: Origin,
    /// When it was made.
    pub created: Instant,
    /// When it ends, if that is known now (an implicit lease with flows has no end yet).
    pub expires: Option<Instant>,
    /// Live flows.
    pub flows: u32,
    /// Sequence number of the event that created it (durable once the driver reported it).
    pub seq: u64,
}

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// An explicit lease reached its TTL.
    Expired,
    /// An implicit lease's flows ended (and its idle time passed).
    Idle,
    /// Released by its host or removed by the operator.
    Released,
    /// Undone because the store could not write it ([`Translator::abandon_undurable`]).
    Unstored,
}

/// A change in the lease table, for the mapping log and for durable storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A lease was made.
    Created(Lease),
    /// An explicit lease's expiry changed, or an implicit lease became explicit.
    Updated(Lease),
    /// A lease ended.
    Ended(Lease, EndReason),
    /// An implicit lease lives at least `until` (the life a restart gives it; see
    /// [`GRANULARITY_MS`]).
    Lives {
        /// The host's real address.
        real: IpAddr,
        /// The partner.
        partner: IpAddr,
        /// The lease lives at least until then.
        until: Instant,
    },
    /// An ended lease's address is held back from other hosts until `until`: from
    /// `partner` only, or from everyone when `None` (`per-host`).
    Quarantined {
        /// The virtual address.
        virtual_addr: IpAddr,
        /// The partner it is held back from, or none for all.
        partner: Option<IpAddr>,
        /// The host that had it (it may take it back).
        real: IpAddr,
        /// End of the quarantine.
        until: Instant,
    },
}

/// Why a lease operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// The real address is not in a served prefix.
    #[error("address is not in a served prefix")]
    NotServed,
    /// The partner address is in a served prefix or a pool, or of the wrong kind.
    #[error("partner address is not a remote unicast address")]
    BadPartner,
    /// Real and partner are of different families, or there is no pool of that family.
    #[error("no pool of that address family")]
    NoPool,
    /// No virtual address is free.
    #[error("no virtual address available")]
    PoolExhausted,
    /// The lease table is full.
    #[error("lease table full")]
    TableFull,
    /// The host holds as many leases as one host may.
    #[error("this host holds as many leases as one host may")]
    HostLimit,
    /// No such lease.
    #[error("no such lease")]
    NoSuchLease,
    /// A restored lease conflicts with one already held.
    #[error("lease conflicts with an existing one")]
    Conflict,
    /// No new lease while the lease store cannot write ([`Translator::set_refuse_leases`]).
    #[error("the lease store cannot write")]
    StoreFailing,
}

/// The translator: owns the pools, the lease table and the flow table.
pub struct Translator {
    config: Config,
    lan: PrefixSet,
    pool: Pool,
    leases: LeaseTable,
    flows: FlowTable,
    /// Each host's leases and flows.
    hosts: host::HostShares,
    /// Scratch list of due flows / leases for `handle_timeout`.
    due: Vec<u32>,
    events: VecDeque<(u64, LeaseEvent)>,
    counters: Counters,
    rng: ChaCha12Rng,
    epoch: Instant,
    /// The last instant the packet path converted, and its ms since `epoch`.
    clock: (Instant, u64),
    flow_timeouts: FlowTimeouts,
    lease_idle_ms: u64,
    quarantine_ms: u64,
    reply_tokens: u32,
    reply_refill_ms: u64,
    reply_buf: Box<[u8; reply::MAX_REPLY]>,
    hairpin_scratch: Box<[u8]>,
    /// Sequence number of the last event.
    last_seq: u64,
    /// Every event up to this one is durable.
    durable: u64,
    /// No new lease is made (the store cannot write; [`Translator::set_refuse_leases`]).
    refuse_leases: bool,
    /// Until then (ms) the fast path refreshes nothing: timeouts changed, and every flow's
    /// next packet must take the general path once ([`life`]).
    slow_until: u64,
}

impl Translator {
    /// A translator with `config`, its allocation randomness seeded by `seed` (give it
    /// 32 bytes from the OS; tests give a constant). `now` is the epoch of its clock.
    pub fn new(config: Config, seed: [u8; 32], now: Instant) -> Result<Translator, ConfigError> {
        config.validate()?;
        let mut rng = ChaCha12Rng::from_seed(seed);
        let (h1, h2) = (rng.next_u64(), rng.next_u64());
        Ok(Translator {
            lan: PrefixSet::new(&config.lan),
            pool: Pool::new(&config.pools, &config.exclude),
            leases: LeaseTable::new(config.max_leases, h1),
            flows: FlowTable::new(config.max_flows, h2),
            hosts: host::HostShares::new(
                config.max_leases_per_host,
                config.max_flows_per_host,
                h1 ^ h2,
            ),
            due: Vec::with_capacity(1024),
            events: VecDeque::with_capacity(config.event_capacity),
            counters: Counters::default(),
            rng,
            epoch: now,
            clock: (now, 0),
            flow_timeouts: FlowTimeouts::from(&config.timeouts),
            lease_idle_ms: config.timeouts.lease_idle.as_millis() as u64,
            quarantine_ms: config.timeouts.quarantine.as_millis() as u64,
            reply_tokens: config.icmp_rate,
            reply_refill_ms: 0,
            reply_buf: Box::new([0u8; reply::MAX_REPLY]),
            hairpin_scratch: vec![0u8; 65536].into_boxed_slice(),
            last_seq: 0,
            durable: if config.hold_until_durable { 0 } else { u64::MAX },
            refuse_leases: false,
            slow_until: 0,
            config,
        })
    }

    /// Changes the idle timers at run time (a reload): every flow keeps its last packet time
    /// and gets the new timeout of its state from there; the new lease idle time and
    /// quarantine apply to what ends from now on. Refuses timers below the RFC floors.
    pub fn set_timeouts(&mut self, timeouts: Timeouts, now: Instant) -> Result<(), ConfigError> {
        let mut config = self.config.clone();
        config.timeouts = timeouts;
        config.validate()?;
        let new = FlowTimeouts::from(&timeouts);
        self.flows.retime(&self.flow_timeouts, &new);
        self.flow_timeouts = new;
        self.lease_idle_ms = timeouts.lease_idle.as_millis() as u64;
        self.quarantine_ms = timeouts.quarantine.as_millis() as u64;
        self.config = config;
        // The lives handed out so far were worked out with the old timers.
        let now_ms = self.ms(now);
        self.slow_until = life::period_end(now_ms);
        Ok(())
    }

    /// Changes the pool addresses never handed out (a reload): new leases avoid `exclude`,
    /// leases that hold such an address keep it.
    pub fn set_exclude(&mut self, exclude: Vec<IpNet>) -> Result<(), ConfigError> {
        let mut config = self.config.clone();
        config.exclude = exclude;
        config.validate()?;
        self.pool.set_exclude(&config.exclude);
        self.config = config;
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Number of leases, flows and quarantined addresses held.
    pub fn table_sizes(&self) -> (usize, usize, usize) {
        (self.leases.len(), self.flows.len(), self.leases.quarantine.len())
    }

    /// Bytes reserved by the lease table and the flow table (with their indexes).
    pub fn allocation_size(&self) -> (usize, usize) {
        (self.leases.allocation_size(), self.flows.allocation_size())
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// [`Translator::ms`] for the packet path: a packet's `now` is most often the one of the
    /// packet before (the frames of one readiness event), and comparing two instants costs
    /// less than subtracting them.
    #[inline]
    fn packet_ms(&mut self, now: Instant) -> u64 {
        if self.clock.0 != now {
            self.clock = (now, self.ms(now));
        }
        self.clock.1
    }

    fn instant(&self, ms: u64) -> Option<Instant> {
        (ms != NEVER).then(|| self.epoch + Duration::from_millis(ms))
    }

    fn lease_view(&self, i: u32) -> Option<Lease> {
        let l = self.leases.get(i)?;
        Some(Lease {
            id: LeaseId { index: i, generation: self.leases.slab.generation(i) },
            real: l.real,
            virtual_addr: l.virt,
            partner: l.partner,
            origin: l.origin,
            created: self.epoch + Duration::from_millis(l.created),
            expires: self.instant(l.expires),
            flows: l.flows,
            seq: l.seq,
        })
    }

    fn resolve(&self, id: LeaseId) -> Option<u32> {
        self.leases.slab.get_checked(id.index, id.generation).map(|_| id.index)
    }

    /// A lease by handle.
    pub fn lease(&self, id: LeaseId) -> Option<Lease> {
        self.resolve(id).and_then(|i| self.lease_view(i))
    }

    /// Every lease (in no particular order).
    pub fn leases(&self) -> impl Iterator<Item = Lease> + '_ {
        self.leases.slab.iter().filter_map(|(i, _)| self.lease_view(i))
    }

    /// The lease `partner` reaches through `virtual_addr`, if any (the inquiry's lookup).
    pub fn lease_for(&self, virtual_addr: IpAddr, partner: IpAddr) -> Option<Lease> {
        self.leases.find_in(virtual_addr, partner).and_then(|i| self.lease_view(i))
    }

    /// The lease of `real` towards `partner`, if any.
    pub fn lease_of(&self, real: IpAddr, partner: IpAddr) -> Option<Lease> {
        self.leases.find_out(real, partner).and_then(|i| self.lease_view(i))
    }

    /// Every lease of host `real` on `virtual_addr` (one per partner under `per-host`).
    pub fn leases_on(&self, real: IpAddr, virtual_addr: IpAddr) -> Vec<Lease> {
        let mut all = self.leases_at(virtual_addr);
        all.retain(|l| l.real == real);
        all
    }

    /// Every lease on `virtual_addr`, of any host.
    pub fn leases_at(&self, virtual_addr: IpAddr) -> Vec<Lease> {
        self.leases.on_virtual(virtual_addr).filter_map(|i| self.lease_view(i)).collect()
    }

    fn check_pair(&self, real: IpAddr, partner: IpAddr) -> Result<(), LeaseError> {
        if !self.lan.contains(real) {
            return Err(LeaseError::NotServed);
        }
        if real.is_ipv4() != partner.is_ipv4() || !self.pool.prefixes().has_family_of(real) {
            return Err(LeaseError::NoPool);
        }
        if self.lan.contains(partner) || self.pool.contains(partner) || !is_unicast(partner) {
            return Err(LeaseError::BadPartner);
        }
        Ok(())
    }

    /// Rents a virtual address to `real` for talking to `partner`, for `ttl` (seeds 000/001,
    /// claim 1). Renting again for the same partner returns the same lease, its expiry
    /// extended; an implicit lease for the pair becomes explicit.
    pub fn rent(
        &mut self,
        real: IpAddr,
        partner: IpAddr,
        ttl: Duration,
        now: Instant,
    ) -> Result<Lease, LeaseError> {
        self.check_pair(real, partner)?;
        let now_ms = self.ms(now);
        let until = now_ms.saturating_add(ttl.as_millis() as u64);
        if let Some(i) = self.leases.find_out(real, partner) {
            let l = self.leases.get_mut(i).ok_or(LeaseError::NoSuchLease)?;
            let expires = match l.origin {
                Origin::Explicit => l.expires.max(until),
                Origin::Implicit => until,
            };
            l.origin = Origin::Explicit;
            self.leases.set_expires(i, expires);
            let view = self.lease_view(i).ok_or(LeaseError::NoSuchLease)?;
            self.push_event(LeaseEvent::Updated(view.clone()));
            return Ok(view);
        }
        let i = self.create_lease(real, partner, None, Origin::Explicit, now_ms, until).map_err(
            |r| match r {
                DropReason::LeaseTableFull => LeaseError::TableFull,
                DropReason::HostLeaseLimit => LeaseError::HostLimit,
                DropReason::StoreFailing => LeaseError::StoreFailing,
                _ => LeaseError::PoolExhausted,
            },
        )?;
        self.lease_view(i).ok_or(LeaseError::NoSuchLease)
    }

    /// Puts back a lease from durable state after a restart, with its original virtual
    /// address and times. The virtual address must be in the pool and free for the pair.
    pub fn restore(
        &mut self,
        real: IpAddr,
        virtual_addr: IpAddr,
        partner: IpAddr,
        origin: Origin,
        expires: Option<Instant>,
        now: Instant,
    ) -> Result<Lease, LeaseError> {
        self.check_pair(real, partner)?;
        if !self.pool.is_allocatable(virtual_addr) || virtual_addr.is_ipv4() != real.is_ipv4() {
            return Err(LeaseError::Conflict);
        }
        if self.leases.find_out(real, partner).is_some()
            || self.leases.find_in(virtual_addr, partner).is_some()
        {
            return Err(LeaseError::Conflict);
        }
        if self.config.mapping == Mapping::PerHost {
            let other_host = self.leases.sole_host(virtual_addr).is_some_and(|h| h != real);
            let mut mine = self.leases.of_host(real);
            let other_virtual =
                mine.any(|i| self.leases.get(i).is_some_and(|l| l.virt != virtual_addr));
            if other_host || other_virtual {
                return Err(LeaseError::Conflict);
            }
        }
        let now_ms = self.ms(now);
        let expires_ms = match (origin, expires) {
            (_, Some(t)) => self.ms(t).max(now_ms),
            (Origin::Implicit, None) => now_ms.saturating_add(self.lease_idle_ms),
            (Origin::Explicit, None) => NEVER,
        };
        let i = self
            .create_lease(real, partner, Some(virtual_addr), origin, now_ms, expires_ms)
            .map_err(|_| LeaseError::TableFull)?;
        if let (Origin::Implicit, Some(l)) = (origin, self.leases.get_mut(i)) {
            // Its stored life, durable: the lease lives at least that long whatever its
            // flows do after the restart.
            l.floor = expires_ms;
            l.life = expires_ms;
            l.life_pending = (expires_ms, 0);
        }
        self.lease_view(i).ok_or(LeaseError::NoSuchLease)
    }

    /// Restores a quarantine entry from durable state.
    pub fn restore_quarantine(
        &mut self,
        virtual_addr: IpAddr,
        partner: Option<IpAddr>,
        real: IpAddr,
        until: Instant,
        now: Instant,
    ) {
        let (u, n) = (self.ms(until), self.ms(now));
        if u > n {
            self.leases.quarantine.add(virtual_addr, partner, real, u);
        }
    }

    /// Extends or shortens an explicit lease to end `ttl` from now.
    pub fn renew(&mut self, id: LeaseId, ttl: Duration, now: Instant) -> Result<Lease, LeaseError> {
        let i = self.resolve(id).ok_or(LeaseError::NoSuchLease)?;
        let until = self.ms(now).saturating_add(ttl.as_millis() as u64);
        let l = self.leases.get_mut(i).ok_or(LeaseError::NoSuchLease)?;
        l.origin = Origin::Explicit;
        self.leases.set_expires(i, until);
        let view = self.lease_view(i).ok_or(LeaseError::NoSuchLease)?;
        self.push_event(LeaseEvent::Updated(view.clone()));
        Ok(view)
    }

    /// Ends a lease now (released by its host, or revoked by the operator); its flows end
    /// with it and its address goes into quarantine.
    pub fn release(&mut self, id: LeaseId, now: Instant) -> Result<Lease, LeaseError> {
        let i = self.resolve(id).ok_or(LeaseError::NoSuchLease)?;
        let now_ms = self.ms(now);
        self.end_lease(i, now_ms, EndReason::Released).ok_or(LeaseError::NoSuchLease)
    }

    /// The next lease event and its sequence number, if any (creation, update, end,
    /// quarantine), oldest first. Sequence numbers increase by one per event.
    pub fn poll_event(&mut self) -> Option<(u64, LeaseEvent)> {
        self.events.pop_front()
    }

    /// Reports that every event up to `seq` is durable: held packets of leases created up to
    /// there may go (translate them again).
    pub fn set_durable(&mut self, seq: u64) {
        if self.config.hold_until_durable {
            self.durable = self.durable.max(seq);
        }
    }

    /// While `refuse` is true, no new lease is made (rents get [`LeaseError::StoreFailing`],
    /// packets that would need one are dropped as [`DropReason::StoreFailing`]): the driver
    /// says so while its store cannot write, so what waits for the store stays bounded.
    pub fn set_refuse_leases(&mut self, refuse: bool) {
        self.refuse_leases = refuse;
    }

    /// Ends every lease that is not durable yet (its creation's event is past the durable
    /// watermark), without quarantine (no partner ever saw its address under it), with
    /// [`EndReason::Unstored`]: the driver gave up waiting for its store. The `Ended` events
    /// queue like any other (the store writes them once it can). Returns how many ended.
    /// Walks the whole lease table: only for that rare moment.
    pub fn abandon_undurable(&mut self, now: Instant) -> usize {
        let now_ms = self.ms(now);
        let undone: Vec<u32> =
            self.leases.slab.iter().filter(|(_, l)| l.seq > self.durable).map(|(i, _)| i).collect();
        for &i in &undone {
            self.end_lease(i, now_ms, EndReason::Unstored);
        }
        undone.len()
    }

    /// The sequence number held packets wait for (the last event's), when any lease is not
    /// durable yet.
    pub fn durable_needed(&self) -> Option<u64> {
        (self.durable < self.last_seq).then_some(self.last_seq)
    }

    /// True when lease slot `i` is durable.
    pub(crate) fn is_durable(&self, i: u32) -> bool {
        self.leases.get(i).is_some_and(|l| l.seq <= self.durable)
    }

    /// When [`Translator::handle_timeout`] should next be called (never later than the
    /// next deadline; at most one tick of the timer wheel early).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.flows.next_deadline(),
            self.leases.next_deadline(),
            self.leases.quarantine.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .and_then(|ms| self.instant(ms))
    }

    /// Ends every flow, lease and quarantine entry whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now_ms = self.ms(now);
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        self.flows.expire(now_ms, &mut due);
        for &fi in &due {
            let Some((li, ended)) = self.flows.owner(fi) else { continue };
            let Some(lease) = self.leases.get_mut(li) else { continue };
            self.flows.remove(fi, lease);
            self.hosts.add(lease.real, 0, -1);
            self.counters.flows_ended += 1;
            // The idle time counts from when the last flow ended, not from when we noticed.
            self.idle_lease(li, ended);
        }
        due.clear();
        self.leases.expire(now_ms, &mut due);
        for &li in &due {
            let reason = match self.leases.get(li).map(|l| l.origin) {
                Some(Origin::Explicit) => EndReason::Expired,
                Some(Origin::Implicit) => EndReason::Idle,
                None => continue,
            };
            self.end_lease(li, now_ms, reason);
        }
        due.clear();
        self.due = due;
        self.leases.quarantine.expire(now_ms);
        self.counters.quarantine_evicted = self.leases.quarantine.evicted;
    }

    /// Starts the idle countdown of an implicit lease that has no flow left.
    pub(crate) fn idle_lease(&mut self, li: u32, since: u64) {
        let Some(lease) = self.leases.get(li) else { return };
        if lease.flows == 0 && lease.origin == Origin::Implicit {
            let end = since.saturating_add(self.lease_idle_ms).max(lease.floor);
            self.leases.set_expires(li, end);
        }
    }

    /// Queues an event; returns its sequence number. Without durability a full queue drops
    /// the event (counted); with it, an event is never dropped (the queue grows past its
    /// reserved size, outside the packet path's steady state): a lease whose event was lost
    /// would be acknowledged without ever being stored.
    fn push_event(&mut self, e: LeaseEvent) -> u64 {
        self.last_seq += 1;
        if self.events.len() >= self.config.event_capacity && !self.config.hold_until_durable {
            self.counters.events_lost += 1;
        } else {
            self.events.push_back((self.last_seq, e));
        }
        self.last_seq
    }

    /// Creates a lease for `(real, partner)`: with `virt` given (inbound `any` filtering,
    /// restore) or allocated from the pool.
    fn create_lease(
        &mut self,
        real: IpAddr,
        partner: IpAddr,
        virt: Option<IpAddr>,
        origin: Origin,
        now: u64,
        expires: u64,
    ) -> Result<u32, DropReason> {
        if self.refuse_leases {
            return Err(DropReason::StoreFailing);
        }
        // Live leases and quarantined addresses together stay within the quarantine's room,
        // so the quarantine never has to let an address go before its time (RFC 6888 REQ-8).
        if self.leases.len() >= self.config.max_leases
            || self.leases.len() + self.leases.quarantine.len() >= self.leases.quarantine.capacity()
        {
            return Err(DropReason::LeaseTableFull);
        }
        self.hosts.may_lease(real, self.leases.quarantine.held_by(real))?;
        let virt = match virt {
            Some(v) => v,
            None => {
                let mapping = self.config.mapping;
                self.leases.allocate(&self.pool, mapping, real, partner, &mut self.rng, now)?
            }
        };
        let i = self.leases.insert(real, virt, partner, origin, now, expires)?;
        self.hosts.add(real, 1, 0);
        self.counters.leases_created += 1;
        if let Some(mut view) = self.lease_view(i) {
            let seq = self.last_seq + 1;
            view.seq = seq;
            if let Some(l) = self.leases.get_mut(i) {
                l.seq = seq;
            }
            self.push_event(LeaseEvent::Created(view));
        }
        Ok(i)
    }

    fn end_lease(&mut self, i: u32, now: u64, reason: EndReason) -> Option<Lease> {
        let view = self.lease_view(i)?;
        // End the lease's flows.
        let mut f = self.leases.get(i)?.flow_head;
        let mut ended = 0;
        while f != lease::NIL {
            let next = self.flows.next_of(f);
            if let Some(l) = self.leases.get_mut(i) {
                self.flows.remove(f, l);
                self.counters.flows_ended += 1;
                ended += 1;
            }
            f = next;
        }
        self.hosts.add(view.real, -1, -ended);
        // A lease that was never stored was never seen by anyone: nothing to hold back.
        let quarantine = if reason == EndReason::Unstored { 0 } else { self.quarantine_ms };
        let held_back = self.leases.remove(i, now, quarantine, self.config.mapping);
        self.counters.leases_ended += 1;
        self.push_event(LeaseEvent::Ended(view.clone(), reason));
        if let Some((virtual_addr, partner, real, until)) = held_back {
            let until = self.epoch + Duration::from_millis(until);
            self.push_event(LeaseEvent::Quarantined { virtual_addr, partner, real, until });
        }
        Some(view)
    }
}

/// True for an address a lease may name as partner: not unspecified, loopback, multicast or
/// IPv4 broadcast.
fn is_unicast(a: IpAddr) -> bool {
    is_unicast_wide(crate::wire::wide(a), a.is_ipv4())
}

/// [`is_unicast`] of an address as the fast path holds it (IPv4 when `v4`), without a branch
/// on its family: unspecified, loopback (127/8, ::1), multicast (224/4, ff00::/8) and
/// 255.255.255.255 are not.
#[inline(always)]
fn is_unicast_wide(a: Wide, v4: bool) -> bool {
    let x = u32::from_be_bytes(a.v4_octets());
    let v4_special = (x == 0) | (x >> 24 == 127) | (x >> 28 == 0xe) | (x == u32::MAX);
    let y = u128::from_be_bytes(a.octets());
    let v6_special = (y == 0) | (y == 1) | (y >> 120 == 0xff);
    (v4 & !v4_special) | (!v4 & !v6_special)
}

#[cfg(test)]
#[rustfmt::skip]
mod vectors;
#[cfg(test)]
mod tests;
