#!/usr/bin/env bash
# Runs every test of vipgate: installs what the tests need (Debian packages), checks
# formatting and lints, then runs the unit, property, integration (network namespace) and
# doc tests, and the benches once in test mode. Run as root: the namespace tests create
# network namespaces and TUN devices, and fail (never skip) without them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: ip (namespaces, veth, bridges, routes), ping, a packet
# capture, coturn for its STUN client (turnutils_stunclient; its TURN server is not run),
# ethtool (the offload tests turn checksum offload off on veth links), and nftables (the
# firewall tests load rulesets into their own gateway namespace).
. scripts/lib.sh
need_packages iproute2 iputils-ping tcpdump coturn ethtool nftables openssl

if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: run as root: the gateway tests need network namespaces and /dev/net/tun" >&2
    exit 1
fi

# The byte-literal vectors must match their generator (an independent oracle).
python3 tests/vectors/gen_packets.py | diff -q - src/nat/vectors.rs >/dev/null || {
    echo "test.sh: src/nat/vectors.rs differs from tests/vectors/gen_packets.py output" >&2
    exit 1
}

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets
cargo test --doc
