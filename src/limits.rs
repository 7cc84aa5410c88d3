//! The process's descriptor limit: every connection slot of a daemon's tables is a file
//! descriptor, and systemd's default soft limit (1,024) is below what the tables hold (4,096
//! authority or rendezvous connections alone). At start a daemon raises its soft
//! `RLIMIT_NOFILE` to what its tables need, up to the hard limit, and says in the log what it
//! has; below the need it warns, naming the setting to raise (`LimitNOFILE=`).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors beyond the connection tables: listeners, the TUN queues, the store, logs.
const SPARE: u64 = 256;

/// What [`raise_descriptors`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// What the tables need.
    pub need: u64,
}

impl Descriptors {
    /// Logs [`Descriptors::describe`]: a warning when the tables do not fit.
    pub fn log(&self) {
        if self.now >= self.need {
            log::info!("{}", self.describe());
        } else {
            log::warn!("{}", self.describe());
        }
    }

    /// One log line: what the limit is, and whether the tables fit.
    pub fn describe(&self) -> String {
        if self.now >= self.need && self.now > self.before {
            format!(
                "descriptor limit raised from {} to {} for the connection tables",
                self.before, self.now
            )
        } else if self.now >= self.need {
            format!("descriptor limit {} (the connection tables need {})", self.now, self.need)
        } else {
            format!(
                "descriptor limit {} is below the {} the connection tables need (the hard \
                 limit stops it): connections beyond it are refused; raise LimitNOFILE= (or \
                 `ulimit -n`)",
                self.now, self.need
            )
        }
    }
}

/// Raises the soft descriptor limit to `connections` plus a margin, at most to the hard
/// limit; never lowers it.
pub fn raise_descriptors(connections: usize) -> Descriptors {
    let need = connections as u64 + SPARE;
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let want = need.min(hard);
    if before >= want {
        return Descriptors { before, now: before, need };
    }
    let now =
        match setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: lim.maximum }) {
            Ok(()) => want,
            Err(_) => before,
        };
    Descriptors { before, now, need }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_need_and_never_falls() {
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert!(hard >= 2048, "the test needs a hard limit of at least 2048 (it is {hard})");
        setrlimit(Resource::Nofile, Rlimit { current: Some(1024), maximum: Some(hard) }).unwrap();
        let d = raise_descriptors(1500);
        assert_eq!((d.before, d.now, d.need), (1024, 1756.min(hard), 1756));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(1756.min(hard)));
        let again = raise_descriptors(10);
        assert_eq!(again.now, 1756.min(hard), "a smaller need never lowers the limit");
        assert!(d.describe().contains("raised from 1024 to 1756"), "{}", d.describe());
    }
}
