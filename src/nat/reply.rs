//! ICMP errors the translator originates: "communication administratively prohibited"
//! (ICMP 3/13, ICMPv6 1/1) to a host whose packet could not get a virtual address
//! (RFC 5508 REQ-8, RFC 6888 REQ-11), rate-limited like a router's (RFC 1812 §4.3.2.8).

use super::Translator;
use crate::wire::{self, checksum, icmpv4, icmpv6, ipv4, ipv6, protocol, Fragment, Transport};
use std::net::IpAddr;

/// The largest reply: the IPv6 minimum MTU (RFC 4443 §2.4: as much of the invoking packet as
/// fits in 1280 bytes). IPv4 replies stop at 576 bytes (RFC 1812 §4.3.2.3).
pub const MAX_REPLY: usize = 1280;
const MAX_REPLY_V4: usize = 576;
const ICMP_HEADER: usize = 8;

impl Translator {
    /// Builds the ICMP error for `pkt` into the reply buffer; returns its length, or `None`
    /// when no error may be sent (about an ICMP error, a later fragment, a non-unicast
    /// source, no source address configured, or over the rate limit).
    pub(super) fn build_reply(&mut self, pkt: &[u8], now: u64) -> Option<usize> {
        let d = wire::parse(pkt).ok()?;
        if matches!(d.transport, Transport::IcmpError { .. } | Transport::IcmpOther)
            || d.fragment == Fragment::Later
            || !super::is_unicast(d.src)
        {
            return None;
        }
        if now >= self.reply_refill_ms.saturating_add(1000) {
            self.reply_tokens = self.config.icmp_rate;
            self.reply_refill_ms = now;
        }
        if self.reply_tokens == 0 {
            self.counters.replies_rate_limited += 1;
            return None;
        }
        let buf = &mut self.reply_buf[..];
        let n = match d.src {
            IpAddr::V4(host) => {
                let head = ipv4::MIN_HEADER_LEN + ICMP_HEADER;
                let quote = d.len.min(MAX_REPLY_V4 - head);
                buf[head..head + quote].copy_from_slice(&pkt[..quote]);
                let icmp = &mut buf[ipv4::MIN_HEADER_LEN..head + quote];
                icmp[..ICMP_HEADER].fill(0);
                icmp[0] = icmpv4::DEST_UNREACHABLE;
                icmp[1] = icmpv4::CODE_ADMIN_PROHIBITED;
                let c = checksum::checksum(icmp, 0);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                let src = self.config.icmp_source_v4;
                ipv4::emit_header(buf, src, host, protocol::ICMP, ICMP_HEADER + quote, 64);
                head + quote
            }
            IpAddr::V6(host) => {
                let src = self.config.icmp_source_v6?;
                let head = ipv6::HEADER_LEN + ICMP_HEADER;
                let quote = d.len.min(MAX_REPLY - head);
                buf[head..head + quote].copy_from_slice(&pkt[..quote]);
                let len = ICMP_HEADER + quote;
                ipv6::emit_header(buf, src, host, protocol::ICMPV6, len, 64);
                let pseudo = checksum::pseudo_header_v6(
                    &src.octets(),
                    &host.octets(),
                    protocol::ICMPV6,
                    len as u32,
                );
                let icmp = &mut buf[ipv6::HEADER_LEN..head + quote];
                icmp[..ICMP_HEADER].fill(0);
                icmp[0] = icmpv6::DEST_UNREACHABLE;
                icmp[1] = icmpv6::CODE_ADMIN_PROHIBITED;
                let c = checksum::checksum(icmp, pseudo);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                head + quote
            }
        };
        self.reply_tokens -= 1;
        self.counters.replies += 1;
        Some(n)
    }
}
