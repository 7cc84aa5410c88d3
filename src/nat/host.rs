//! Per-host shares of the tables (RFC 6888 REQ-4: a limit per subscriber): every host's
//! leases and flows are counted, so one host filling its share is refused (counted as
//! `host_lease_limit` / `host_flow_limit`, answered with ICMP 3/13 like a full table) while
//! every other host still gets out. A host's quarantined addresses count against its lease
//! share too, so one host churning leases fills only its own part of the quarantine. Counted
//! when a lease or flow is made or ends, never on the established packet path.

use super::DropReason;
use foldhash::fast::FixedState;
use std::collections::HashMap;
use std::net::IpAddr;

/// What each host holds, and the most it may.
pub struct HostShares {
    held: HashMap<IpAddr, Share, FixedState>,
    max_leases: u32,
    max_flows: u32,
}

/// One host's leases and flows.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    leases: u32,
    flows: u32,
}

impl HostShares {
    /// Shares of at most `max_leases` leases and `max_flows` flows per host.
    pub fn new(max_leases: usize, max_flows: usize, seed: u64) -> HostShares {
        HostShares {
            held: HashMap::with_hasher(FixedState::with_seed(seed)),
            max_leases: u32::try_from(max_leases).unwrap_or(u32::MAX),
            max_flows: u32::try_from(max_flows).unwrap_or(u32::MAX),
        }
    }

    fn share(&self, real: IpAddr) -> Share {
        self.held.get(&real).copied().unwrap_or_default()
    }

    /// May `real`, which has `quarantined` addresses in quarantine, have one more lease? Its
    /// quarantined addresses count against twice its share: a host churning leases (rent,
    /// release, rent again) fills only its own part of the quarantine's room, never the
    /// others'.
    pub fn may_lease(&self, real: IpAddr, quarantined: u32) -> Result<(), DropReason> {
        let leases = self.share(real).leases;
        if leases < self.max_leases
            && leases.saturating_add(quarantined) < self.max_leases.saturating_mul(2)
        {
            Ok(())
        } else {
            Err(DropReason::HostLeaseLimit)
        }
    }

    /// May `real` have one more flow?
    pub fn may_flow(&self, real: IpAddr) -> Result<(), DropReason> {
        if self.share(real).flows < self.max_flows {
            Ok(())
        } else {
            Err(DropReason::HostFlowLimit)
        }
    }

    /// Adds `leases` and `flows` (either may be negative) to `real`'s share.
    pub fn add(&mut self, real: IpAddr, leases: i32, flows: i32) {
        let s = self.held.entry(real).or_default();
        s.leases = s.leases.saturating_add_signed(leases);
        s.flows = s.flows.saturating_add_signed(flows);
        if s.leases == 0 && s.flows == 0 {
            self.held.remove(&real);
        }
    }

    /// The leases and flows `real` holds.
    #[cfg(test)]
    pub fn of(&self, real: IpAddr) -> (u32, u32) {
        let s = self.share(real);
        (s.leases, s.flows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_at_its_share_is_refused_and_another_is_not() {
        let (a, b): (IpAddr, IpAddr) =
            ("192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap());
        let mut h = HostShares::new(2, 3, 1);
        h.add(a, 2, 3);
        assert_eq!(h.may_lease(a, 0), Err(DropReason::HostLeaseLimit));
        assert_eq!(h.may_flow(a), Err(DropReason::HostFlowLimit));
        assert_eq!((h.may_lease(b, 0), h.may_flow(b)), (Ok(()), Ok(())));
        assert_eq!(h.may_lease(b, 3), Ok(()));
        assert_eq!(h.may_lease(b, 4), Err(DropReason::HostLeaseLimit), "its quarantine part");
        h.add(a, -1, -3);
        assert_eq!((h.may_lease(a, 0), h.may_flow(a)), (Ok(()), Ok(())));
        h.add(a, -1, 0);
        assert_eq!(h.of(a), (0, 0));
        assert!(h.held.is_empty(), "an empty share is forgotten");
    }
}
