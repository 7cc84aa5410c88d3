//! The local control socket: one JSON request per line, one JSON reply per line, over a Unix
//! socket of mode 0600 (only root reaches it). `vipgate leases` and `vipgate stats` are its
//! clients; the tables it shows are never exposed on a network port.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// Largest request line accepted.
pub const MAX_REQUEST: usize = 4096;

/// Binds the listening control socket at `path` with mode 0600 from its first moment.
///
/// A socket takes its mode from the umask at `bind`, and a `chmod` after it leaves a window in
/// which anyone the umask allows may connect. Setting the umask around the bind would change
/// it for the whole process while other threads (the store's writer) create files, so the
/// socket is bound instead inside a fresh private directory next to `path` (mode 0700: nobody
/// else can reach what is inside), set to 0600 there, and renamed into place. A stale socket
/// at `path` is replaced by the rename; the caller checks that no daemon answers on it.
pub fn bind_private(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".vipgate-bind-{}", std::process::id()));
    let inside = private.join("s");
    // A leftover of a crashed run with the same pid.
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&inside)
            .with_context(|| format!("cannot bind {}", path.display()))?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", inside.display()))?;
        std::fs::rename(&inside, path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Parses one request line of the control socket; a key given twice is refused (see
/// [`crate::json`]).
pub fn parse_request(line: &[u8]) -> serde_json::Result<Request> {
    crate::json::parse_as(line)
}

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The current leases.
    Leases,
    /// Counters and table sizes.
    Stats,
    /// The lease history (newest first), optionally of one virtual address and/or at one
    /// moment (RFC 3339). Reply: `{"history": [HistoryRecord, ...]}`.
    History {
        /// Only this virtual address.
        #[serde(rename = "virtual", default, skip_serializing_if = "Option::is_none")]
        virtual_addr: Option<IpAddr>,
        /// Only leases that were live at this moment (RFC 3339).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
        /// At most this many rows (default 1000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Ends leases now (the operator's revoke): every lease on `virtual`, or only those of
    /// host `real` or towards `partner`. Their addresses go into quarantine as on release.
    /// Reply: `{"revoked": [LeaseRecord, ...]}`.
    Revoke {
        /// The virtual address.
        #[serde(rename = "virtual")]
        virtual_addr: IpAddr,
        /// Only the leases of this host.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        real: Option<IpAddr>,
        /// Only the lease towards this partner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partner: Option<IpAddr>,
    },
}

/// One row of the lease history as the control socket shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The host's real address.
    pub real: IpAddr,
    /// The virtual address.
    #[serde(rename = "virtual")]
    pub virtual_addr: IpAddr,
    /// The partner.
    pub partner: IpAddr,
    /// "explicit" or "implicit".
    pub origin: String,
    /// Start, RFC 3339.
    pub start: String,
    /// End, RFC 3339, or none while the lease lives.
    pub end: Option<String>,
    /// Why it ended ("expired", "idle", "released", "replaced").
    pub end_reason: Option<String>,
}

/// One lease as the control socket shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The host's real address.
    pub real: IpAddr,
    /// The virtual address.
    #[serde(rename = "virtual")]
    pub virtual_addr: IpAddr,
    /// The partner.
    pub partner: IpAddr,
    /// "explicit" or "implicit".
    pub origin: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// End time, RFC 3339, when known.
    pub expires: Option<String>,
    /// Live flows.
    pub flows: u32,
}

impl LeaseRecord {
    /// The record of a translator lease.
    pub fn of(l: &crate::nat::Lease, now: Instant) -> LeaseRecord {
        LeaseRecord {
            real: l.real,
            virtual_addr: l.virtual_addr,
            partner: l.partner,
            origin: match l.origin {
                crate::nat::Origin::Explicit => "explicit".into(),
                crate::nat::Origin::Implicit => "implicit".into(),
            },
            created: rfc3339(l.created, now),
            expires: l.expires.map(|e| rfc3339(e, now)),
            flows: l.flows,
        }
    }
}

/// The wall-clock time of monotonic instant `t`, RFC 3339 (UTC, seconds).
pub fn rfc3339(t: Instant, now: Instant) -> String {
    let wall = SystemTime::now();
    let at = if t <= now { wall - (now - t) } else { wall + (t - now) };
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Counters and table sizes of a running gateway. The translator's counters are flattened
/// in (same JSON keys), its drop counters given by reason name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Leases held.
    pub leases: usize,
    /// Flows held.
    pub flows: usize,
    /// Addresses in quarantine.
    pub quarantined: usize,
    /// Packets read from the TUN.
    pub tun_rx: u64,
    /// Packets written to the TUN.
    pub tun_tx: u64,
    /// Failed TUN writes.
    pub tun_write_errors: u64,
    /// Frames read from each TUN queue (`--queues`), queue 0 first.
    #[serde(default)]
    pub tun_rx_per_queue: Vec<u64>,
    /// Bytes read from the TUN (IP packets, without virtio-net headers).
    #[serde(default)]
    pub tun_rx_bytes: u64,
    /// Super-packets (GSO, several segments in one) read from the TUN.
    #[serde(default)]
    pub tun_super_packets: u64,
    /// Bytes read from the TUN in super-packets.
    #[serde(default)]
    pub tun_super_packet_bytes: u64,
    /// Frames dropped because their virtio-net header was unusable.
    #[serde(default)]
    pub tun_offload_errors: u64,
    /// Segments written one by one after the kernel refused a super-packet.
    #[serde(default)]
    pub tun_segmented_in_software: u64,
    /// The translator's counters.
    #[serde(flatten)]
    pub translator: crate::nat::Counters,
    /// Held packets dropped because too many were waiting.
    pub held_dropped: u64,
    /// Lease-store commits that failed (each attempt; the store retries).
    pub store_failures: u64,
    /// Held packets dropped because the store could not write their lease.
    #[serde(default)]
    pub held_unstored: u64,
    /// Rents, renews and releases answered `internal` because the store could not write.
    #[serde(default)]
    pub store_refused: u64,
    /// Authority connections accepted.
    pub authority_connections: u64,
    /// Authority connections closed on arrival (too many open).
    pub authority_refused_connections: u64,
    /// Authority connections ended by a TLS error or a deadline.
    pub authority_broken_connections: u64,
    /// Authority requests answered.
    pub authority_requests: u64,
    /// Inquiries refused (any cause; the asker cannot tell which).
    pub inquiries_refused: u64,
    /// Inquiries over the per-source rate limit.
    pub inquiries_rate_limited: u64,
    /// Rents, renews and releases over their host's rate (`--rent-rate`).
    #[serde(default)]
    pub rents_rate_limited: u64,
    /// Drops per reason.
    pub drops: BTreeMap<String, u64>,
}

impl Stats {
    /// Fills the translator's part of the stats.
    pub fn from_translator(t: &crate::nat::Translator) -> Stats {
        let c = t.counters();
        let (leases, flows, quarantined) = t.table_sizes();
        Stats {
            leases,
            flows,
            quarantined,
            translator: c.clone(),
            drops: crate::nat::DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), c.dropped(*r)))
                .collect(),
            ..Stats::default()
        }
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(o, "# HELP vipgate_{name} {help}\n# TYPE vipgate_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(o, "vipgate_{name}{labels} {v}");
            }
        };
        let out = [
            ("{direction=\"outbound\"}", self.translator.outbound),
            ("{direction=\"inbound\"}", self.translator.inbound),
            ("{direction=\"hairpin\"}", self.translator.hairpinned),
        ];
        metric("packets_forwarded_total", "counter", "Packets translated and forwarded.", &out);
        let drops: Vec<(String, u64)> =
            self.drops.iter().map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v)).collect();
        let drops: Vec<(&str, u64)> = drops.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        metric("packets_dropped_total", "counter", "Packets dropped, by reason.", &drops);
        metric(
            "icmp_errors_translated_total",
            "counter",
            "ICMP errors translated.",
            &[("", self.translator.icmp_errors_translated)],
        );
        metric(
            "icmp_errors_sent_total",
            "counter",
            "ICMP errors originated by the gateway.",
            &[("", self.translator.replies)],
        );
        metric(
            "icmp_errors_rate_limited_total",
            "counter",
            "ICMP errors not sent (rate limit).",
            &[("", self.translator.replies_rate_limited)],
        );
        metric(
            "tun_packets_read_total",
            "counter",
            "Packets read from the TUN device.",
            &[("", self.tun_rx)],
        );
        metric(
            "tun_packets_written_total",
            "counter",
            "Packets written to the TUN device.",
            &[("", self.tun_tx)],
        );
        metric(
            "tun_write_errors_total",
            "counter",
            "Failed writes to the TUN device.",
            &[("", self.tun_write_errors)],
        );
        let queues: Vec<(String, u64)> = self
            .tun_rx_per_queue
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{{queue=\"{i}\"}}"), *v))
            .collect();
        let queues: Vec<(&str, u64)> = queues.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        metric(
            "tun_queue_packets_read_total",
            "counter",
            "Frames read from each queue of the TUN device.",
            &queues,
        );
        metric(
            "tun_bytes_read_total",
            "counter",
            "Bytes of IP packets read from the TUN device.",
            &[("", self.tun_rx_bytes)],
        );
        metric(
            "tun_super_packets_read_total",
            "counter",
            "GSO super-packets read from the TUN device (offloads on).",
            &[("", self.tun_super_packets)],
        );
        metric(
            "tun_super_packet_bytes_read_total",
            "counter",
            "Bytes read from the TUN device in super-packets.",
            &[("", self.tun_super_packet_bytes)],
        );
        metric(
            "tun_offload_errors_total",
            "counter",
            "Frames dropped for an unusable virtio-net header.",
            &[("", self.tun_offload_errors)],
        );
        metric(
            "tun_segmented_in_software_total",
            "counter",
            "Segments written one by one after the kernel refused a super-packet.",
            &[("", self.tun_segmented_in_software)],
        );
        metric(
            "packets_passed_total",
            "counter",
            "Packets not about any lease, passed on unchanged.",
            &[("", self.translator.passed)],
        );
        metric(
            "packets_held_total",
            "counter",
            "Packets held until their lease was durable.",
            &[("", self.translator.held)],
        );
        metric(
            "packets_held_dropped_total",
            "counter",
            "Packets that found no room to wait for their lease (held queue full).",
            &[("", self.held_dropped)],
        );
        metric(
            "store_failures_total",
            "counter",
            "Lease-store commits that failed.",
            &[("", self.store_failures)],
        );
        metric(
            "packets_held_unstored_total",
            "counter",
            "Held packets dropped because the store could not write their lease.",
            &[("", self.held_unstored)],
        );
        metric(
            "store_refused_total",
            "counter",
            "Rents, renews and releases answered internal because the store could not write.",
            &[("", self.store_refused)],
        );
        let conns = [
            ("{outcome=\"accepted\"}", self.authority_connections),
            ("{outcome=\"refused\"}", self.authority_refused_connections),
            ("{outcome=\"broken\"}", self.authority_broken_connections),
        ];
        metric("authority_connections_total", "counter", "Authority connections.", &conns);
        metric(
            "authority_requests_total",
            "counter",
            "Authority requests answered.",
            &[("", self.authority_requests)],
        );
        metric(
            "rents_rate_limited_total",
            "counter",
            "Rents, renews and releases over their host's rate (--rent-rate).",
            &[("", self.rents_rate_limited)],
        );
        let inq = [
            ("{outcome=\"refused\"}", self.inquiries_refused),
            ("{outcome=\"rate_limited\"}", self.inquiries_rate_limited),
        ];
        metric(
            "inquiries_not_answered_total",
            "counter",
            "Inquiries refused or rate-limited.",
            &inq,
        );
        metric("leases", "gauge", "Leases held.", &[("", self.leases as u64)]);
        metric("flows", "gauge", "Flows held.", &[("", self.flows as u64)]);
        metric(
            "quarantined_addresses",
            "gauge",
            "Addresses in quarantine.",
            &[("", self.quarantined as u64)],
        );
        metric(
            "leases_created_total",
            "counter",
            "Leases created.",
            &[("", self.translator.leases_created)],
        );
        metric(
            "leases_ended_total",
            "counter",
            "Leases ended.",
            &[("", self.translator.leases_ended)],
        );
        metric(
            "flows_created_total",
            "counter",
            "Flows created.",
            &[("", self.translator.flows_created)],
        );
        metric(
            "flows_ended_total",
            "counter",
            "Flows ended.",
            &[("", self.translator.flows_ended)],
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the gateway started.",
            &[("", self.uptime_secs)],
        );
        o
    }
}

/// Sends one request to the daemon at `socket` and returns its JSON reply.
pub fn query(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the gateway at {} (is `vipgate gateway` running? see --control-socket)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).context("no reply from the gateway")?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("malformed reply from the gateway")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("the gateway refused: {e}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        assert_eq!(serde_json::to_string(&Request::Leases).unwrap(), r#"{"cmd":"leases"}"#);
        let r: Request = serde_json::from_str(r#"{"cmd":"stats"}"#).unwrap();
        assert_eq!(r, Request::Stats);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
        assert_eq!(parse_request(br#"{"cmd":"stats"}"#).unwrap(), Request::Stats);
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vipgate-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// The socket is 0600 from the first moment anyone can see it, whatever the umask (a
    /// watcher looks at the path all the time while it is bound again and again), it works,
    /// it replaces a stale socket, and nothing is left beside it.
    #[test]
    fn socket_is_private_from_its_first_moment() {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = temp_dir("bind");
        let path = dir.join("control.sock");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut seen, mut loose) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        if m.file_type().is_socket() {
                            seen += 1;
                            if m.permissions().mode() & 0o777 != 0o600 {
                                loose.push(m.permissions().mode() & 0o777);
                            }
                        }
                    }
                }
                (seen, loose)
            })
        };
        for _ in 0..300 {
            let l = bind_private(&path).expect("bind");
            drop(l);
            std::fs::remove_file(&path).expect("rm");
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, loose) = watcher.join().expect("watcher");
        assert!(seen > 0, "the watcher saw the socket");
        assert!(loose.is_empty(), "seen {} times with another mode: {:o}", loose.len(), loose[0]);
        // A stale socket (nobody listening; bound here with the umask's mode, so after the
        // watcher stopped) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let l = bind_private(&path).expect("bind over a stale socket");
        UnixStream::connect(&path).expect("connect");
        drop(l.accept().expect("accept"));
        let names: Vec<_> =
            std::fs::read_dir(&dir).expect("ls").map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["control.sock"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A key given twice is refused. (serde's derived `Request` already refused most of these
    /// by itself; the shared parser makes it one rule for every protocol.)
    #[test]
    fn duplicate_keys_are_refused() {
        for line in [
            &br#"{"cmd":"bogus","cmd":"leases"}"#[..],
            br#"{"cmd":"revoke","virtual":"198.18.0.7","virtual":"198.18.0.8"}"#,
        ] {
            let e = parse_request(line).expect_err("refused").to_string();
            assert!(e.contains("duplicate key"), "{e}");
        }
    }

    #[test]
    fn prometheus_text() {
        let mut s = Stats { leases: 2, ..Stats::default() };
        s.translator.outbound = 5;
        s.drops.insert("filtered".into(), 3);
        let t = s.prometheus();
        assert!(t.contains("# TYPE vipgate_packets_forwarded_total counter"));
        assert!(t.contains("vipgate_packets_forwarded_total{direction=\"outbound\"} 5"));
        assert!(t.contains("vipgate_packets_dropped_total{reason=\"filtered\"} 3"));
        assert!(t.contains("vipgate_leases 2\n"));
    }
}
