//! TLS configuration for the rental authority (rustls 0.23, *ring* provider).
//!
//! The authority speaks TLS 1.3 only (seed 001, claim 3: the partner is told the real address
//! "with encrypted communication"). This module builds the two rustls configurations:
//!
//! - [`server_config`]: the authority's side. With an operator-supplied certificate and key
//!   (PEM) it loads them (and only warns when that certificate is about to end: it is never
//!   touched); without, it generates a self-signed ECDSA P-256 certificate into
//!   `<state-dir>/tls/cert.pem` and `<state-dir>/tls/key.pem` and reuses it on every later
//!   start, so the certificate clients pinned keeps working across restarts, until it comes
//!   within [`RENEW_BEFORE`] of its end: then a start replaces it (new key too) and logs the
//!   new fingerprint, and clients must be given the new file.
//!
//! Every server refuses a client that offers no ALPN, or none of its own, in the handshake
//! (RFC 7301 §3.2 `no_application_protocol` alert): a client that has not said it speaks the
//! protocol is not served.
//!
//! The generated certificate (see [`Identity`]): names the service it belongs to (authority or
//! rendezvous server); valid from one hour before its generation (clock skew) for
//! [`CERT_VALIDITY`]; `basicConstraints` `CA:FALSE` (critical), key usage
//! `digitalSignature` (critical), extended key usage `serverAuth`. It is an end-entity
//! certificate and not a CA: clients pin exactly this certificate, it must never sign another
//! one, and a WebPKI verifier (or `openssl verify -partial_chain`) given it as a trust anchor
//! accepts it as it is.
//! - [`client_config`]: the CLI's side. Clients authenticate the authority by **pinning**: the
//!   server is accepted iff its end-entity certificate is byte-identical (DER) to one of the
//!   certificates in the `--ca` PEM file, whatever address or name was used to reach it. If
//!   no certificate matches, normal WebPKI verification runs with the file's certificates as
//!   roots and the server name the client used, so a CA-issued certificate also works.
//!
//! Trust model of a pinned certificate: pinned means trusted. Its validity period, key usage
//! and names are **not** checked by the client (a daemon that runs past its certificate's end
//! keeps serving its pinned clients; the next start renews it); to stop trusting it, remove it
//! from the `--ca` file. The TLS 1.3 handshake signature is
//! always verified against the certificate's public key, so only the holder of the private key
//! can be accepted. The WebPKI fallback checks everything (chain, validity time, name).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls::{ClientConnection, StreamOwned};

/// ALPN protocol identifier of the authority protocol, version 1 (see `docs/protocol.md`).
pub const ALPN: &[u8] = b"vipgate-authority/1";
/// ALPN protocol identifier of the rendezvous protocol, version 1 (see `docs/rendezvous.md`).
pub const RENDEZVOUS_ALPN: &[u8] = b"vipgate-rendezvous/1";

/// What a server is, for its TLS configuration and its generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The ALPN protocol it speaks (and requires of clients).
    pub alpn: &'static [u8],
    /// Subject common name of its generated self-signed certificate.
    pub common_name: &'static str,
    /// DNS subject alternative name of its generated certificate. Clients pin the certificate,
    /// so names do not matter for them; this name is only there for tools that want one.
    pub dns_name: &'static str,
}

/// The rental authority (`vipgate gateway --authority-listen`).
pub const AUTHORITY: Identity =
    Identity { alpn: ALPN, common_name: CERT_COMMON_NAME, dns_name: CERT_DNS_NAME };

/// The rendezvous server (`vipgate rendezvous`).
pub const RENDEZVOUS: Identity = Identity {
    alpn: RENDEZVOUS_ALPN,
    common_name: "vipgate rendezvous server",
    dns_name: "vipgate-rendezvous",
};

/// Subject common name of the authority's generated self-signed certificate.
pub const CERT_COMMON_NAME: &str = "vipgate authority";

/// DNS subject alternative name of the authority's generated certificate.
pub const CERT_DNS_NAME: &str = "vipgate-authority";

/// How long a generated certificate is valid. One year: long enough that re-distributing the
/// pinned file to clients is a yearly chore, not a frequent outage; short enough that a copied
/// key stops being accepted by anything that checks dates, and that the yearly rotation is a
/// routine operators know rather than a once-a-decade surprise.
pub const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A generated certificate that ends within this time is replaced at the next start (and a
/// certificate given with `--authority-cert`/`--cert` is warned about). 30 days: a daemon
/// restarted monthly (upgrades, reboots) renews before the end.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Directory under the state directory that holds the generated certificate and key.
pub const TLS_SUBDIR: &str = "tls";

/// File name of the generated certificate inside [`TLS_SUBDIR`].
pub const CERT_FILE: &str = "cert.pem";

/// File name of the generated private key inside [`TLS_SUBDIR`].
pub const KEY_FILE: &str = "key.pem";

/// The crypto provider every configuration of this crate uses: *ring*.
///
/// Configurations are built with an explicit provider, so nothing depends on (or installs) a
/// process-wide default provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the authority's TLS server configuration and returns it with the path of the
/// certificate in use.
///
/// - `cert` and `key` both given: load them (PEM; the certificate file may hold a chain, leaf
///   first; the key may be PKCS#8, PKCS#1 or SEC1). Errors name the file at fault.
/// - Neither given: use `<state_dir>/tls/cert.pem` and `key.pem`, generating them the first
///   time (self-signed ECDSA P-256, CN [`CERT_COMMON_NAME`], SAN [`CERT_DNS_NAME`]; directory
///   mode 0700, key mode 0600, each file written to a temporary file and renamed into place).
/// - Only one given: an error.
///
/// The configuration is TLS 1.3 only, asks for no client certificate, offers ALPN [`ALPN`]
/// and sends no session tickets (clients are one-shot CLI invocations).
pub fn server_config(
    state_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<(Arc<ServerConfig>, PathBuf)> {
    server_config_for(&AUTHORITY, state_dir, cert, key)
}

/// [`server_config`] for the server `who` (e.g. [`RENDEZVOUS`]).
pub fn server_config_for(
    who: &Identity,
    state_dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<(Arc<ServerConfig>, PathBuf)> {
    let (cert_path, key_path) = match (cert, key) {
        (Some(c), Some(k)) => {
            warn_if_ending(c, SystemTime::now());
            (c.to_path_buf(), k.to_path_buf())
        }
        (None, None) => ensure_generated(state_dir, who, SystemTime::now())?,
        (Some(c), None) => bail!(
            "a TLS certificate was given ({}) but no private key: give the key too, or neither \
             to use the generated self-signed certificate",
            c.display()
        ),
        (None, Some(k)) => bail!(
            "a TLS private key was given ({}) but no certificate: give the certificate too, or \
             neither to use the generated self-signed certificate",
            k.display()
        ),
    };
    let chain = read_certs(&cert_path)?;
    let private_key = read_key(&key_path)?;
    let provider = provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain, private_key, &provider);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the TLS provider does not support TLS 1.3")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(AlpnRequired(Arc::new(certified.map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => anyhow!(
                "the private key in {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => anyhow!(
                "cannot use the certificate {} with the key {}: {other}",
                cert_path.display(),
                key_path.display()
            ),
        })?))));
    config.alpn_protocols = vec![who.alpn.to_vec()];
    config.send_tls13_tickets = 0;
    Ok((Arc::new(config), cert_path))
}

/// Builds the client configuration that authenticates the authority with the certificates of
/// the PEM file `ca` (see the module documentation for pinning and the WebPKI fallback).
///
/// TLS 1.3 only, ALPN [`ALPN`], no client certificate, no session resumption.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    client_config_for(ALPN, ca)
}

/// [`client_config`] for the protocol `alpn` (e.g. [`RENDEZVOUS_ALPN`]).
pub fn client_config_for(alpn: &[u8], ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let certs = read_certs(ca)?;
    let verifier = PinningVerifier::new(certs, provider());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the TLS provider does not support TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// What one [`read_round`] of a non-blocking server connection gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// Records arrived (and their plaintext is in the framer): read again.
    More,
    /// Nothing more to read now.
    Drained,
    /// The client closed its side (TCP FIN or TLS close_notify).
    Eof,
    /// Not TLS, broken TLS, or a socket error: close the connection. A TLS alert was sent as
    /// a last gasp.
    Broken,
}

/// Reads once from `sock` into the TLS session and moves the decrypted bytes into `framer`.
/// Shared by the authority's and the rendezvous server's event loops.
pub(crate) fn read_round(
    tls: &mut rustls::ServerConnection,
    sock: &mut mio::net::TcpStream,
    framer: &mut crate::authority::LineFramer,
) -> Round {
    loop {
        match tls.read_tls(sock) {
            Ok(0) => return Round::Eof,
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Round::Drained,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Round::Broken,
        }
    }
    if let Err(e) = tls.process_new_packets() {
        log::debug!("TLS error from {:?}: {e}", sock.peer_addr().ok());
        if is_no_alpn(&e) {
            // Refused by [`AlpnRequired`]: rustls queued `access_denied`; the client is told
            // what a client with a wrong ALPN is told. Nothing was sent yet (no ServerHello),
            // so this is a plaintext alert record.
            let _ = sock.write(&NO_APPLICATION_PROTOCOL_ALERT);
        } else {
            let _ = tls.write_tls(sock);
        }
        return Round::Broken;
    }
    let mut plain = [0u8; 4096];
    loop {
        match tls.reader().read(&mut plain) {
            Ok(0) => return Round::Eof,
            Ok(n) => framer.feed(&plain[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Round::More,
            Err(_) => return Round::Broken,
        }
    }
}

/// The message of the error rustls reports when [`AlpnRequired`] refused a ClientHello.
const NO_CERT_RESOLVED: &str = "no server certificate chain resolved";

/// A fatal `no_application_protocol` (120) alert record, TLS 1.2 record version as TLS 1.3
/// sends its first records (RFC 8446 §5.1, RFC 7301 §3.2).
const NO_APPLICATION_PROTOCOL_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120];

fn is_no_alpn(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::General(m) if m == NO_CERT_RESOLVED)
}

/// The certificate resolver of every server: one certificate, and none (so the handshake is
/// refused) for a client that offers no ALPN at all. rustls itself refuses a client that
/// offers only other protocols, but serves one that offers none (RFC 7301 allows that); a
/// vipgate server has one protocol and serves only clients that ask for it.
#[derive(Debug)]
struct AlpnRequired(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for AlpnRequired {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let _offered = hello.alpn()?;
        Some(self.0.clone())
    }
}

/// Writes the TLS records `tls` holds to `sock` until none is left (`Ok(true)`) or the socket
/// takes no more (`Ok(false)`). Shared by the authority's and the rendezvous server's loops.
pub(crate) fn write_round(
    tls: &mut rustls::ServerConnection,
    sock: &mut mio::net::TcpStream,
) -> std::io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Where a client dials: `IP:PORT`, `[IPv6]:PORT`, or a bare IP address (with or without
/// brackets), which gets `default_port`. Port 0 is refused; `what` names the server in that
/// error.
pub fn parse_endpoint(s: &str, default_port: u16, what: &str) -> Result<SocketAddr, String> {
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    let addr = match (s.parse::<SocketAddr>(), bare.parse::<std::net::IpAddr>()) {
        (Ok(a), _) => a,
        (Err(_), Ok(ip)) => SocketAddr::new(ip, default_port),
        (Err(_), Err(_)) => {
            return Err(format!(
                "expected IP:PORT, [IPv6]:PORT or a bare IP address (then port {default_port})"
            ))
        }
    };
    if addr.port() == 0 {
        return Err(format!("port 0 cannot be dialled; give {what}'s port"));
    }
    Ok(addr)
}

/// A service the blocking [`LineClient`] talks to, for its error messages.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// What the server is called ("authority", "rendezvous server").
    pub name: &'static str,
    /// Its ALPN protocol.
    pub alpn: &'static [u8],
    /// What should run at the address ("`vipgate rendezvous` running there").
    pub running: &'static str,
    /// What to do about a certificate that does not match.
    pub cert_hint: &'static str,
}

/// A blocking TLS 1.3 client of a JSON-lines service (the authority, the rendezvous server),
/// for the CLI: lines out, lines in, every wait bounded.
pub struct LineClient {
    stream: StreamOwned<ClientConnection, TcpStream>,
    service: &'static Service,
    addr: SocketAddr,
    timeout: Duration,
    /// Bytes received after the last line.
    pending: Vec<u8>,
}

impl std::fmt::Debug for LineClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineClient")
            .field("service", &self.service.name)
            .field("addr", &self.addr)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl LineClient {
    /// Connects to `addr` and completes the TLS 1.3 handshake, authenticating the server with
    /// the certificates of the PEM file `ca` (see [`client_config`]; the TLS server name is the
    /// IP address of `addr`) and requiring the service's ALPN protocol. `timeout` bounds the
    /// TCP connect, the handshake, and later each read of a reply.
    pub fn connect(
        service: &'static Service,
        addr: SocketAddr,
        ca: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let name = service.name;
        if timeout.is_zero() {
            bail!("the {name} timeout must be longer than zero");
        }
        let config = client_config_for(service.alpn, ca)?;
        let deadline = Instant::now() + timeout;
        let sock = TcpStream::connect_timeout(&addr, timeout).with_context(|| {
            format!(
                "cannot connect to the {name} at {addr}: is {}, and is TCP port {} reachable?",
                service.running,
                addr.port()
            )
        })?;
        sock.set_nodelay(true)
            .and_then(|()| sock.set_write_timeout(Some(timeout)))
            .with_context(|| format!("cannot set up the socket to {addr}"))?;
        let conn = ClientConnection::new(config, ServerName::IpAddress(addr.ip().into()))
            .with_context(|| format!("cannot start a TLS session with {addr}"))?;
        let mut stream = StreamOwned::new(conn, sock);
        while stream.conn.is_handshaking() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                bail!("the TLS handshake with the {name} at {addr} timed out after {timeout:?}");
            }
            stream
                .sock
                .set_read_timeout(Some(remaining))
                .with_context(|| format!("cannot set up the socket to {addr}"))?;
            match stream.conn.complete_io(&mut stream.sock) {
                Ok(_) => {}
                // A signal (or the process being stopped and continued) is not a failure.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(handshake_error(e, service, addr, ca, timeout)),
            }
        }
        if stream.conn.alpn_protocol() != Some(service.alpn) {
            bail!(
                "the server at {addr} does not speak the vipgate {name} protocol (it did not \
                 agree to ALPN {:?}); check the address and port",
                String::from_utf8_lossy(service.alpn)
            );
        }
        Ok(LineClient { stream, service, addr, timeout, pending: Vec::new() })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This end's address of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.sock.local_addr()
    }

    /// Sends one line (which ends in `\n`).
    pub fn send(&mut self, line: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(line)
            .and_then(|()| self.stream.flush())
            .map_err(|e| io_error(e, self.service, self.addr, self.timeout, "sending to"))
    }

    /// Reads one line (without its `\n`). `until`: `None` waits the timeout and fails past
    /// it; `Some(t)` returns `Ok(None)` at `t` with nothing read.
    pub fn read_line(&mut self, until: Option<Instant>) -> anyhow::Result<Option<Vec<u8>>> {
        let name = self.service.name;
        let deadline = until.unwrap_or_else(|| Instant::now() + self.timeout);
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.pending.len() > crate::authority::MAX_LINE {
                bail!(
                    "the {name} at {} sent a line longer than {} bytes",
                    self.addr,
                    crate::authority::MAX_LINE
                );
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                if until.is_some() {
                    return Ok(None);
                }
                bail!("no reply from the {name} at {} within {:?}", self.addr, self.timeout);
            }
            self.stream
                .sock
                .set_read_timeout(Some(remaining))
                .with_context(|| format!("cannot set up the socket to {}", self.addr))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    bail!("the {name} at {} closed the connection without replying", self.addr)
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if until.is_some()
                        && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    return Err(io_error(e, self.service, self.addr, self.timeout, "waiting for"))
                }
            }
        }
    }
}

impl Drop for LineClient {
    /// Ends the TLS session cleanly (close_notify), best effort and bounded by the write
    /// timeout, so the server sees an orderly close rather than a truncation.
    fn drop(&mut self) {
        self.stream.conn.send_close_notify();
        let _ = self.stream.flush();
    }
}

/// An actionable error for a failed TLS handshake.
fn handshake_error(
    e: std::io::Error,
    service: &Service,
    addr: SocketAddr,
    ca: &Path,
    timeout: Duration,
) -> anyhow::Error {
    let name = service.name;
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match (e.kind(), tls) {
        (_, Some(rustls::Error::InvalidCertificate(why))) => anyhow!(
            "the {name} at {addr} presented a certificate that is neither pinned in {} nor \
             issued by a certificate in it ({why:?}); {}",
            ca.display(),
            service.cert_hint
        ),
        (_, Some(rustls::Error::AlertReceived(alert))) => anyhow!(
            "the server at {addr} refused the TLS handshake ({alert:?}); is it a vipgate \
             {name} of a compatible version?"
        ),
        (ErrorKind::WouldBlock | ErrorKind::TimedOut, _) => {
            anyhow!("the TLS handshake with the {name} at {addr} timed out after {timeout:?}")
        }
        (ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset, _) => anyhow!(
            "the server at {addr} closed the connection during the TLS handshake; is it a \
             vipgate {name} port?"
        ),
        _ => anyhow!("the TLS handshake with the {name} at {addr} failed: {e}"),
    }
}

/// An actionable error for a failed read or write on an established connection.
fn io_error(
    e: std::io::Error,
    service: &Service,
    addr: SocketAddr,
    timeout: Duration,
    doing: &str,
) -> anyhow::Error {
    let name = service.name;
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            anyhow!("timed out after {timeout:?} {doing} the {name} at {addr}")
        }
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            anyhow!("the {name} at {addr} closed the connection ({doing} it)")
        }
        _ => anyhow!("failed {doing} the {name} at {addr}: {e}"),
    }
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated upper-case hex (the format of
/// `openssl x509 -fingerprint -sha256`), for logging which certificate clients must pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let hash = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .map(|suite| suite.common.hash_provider.hash(cert_der));
    match hash {
        Some(h) => h.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":"),
        None => String::from("unavailable"),
    }
}

/// Reads every certificate of a PEM file, failing with a message naming the file if it cannot
/// be read or holds none.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path)
        .with_context(|| format!("cannot read the certificate file {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{} is not a valid PEM file: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected a PEM block \"-----BEGIN CERTIFICATE-----\")",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1), failing with a message
/// naming the file. Warns if the file is readable by group or others.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = fs::read(path)
        .with_context(|| format!("cannot read the private key file {}", path.display()))?;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "private key {} is accessible to group or others (mode {:o}); run chmod 600 on it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow!(
            "{} holds no private key (expected a PEM block such as \"-----BEGIN PRIVATE KEY-----\")",
            path.display()
        ),
        other => anyhow!("{} is not a valid PEM private key file: {other}", path.display()),
    })
}

/// Returns the paths of the generated certificate and key, generating them if they are not
/// both present, or if the certificate ends within [`RENEW_BEFORE`] of `now`, or if it is one
/// of the unbounded ones earlier versions generated (valid until 4096, no key usage).
fn ensure_generated(
    state_dir: &Path,
    who: &Identity,
    now: SystemTime,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = state_dir.join(TLS_SUBDIR);
    // It holds a private key: created 0700, or narrowed to it.
    crate::store::private_dir(&dir, "TLS directory", true)
        .with_context(|| format!("cannot create the TLS directory {}", dir.display()))?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let why = match (cert_path.exists(), key_path.exists()) {
        (true, true) => match renewal_due(&cert_path, now) {
            None => return Ok((cert_path, key_path)),
            Some(why) => why,
        },
        (true, false) => format!("its key {} is missing", key_path.display()),
        _ => String::new(),
    };
    let old = read_certs(&cert_path).ok().and_then(|c| c.first().map(|c| fingerprint(c)));
    let (cert_pem, key_pem) = generate_self_signed(who, now)?;
    // Key first, certificate last: a certificate file is only ever next to its own key, and
    // an interrupted generation is simply redone on the next start.
    write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
    let new = read_certs(&cert_path)?.first().map(|c| fingerprint(c)).unwrap_or_default();
    let until = format_day(now + CERT_VALIDITY);
    match old {
        Some(old) => log::warn!(
            "replaced the TLS certificate {} ({why}; old SHA-256 {old}) by a new self-signed one \
             valid until {until} (SHA-256 {new}, key {}): clients pin the certificate, copy the \
             new {} to every client's --ca file again",
            cert_path.display(),
            key_path.display(),
            cert_path.display()
        ),
        None => log::info!(
            "generated a self-signed TLS certificate {} valid until {until} (SHA-256 {new}, key \
             {}); clients pin it with --ca, and must be given it again when it is renewed \
             (within {} days of its end, at a start)",
            cert_path.display(),
            key_path.display(),
            RENEW_BEFORE.as_secs() / 86_400
        ),
    }
    Ok((cert_path, key_path))
}

/// Why the generated certificate at `path` must be replaced at `now`, or None to keep it.
fn renewal_due(path: &Path, now: SystemTime) -> Option<String> {
    let (not_before, not_after) = match read_certs(path).and_then(|c| validity(&c[0])) {
        Ok(v) => v,
        Err(e) => return Some(format!("it cannot be read: {e:#}")),
    };
    if not_after <= now + RENEW_BEFORE {
        return Some(format!(
            "it ends on {}, within {} days",
            format_day(not_after),
            RENEW_BEFORE.as_secs() / 86_400
        ));
    }
    // One day of slack for clock corrections; an earlier version's certificates end in 4096.
    let longest = CERT_VALIDITY + Duration::from_secs(86_400);
    if not_after.duration_since(not_before).unwrap_or_default() > longest {
        return Some(format!(
            "it is valid until {}, generated by an earlier vipgate without a bounded validity \
             or key usage",
            format_day(not_after)
        ));
    }
    None
}

/// Warns when the operator's certificate at `path` has ended or ends within
/// [`RENEW_BEFORE`]; it is never replaced.
fn warn_if_ending(path: &Path, now: SystemTime) {
    let Ok((_, not_after)) = read_certs(path).and_then(|c| validity(&c[0])) else { return };
    if not_after <= now {
        log::warn!(
            "the TLS certificate {} ended on {}: clients that check dates refuse it; vipgate \
             never replaces a certificate it was given, renew it and restart",
            path.display(),
            format_day(not_after)
        );
    } else if not_after <= now + RENEW_BEFORE {
        log::warn!(
            "the TLS certificate {} ends on {}, within {} days: vipgate never replaces a \
             certificate it was given, renew it and restart",
            path.display(),
            format_day(not_after),
            RENEW_BEFORE.as_secs() / 86_400
        );
    }
}

/// A DER certificate's validity period (notBefore, notAfter).
pub fn validity(der: &[u8]) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("not a valid X.509 certificate: {e}"))?;
    let v = cert.validity();
    let at = |t: i64| {
        if t >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(t.unsigned_abs())
        }
    };
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// The day of `t` as the log says when a certificate ends (`2027-12-06`).
fn format_day(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.get(..10).unwrap_or(&s).to_string()
}

/// Generates a self-signed ECDSA P-256 end-entity certificate for `who`, valid from an hour
/// before `now` for [`CERT_VALIDITY`]; returns (certificate PEM, key PEM).
fn generate_self_signed(who: &Identity, now: SystemTime) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate an ECDSA P-256 key")?;
    let mut params = rcgen::CertificateParams::new(vec![who.dns_name.to_string()])
        .context("cannot build the certificate parameters")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, who.common_name);
    let start = now - Duration::from_secs(3600);
    params.not_before = time::OffsetDateTime::from(start);
    params.not_after = time::OffsetDateTime::from(start + CERT_VALIDITY);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).context("cannot draw a certificate serial number")?;
    serial[0] &= 0x7f; // a positive INTEGER (RFC 5280 §4.1.2.2)
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).context("cannot self-sign the certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory created with
/// `mode`, flushed to disk, then renamed over `path`; the directory is synced afterwards.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    let name = path.file_name().ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp); // a leftover of a crashed run with the same pid
    let result = (|| -> anyhow::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(contents).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))?;
    Ok(())
}

/// Server certificate verifier: pinning first, WebPKI with the same certificates as roots
/// second. Handshake signatures are always verified with the provider's algorithms.
#[derive(Debug)]
struct PinningVerifier {
    pinned: Vec<CertificateDer<'static>>,
    fallback: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinningVerifier {
    fn new(pinned: Vec<CertificateDer<'static>>, provider: Arc<CryptoProvider>) -> Self {
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(pinned.iter().cloned());
        let fallback = if added > 0 {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .ok()
        } else {
            None
        };
        PinningVerifier { pinned, fallback, algorithms: provider.signature_verification_algorithms }
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pinned.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.fallback {
            Some(webpki) => webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            None => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with a TLS 1.3-only configuration; verified properly all the same.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Helpers shared by this crate's tests.
#[cfg(test)]
pub(crate) mod test_support {
    use std::fs;
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("vipgate-tls-test-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::TempDir;
    use super::*;
    use rustls::{ClientConnection, ServerConnection, StreamOwned};
    use std::io::{BufRead, BufReader, Read};
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    /// Starts a one-connection TLS server on 127.0.0.1 that echoes one line in upper case.
    /// Returns its address and a handle yielding the server-side handshake result.
    fn echo_server(
        config: Arc<ServerConfig>,
    ) -> (std::net::SocketAddr, thread::JoinHandle<Result<(), String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let handle = thread::spawn(move || -> Result<(), String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
            let mut tls = StreamOwned::new(conn, sock);
            let mut line = String::new();
            BufReader::new(&mut tls).read_line(&mut line).map_err(|e| e.to_string())?;
            if tls.conn.alpn_protocol() != Some(ALPN) {
                return Err("ALPN not negotiated".into());
            }
            if tls.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                return Err("not TLS 1.3".into());
            }
            tls.write_all(line.to_uppercase().as_bytes()).map_err(|e| e.to_string())?;
            tls.conn.send_close_notify();
            tls.flush().map_err(|e| e.to_string())?;
            Ok(())
        });
        (addr, handle)
    }

    /// Connects with `client` to `addr` as `name`, sends "hello\n", returns the reply line.
    fn exchange(
        client: Arc<ClientConfig>,
        addr: std::net::SocketAddr,
        name: ServerName<'static>,
    ) -> Result<String, String> {
        let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, sock);
        tls.write_all(b"hello\n").map_err(|e| e.to_string())?;
        let mut reply = String::new();
        tls.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        Ok(reply)
    }

    fn ip_name() -> ServerName<'static> {
        ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
    }

    /// Runs one server connection through [`read_round`]/[`write_round`] (the daemons' path)
    /// until its handshake ends; yields the negotiated ALPN or the way it failed.
    fn loop_server(
        config: Arc<ServerConfig>,
    ) -> (std::net::SocketAddr, thread::JoinHandle<Result<Vec<u8>, Round>>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let handle = thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            sock.set_nonblocking(true).expect("non-blocking");
            let mut sock = mio::net::TcpStream::from_std(sock);
            let mut tls = ServerConnection::new(config).expect("server connection");
            let mut framer = crate::authority::LineFramer::new();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                match read_round(&mut tls, &mut sock, &mut framer) {
                    r @ (Round::Broken | Round::Eof) => return Err(r),
                    Round::More | Round::Drained => {}
                }
                write_round(&mut tls, &mut sock).expect("write");
                if !tls.is_handshaking() {
                    return Ok(tls.alpn_protocol().unwrap_or_default().to_vec());
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(Round::Drained)
        });
        (addr, handle)
    }

    /// Handshakes with the pinned certificate `ca`, offering `alpn`; the error on failure.
    fn handshake_offering(
        ca: &Path,
        alpn: Vec<Vec<u8>>,
        addr: std::net::SocketAddr,
    ) -> Result<(), rustls::Error> {
        let mut config = (*client_config(ca).expect("client config")).clone();
        config.alpn_protocols = alpn;
        let mut sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut conn = ClientConnection::new(Arc::new(config), ip_name()).expect("client");
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut sock) {
                let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).cloned();
                return Err(tls.unwrap_or(rustls::Error::General(e.to_string())));
            }
        }
        Ok(())
    }

    /// A client that offers no ALPN is refused exactly like one that offers another protocol;
    /// one that offers ours (among others) is served.
    #[test]
    fn clients_without_our_alpn_are_refused() {
        let state = TempDir::new("alpn");
        let (server, cert) = server_config(state.path(), None, None).expect("server config");
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol);
        for offer in [vec![], vec![b"h2".to_vec()], vec![RENDEZVOUS_ALPN.to_vec()]] {
            let (addr, handle) = loop_server(server.clone());
            let client = handshake_offering(&cert, offer.clone(), addr);
            assert_eq!(client, Err(refused.clone()), "offering {offer:?}");
            assert_eq!(handle.join().expect("server thread"), Err(Round::Broken), "{offer:?}");
        }
        let (addr, handle) = loop_server(server);
        handshake_offering(&cert, vec![b"h2".to_vec(), ALPN.to_vec()], addr).expect("served");
        assert_eq!(handle.join().expect("server thread"), Ok(ALPN.to_vec()));
    }

    /// The DER of the certificate in `path`.
    fn der(path: &Path) -> Vec<u8> {
        read_certs(path).expect("read cert")[0].as_ref().to_vec()
    }

    /// Each server's generated certificate names it, lasts CERT_VALIDITY, is an end entity
    /// (CA:FALSE) for TLS servers only (digitalSignature, serverAuth).
    #[test]
    fn generated_certificate_is_a_bounded_server_certificate() {
        for who in [AUTHORITY, RENDEZVOUS] {
            let state = TempDir::new("profile");
            let now = SystemTime::now();
            let (_, cert) = server_config_for(&who, state.path(), None, None).expect("generate");
            let der = der(&cert);
            let (_, x) = x509_parser::parse_x509_certificate(&der).expect("parse");
            let cn = x.subject().iter_common_name().next().and_then(|c| c.as_str().ok());
            assert_eq!(cn, Some(who.common_name));
            let san = x.subject_alternative_name().expect("san").expect("has san");
            assert_eq!(
                format!("{:?}", san.value.general_names),
                format!("[DNSName({:?})]", who.dns_name)
            );
            let (from, until) = validity(&der).expect("validity");
            assert_eq!(until.duration_since(from).expect("ordered"), CERT_VALIDITY);
            assert!(from <= now && now - Duration::from_secs(3700) < from, "starts an hour ago");
            let bc = x.basic_constraints().expect("bc").expect("has basicConstraints");
            assert!(bc.critical && !bc.value.ca, "CA:FALSE, critical");
            let ku = x.key_usage().expect("ku").expect("has keyUsage");
            assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
            assert_eq!(ku.value.flags, 1, "digitalSignature only");
            let eku = x.extended_key_usage().expect("eku").expect("has extendedKeyUsage");
            assert!(eku.value.server_auth && !eku.value.client_auth && !eku.value.any);
        }
        assert_ne!(AUTHORITY.common_name, RENDEZVOUS.common_name);
        assert_ne!(AUTHORITY.dns_name, RENDEZVOUS.dns_name);
    }

    /// A WebPKI verifier given the generated certificate as its trust anchor accepts it under
    /// its DNS name (what the docs promise to tools that do not pin), and no other name.
    #[test]
    fn generated_certificate_is_its_own_webpki_trust_anchor() {
        let state = TempDir::new("webpki");
        let (_, cert) = server_config(state.path(), None, None).expect("generate");
        let certs = read_certs(&cert).expect("read");
        let mut roots = RootCertStore::empty();
        roots.add(certs[0].clone()).expect("a usable trust anchor");
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
        let name = ServerName::try_from(CERT_DNS_NAME).expect("name");
        webpki.verify_server_cert(&certs[0], &[], &name, &[], UnixTime::now()).expect("accepted");
        let other = ServerName::try_from("vipgate-rendezvous").expect("name");
        assert!(webpki.verify_server_cert(&certs[0], &[], &other, &[], UnixTime::now()).is_err());
    }

    /// A generated certificate is kept until it is within RENEW_BEFORE of its end; then a
    /// start replaces it (and its key).
    #[test]
    fn generated_certificate_is_renewed_before_its_end() {
        let state = TempDir::new("renew");
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let made = now - (CERT_VALIDITY - RENEW_BEFORE - 2 * day);
        let (cert, key) = ensure_generated(state.path(), &AUTHORITY, made).expect("generate");
        let (der1, key1) = (der(&cert), fs::read(&key).expect("key"));
        // 2 days before renewal is due: kept.
        ensure_generated(state.path(), &AUTHORITY, now).expect("start");
        assert_eq!(der(&cert), der1);
        // 3 days later, it ends within RENEW_BEFORE: replaced, new key, a full validity again.
        let later = now + 3 * day;
        ensure_generated(state.path(), &AUTHORITY, later).expect("renew");
        assert_ne!(der(&cert), der1);
        assert_ne!(fs::read(&key).expect("key"), key1);
        let (_, until) = validity(&der(&cert)).expect("validity");
        assert!(until > later + CERT_VALIDITY - Duration::from_secs(3700));
        server_config(state.path(), None, None).expect("the pair works");
    }

    /// The certificates earlier versions generated (rcgen's defaults: 1975 to 4096, no key
    /// usage) are replaced at the first start.
    #[test]
    fn unbounded_certificate_of_an_earlier_version_is_replaced() {
        let state = TempDir::new("legacy");
        let dir = state.path().join(TLS_SUBDIR);
        fs::create_dir_all(&dir).expect("mkdir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let params = rcgen::CertificateParams::new(vec![CERT_DNS_NAME.to_string()]).expect("p");
        let old = params.self_signed(&key).expect("cert");
        write_atomic(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600).expect("key");
        write_atomic(&dir.join(CERT_FILE), old.pem().as_bytes(), 0o644).expect("cert");
        let (_, until) = validity(old.der()).expect("validity");
        assert!(until > SystemTime::now() + 1000 * CERT_VALIDITY, "rcgen's default: 4096");
        let (_, cert) = server_config(state.path(), None, None).expect("start");
        assert_ne!(der(&cert), old.der().as_ref().to_vec());
        let (_, until) = validity(&der(&cert)).expect("validity");
        assert!(until <= SystemTime::now() + CERT_VALIDITY);
    }

    /// A certificate given by the operator is never touched, even when it has ended.
    #[test]
    fn given_certificate_is_never_replaced() {
        let state = TempDir::new("given");
        let made = SystemTime::now() - CERT_VALIDITY - Duration::from_secs(86_400);
        let (cert, key) = ensure_generated(state.path(), &AUTHORITY, made).expect("generate");
        let moved = state.path().join("given.pem");
        fs::rename(&cert, &moved).expect("move");
        let before = fs::read(&moved).expect("read");
        let (_, in_use) = server_config(state.path(), Some(&moved), Some(&key)).expect("load");
        assert_eq!(in_use, moved);
        assert_eq!(fs::read(&moved).expect("read"), before);
        assert!(!cert.exists(), "nothing generated");
    }

    #[test]
    fn generates_once_and_reuses() {
        let state = TempDir::new("reuse");
        let (_, cert1) = server_config(state.path(), None, None).expect("first start");
        assert_eq!(cert1, state.path().join("tls").join("cert.pem"));
        let der1 = read_certs(&cert1).expect("read cert");
        let key1 = fs::read(state.path().join("tls/key.pem")).expect("read key");
        let (_, cert2) = server_config(state.path(), None, None).expect("second start");
        assert_eq!(cert1, cert2);
        assert_eq!(der1, read_certs(&cert2).expect("read cert again"));
        assert_eq!(key1, fs::read(state.path().join("tls/key.pem")).expect("key"));
        assert_eq!(der1.len(), 1);
        assert_eq!(fingerprint(&der1[0]).len(), 32 * 3 - 1);
    }

    #[test]
    fn key_and_dir_modes() {
        let state = TempDir::new("modes");
        server_config(state.path(), None, None).expect("generate");
        let key_mode =
            fs::metadata(state.path().join("tls/key.pem")).expect("stat key").permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode =
            fs::metadata(state.path().join("tls")).expect("stat dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(state.path().join("tls"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn missing_key_regenerates_both() {
        let state = TempDir::new("regen");
        let (_, cert) = server_config(state.path(), None, None).expect("generate");
        let der1 = read_certs(&cert).expect("cert");
        fs::remove_file(state.path().join("tls/key.pem")).expect("rm key");
        server_config(state.path(), None, None).expect("regenerate");
        assert_ne!(der1, read_certs(&cert).expect("new cert"));
    }

    #[test]
    fn handshake_with_pinned_generated_cert() {
        let state = TempDir::new("pinned");
        let (server, cert) = server_config(state.path(), None, None).expect("server config");
        let client = client_config(&cert).expect("client config");
        let (addr, handle) = echo_server(server);
        let reply = exchange(client, addr, ip_name()).expect("handshake and data");
        assert_eq!(reply, "HELLO\n");
        handle.join().expect("server thread").expect("server side");
    }

    #[test]
    fn pinned_cert_works_whatever_the_server_name() {
        let state = TempDir::new("names");
        let (server, cert) = server_config(state.path(), None, None).expect("server config");
        let client = client_config(&cert).expect("client config");
        let (addr, handle) = echo_server(server);
        let name = ServerName::try_from("unrelated.example").expect("name");
        assert_eq!(exchange(client, addr, name).expect("exchange"), "HELLO\n");
        handle.join().expect("server thread").expect("server side");
    }

    #[test]
    fn client_pinned_to_another_cert_fails() {
        let state = TempDir::new("server");
        let other = TempDir::new("other");
        let (server, _) = server_config(state.path(), None, None).expect("server config");
        let (_, other_cert) = server_config(other.path(), None, None).expect("other config");
        let client = client_config(&other_cert).expect("client config");
        let (addr, handle) = echo_server(server);
        let err = exchange(client, addr, ip_name()).expect_err("must not connect");
        assert!(
            err.contains("certificate") || err.contains("UnknownIssuer"),
            "unexpected error: {err}"
        );
        assert!(handle.join().expect("server thread").is_err());
    }

    /// An operator CA issues the server certificate: the WebPKI fallback accepts it under the
    /// right name and refuses it under another.
    #[test]
    fn ca_issued_certificate_uses_webpki() {
        let dir = TempDir::new("ca");
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["authority.example".to_string()]).expect("params");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
        let cert_path = dir.path().join("server.pem");
        let key_path = dir.path().join("server.key");
        let ca_path = dir.path().join("ca.pem");
        fs::write(&cert_path, leaf.pem()).expect("write");
        fs::write(&key_path, leaf_key.serialize_pem()).expect("write");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&ca_path, ca_cert.pem()).expect("write");

        let (server, in_use) = server_config(dir.path(), Some(&cert_path), Some(&key_path))
            .expect("server config from files");
        assert_eq!(in_use, cert_path);
        assert!(!dir.path().join("tls").exists(), "nothing generated");
        let client = client_config(&ca_path).expect("client config");

        let (addr, handle) = echo_server(server.clone());
        let name = ServerName::try_from("authority.example").expect("name");
        assert_eq!(exchange(client.clone(), addr, name).expect("exchange"), "HELLO\n");
        handle.join().expect("server thread").expect("server side");

        let (addr, handle) = echo_server(server);
        let err = exchange(client, addr, ip_name()).expect_err("wrong name");
        assert!(err.contains("certificate"), "unexpected error: {err}");
        assert!(handle.join().expect("server thread").is_err());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = TempDir::new("errors");
        let missing = dir.path().join("missing.pem");
        let err = server_config(dir.path(), Some(&missing), Some(&missing)).expect_err("missing");
        assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");

        let junk = dir.path().join("junk.pem");
        fs::write(&junk, "not a pem file\n").expect("write");
        let err = client_config(&junk).expect_err("junk");
        assert!(
            err.to_string().contains("junk.pem") && err.to_string().contains("no certificate"),
            "{err}"
        );

        // A key that does not match the certificate.
        let a = TempDir::new("a");
        let b = TempDir::new("b");
        let (_, cert_a) = server_config(a.path(), None, None).expect("a");
        server_config(b.path(), None, None).expect("b");
        let key_b = b.path().join("tls/key.pem");
        let err = server_config(dir.path(), Some(&cert_a), Some(&key_b)).expect_err("mismatch");
        assert!(err.to_string().contains("does not belong"), "{err}");

        let err = server_config(dir.path(), Some(&cert_a), None).expect_err("half");
        assert!(err.to_string().contains("no private key"), "{err}");
        let err = server_config(dir.path(), None, Some(&key_b)).expect_err("half");
        assert!(err.to_string().contains("no certificate"), "{err}");
        // The key file given as a certificate.
        let err = client_config(&key_b).expect_err("key as ca");
        assert!(err.to_string().contains("key.pem"), "{err}");
    }
}
