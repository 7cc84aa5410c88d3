//! The TUN device: raw IP packets in and out, non-blocking, no packet-info header.
//!
//! Kept behind this small type so an offload-capable backend (IFF_VNET_HDR, multi-queue) can
//! replace the tun-tap crate later without touching the event loop.

use anyhow::{Context, Result};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use tun_tap::{Iface, Mode};

/// An open, non-blocking TUN device.
pub struct TunDevice {
    iface: Iface,
}

impl TunDevice {
    /// Creates (or attaches to) the TUN device `name` in non-blocking mode.
    pub fn open(name: &str) -> Result<TunDevice> {
        let iface =
            Iface::without_packet_info(name, Mode::Tun).map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => anyhow::anyhow!(
                    "TUN device {name} is in use (is another vipgate running?): stop it or choose \
                 another name with --tun"
                ),
                Some(libc::EPERM) => anyhow::anyhow!(
                    "not allowed to create TUN device {name}: run as root (CAP_NET_ADMIN)"
                ),
                _ => anyhow::anyhow!("cannot create TUN device {name}: {e}"),
            })?;
        iface.set_non_blocking().context("cannot make the TUN device non-blocking")?;
        Ok(TunDevice { iface })
    }

    /// The device name the kernel gave.
    pub fn name(&self) -> &str {
        self.iface.name()
    }

    /// Reads one packet; `WouldBlock` when none is waiting.
    #[inline]
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.iface.recv(buf)
    }

    /// Writes one packet.
    #[inline]
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.iface.send(packet)
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.iface.as_raw_fd()
    }
}
