//! vipgate: rented virtual IP addresses on a Linux gateway.
//!
//! Layers, arrows pointing down only:
//! - [`wire`]: stateless zero-copy packet views and checksums;
//! - [`nat`]: the translator core, a pure state machine driven with explicit time;
//! - the I/O drivers (TUN device, event loop, sockets, storage) built on them.
//!
//! See `docs/architecture.md` for the packet path and where each claim of the source
//! documents lives in the code.

#![deny(unsafe_code)] // except `gateway::tun` (ioctls)
#![warn(missing_docs)]

pub mod authority;
pub mod config;
pub mod control;
pub mod gateway;
pub mod json;
pub mod limits;
pub mod nat;
pub mod peer;
pub mod rendezvous;
pub mod store;
pub mod stun;
pub mod tls;
pub mod wire;
