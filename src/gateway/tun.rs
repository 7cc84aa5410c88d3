//! The TUN device: raw IP packets in and out, non-blocking, no packet-info header, and
//! optionally the kernel's segmentation and checksum offloads.
//!
//! With offloads (`IFF_VNET_HDR` and `TUNSETOFFLOAD`), every read starts with a 10-byte
//! virtio-net header ([`crate::wire::vnet`]) and may return a TCP (or, where the kernel has
//! USO, UDP) super-packet of up to 64 KB with a partial checksum; every write must start with
//! such a header and may hand a super-packet back. One read and one write then move up to
//! 44 full-sized segments. This is the only module with `unsafe`: the ioctls and the
//! `writev` below.

use anyhow::{bail, Result};
use log::info;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::OffloadMode;
use crate::wire::vnet::{self, VnetHdr};

/// TSO for both families and checksum offload: the set every kernel since 2.6 accepts.
const OFFLOAD_TSO: libc::c_uint =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
/// UDP segmentation offload (Linux 6.2 and later).
const OFFLOAD_USO: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// An open, non-blocking TUN device.
pub struct TunDevice {
    file: File,
    name: String,
    /// Every read and write carries a virtio-net header.
    vnet: bool,
    /// The `TUN_F_*` offloads in force.
    offloads: libc::c_uint,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TunDevice {
    /// Creates (or attaches to) the TUN device `name` in non-blocking mode, with offloads as
    /// `mode` says.
    pub fn open(name: &str, mode: OffloadMode) -> Result<TunDevice> {
        TunDevice::open_queue(name, mode, false)
    }

    /// Creates the multi-queue TUN device `name` and opens `n` queues of it: the kernel
    /// spreads packets over the queues by flow, and each queue is read and written on its own.
    pub fn open_queues(name: &str, mode: OffloadMode, n: usize) -> Result<Vec<TunDevice>> {
        (0..n).map(|_| TunDevice::open_queue(name, mode, true)).collect()
    }

    fn open_queue(name: &str, mode: OffloadMode, multi_queue: bool) -> Result<TunDevice> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            bail!("TUN device name {name:?} must be 1 to 15 bytes");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => anyhow::anyhow!(
                    "cannot open /dev/net/tun ({e}): load the tun module (modprobe tun)"
                ),
                Some(libc::EACCES) | Some(libc::EPERM) => anyhow::anyhow!(
                    "not allowed to open /dev/net/tun ({e}): run as root (CAP_NET_ADMIN)"
                ),
                _ => anyhow::anyhow!("cannot open /dev/net/tun: {e}"),
            })?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut vnet = mode != OffloadMode::Off;
        let mut result = set_iff(&file, &mut req, vnet, multi_queue);
        if vnet && mode == OffloadMode::Auto && errno_of(&result) == Some(libc::EINVAL) {
            // A kernel (or sandbox) without IFF_VNET_HDR: plain packets.
            vnet = false;
            result = set_iff(&file, &mut req, false, multi_queue);
            if result.is_ok() {
                info!("TUN {name}: no virtio-net header here; plain packets, no offloads");
            }
        }
        if let Err(e) = result {
            bail!(match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "TUN device {name} is in use (is another vipgate running?): stop it or choose \
                     another name with --tun"
                ),
                Some(libc::EPERM) =>
                    format!("not allowed to create TUN device {name}: run as root (CAP_NET_ADMIN)"),
                Some(libc::EINVAL) => format!(
                    "cannot create TUN device {name}: {e} (is {name} a device of another kind, or \
                     does this kernel lack IFF_VNET_HDR for --offload on?)"
                ),
                _ => format!("cannot create TUN device {name}: {e}"),
            });
        }
        let got = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        let mut dev = TunDevice { file, name: got, vnet, offloads: 0 };
        if vnet {
            let len = vnet::HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
            if unsafe { libc::ioctl(dev.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
                let e = io::Error::last_os_error();
                bail!("TUN {}: cannot set the virtio-net header size: {e}", dev.name);
            }
            let mut last = io::Error::from_raw_os_error(libc::EINVAL);
            for want in [OFFLOAD_TSO | OFFLOAD_USO, OFFLOAD_TSO] {
                match dev.set_offloads(want) {
                    Ok(()) => break,
                    Err(e) => last = e,
                }
            }
            if dev.offloads == 0 {
                if mode == OffloadMode::On {
                    bail!(
                        "TUN {}: the kernel refuses offloads ({last}); use --offload off",
                        dev.name
                    );
                }
                info!("TUN {}: the kernel refuses offloads ({last}); plain packets", dev.name);
            }
        }
        Ok(dev)
    }

    /// Tells the kernel which offloads to use (`TUN_F_*`; 0 for none).
    pub fn set_offloads(&mut self, flags: libc::c_uint) -> io::Result<()> {
        if !self.vnet {
            return if flags == 0 { Ok(()) } else { Err(io::ErrorKind::Unsupported.into()) };
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.offloads = flags;
        Ok(())
    }

    /// The device name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes of virtio-net header before each packet: [`vnet::HDR_LEN`] or 0.
    pub fn header_len(&self) -> usize {
        if self.vnet {
            vnet::HDR_LEN
        } else {
            0
        }
    }

    /// The offloads in force, as `ethtool -k` would name them.
    pub fn describe_offloads(&self) -> String {
        if !self.vnet {
            return "off".into();
        }
        if self.offloads == 0 {
            return "none (the kernel refused them)".into();
        }
        let names = [
            (libc::TUN_F_CSUM, "csum"),
            (libc::TUN_F_TSO4, "tso4"),
            (libc::TUN_F_TSO6, "tso6"),
            (libc::TUN_F_TSO_ECN, "tso-ecn"),
            (libc::TUN_F_USO4, "uso4"),
            (libc::TUN_F_USO6, "uso6"),
        ];
        let on: Vec<&str> =
            names.iter().filter(|(f, _)| self.offloads & f != 0).map(|(_, n)| *n).collect();
        on.join(",")
    }

    /// True when reads may return super-packets.
    pub fn segments_offloaded(&self) -> bool {
        self.offloads & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0
    }

    /// Reads one frame (the header, when there is one, then the packet); `WouldBlock` when
    /// none is waiting.
    #[inline]
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame as [`recv`](Self::recv) returns them.
    #[inline]
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Writes one frame read from this device (rewritten or not). When the kernel refuses a
    /// super-packet (`EINVAL`: some kernels reject GSO writes of a kind they do not support),
    /// cuts it in software ([`vnet::segment`]) and writes the segments one by one.
    pub fn send_frame(&self, frame: &[u8], scratch: &mut [u8]) -> io::Result<Sent> {
        let Err(e) = self.send(frame) else { return Ok(Sent::Whole) };
        let hdr = self.header(frame);
        if !hdr.is_gso() || e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        let (mut written, mut failed) = (0, 0);
        let packet = &frame[vnet::HDR_LEN..];
        vnet::segment(&hdr, packet, scratch, |seg| match self.send_packet(seg) {
            Ok(_) => written += 1,
            Err(_) => failed += 1,
        })
        .map_err(|_| e)?;
        Ok(Sent::Segmented { written, failed })
    }

    /// Writes one plain packet (full checksums, no segmentation), adding an empty header
    /// when the device expects one.
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<usize> {
        if !self.vnet {
            return self.send(packet);
        }
        let hdr = [0u8; vnet::HDR_LEN];
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut libc::c_void, iov_len: hdr.len() },
            libc::iovec { iov_base: packet.as_ptr() as *mut libc::c_void, iov_len: packet.len() },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths; writev only reads.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Waits (level-triggered) until a frame can be read or `timeout_ms` pass; an
    /// interrupted wait counts as a timeout.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<()> {
        let mut pfd = libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd that lives across the call.
        if unsafe { libc::poll(&mut pfd, 1, timeout_ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The header of a frame read from this device (an empty one without offloads).
    pub fn header(&self, frame: &[u8]) -> VnetHdr {
        if self.vnet && frame.len() >= vnet::HDR_LEN {
            VnetHdr::read(frame)
        } else {
            VnetHdr::default()
        }
    }
}

/// What became of a frame given to [`TunDevice::send_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written as it was.
    Whole,
    /// The kernel refused the super-packet; its segments were written one by one.
    Segmented {
        /// Segments written.
        written: usize,
        /// Segments whose write failed.
        failed: usize,
    },
}

/// Attaches `file` to the TUN device named in `req` (`TUNSETIFF`).
fn set_iff(file: &File, req: &mut IfReq, vnet: bool, multi_queue: bool) -> io::Result<()> {
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if vnet {
        flags |= libc::IFF_VNET_HDR;
    }
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    req.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out (16-byte
    // name, flags, padding to 40 bytes); `req` lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno_of(r: &io::Result<()>) -> Option<i32> {
    r.as_ref().err().and_then(io::Error::raw_os_error)
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
