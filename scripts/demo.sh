#!/usr/bin/env bash
# vipgate end to end, in network namespaces on this machine (run as root):
#
#   client 192.0.2.10 ── gateway (vipgate) ──┬── server      198.51.100.2
#                                            └── third party 203.0.113.2
#
# The client talks to the server; the server sees a rented virtual address, connects back
# to it and reaches the client, and asks the gateway's authority who is behind it; the third
# party is refused both. Everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_packages iproute2 iputils-ping socat
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }

echo "demo: building vipgate"
cargo build --quiet
VIPGATE=$PWD/target/debug/vipgate

S=$$
CLI=demo-cli-$S GW=demo-gw-$S SRV=demo-srv-$S THIRD=demo-3rd-$S
TMP=$(mktemp -d /tmp/vipgate-demo.XXXXXX)
CTL=$TMP/control.sock
GWPID=
cleanup() {
    [ -n "$GWPID" ] && kill "$GWPID" 2>/dev/null && wait "$GWPID" 2>/dev/null
    for n in $CLI $GW $SRV $THIRD; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
run_in() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

for n in $CLI $GW $SRV $THIRD; do ip netns add "$n"; ip -n "$n" link set lo up; done
link() { # link NS_GW IF_GW ADDR_GW NS IF ADDR
    ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
    ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
    ip -n "$4" addr add "$6" dev "$5"; ip -n "$4" link set "$5" up
}
link $GW lan0 192.0.2.1/24 $CLI eth0 192.0.2.10/24
link $GW wan0 198.51.100.1/24 $SRV eth0 198.51.100.2/24
link $GW wan1 203.0.113.1/24 $THIRD eth0 203.0.113.2/24
ip -n $CLI route add default via 192.0.2.1
# The WAN side only knows how to reach the pool through the gateway, never the LAN.
ip -n $SRV route add 198.18.0.0/24 via 198.51.100.1
ip -n $THIRD route add 198.18.0.0/24 via 203.0.113.1
run_in $GW sysctl -qw net.ipv4.ip_forward=1

say "1. Start the gateway: serve 192.0.2.0/24, rent from 198.18.0.0/24 (all else default)"
ip netns exec $GW "$VIPGATE" gateway --lan 192.0.2.0/24 --pool 198.18.0.0/24 \
    --state-dir "$TMP/state" --control-socket "$CTL" 2>"$TMP/gateway.log" &
GWPID=$!
for _ in $(seq 50); do "$VIPGATE" stats --control-socket "$CTL" >/dev/null 2>&1 && break; sleep 0.1; done
sed 's/^/   gateway| /' "$TMP/gateway.log"

say "2. The client (192.0.2.10) connects to the server (198.51.100.2); the server says whom it sees"
run_in $SRV socat TCP-LISTEN:7000,reuseaddr SYSTEM:'echo "server: you are $SOCAT_PEERADDR"' &
sleep 0.3
reply=$(run_in $CLI socat -T3 - TCP:198.51.100.2:7000,connect-timeout=3 </dev/null)
echo "   client| $reply"
VIRT=${reply##* }
case $VIRT in 198.18.0.*) ;; *) echo "demo: expected a pool address, got '$VIRT'" >&2; exit 1;; esac
run_in $CLI ping -c 1 -W 2 198.51.100.2 | sed -n '2p' | sed 's/^/   client| ping: /'

say "3. The server opens a NEW connection to $VIRT, the address it saw; it reaches the client"
run_in $CLI socat TCP-LISTEN:7001,reuseaddr SYSTEM:'echo "client: hello $SOCAT_PEERADDR, you reached me"' &
sleep 0.3
echo "   server| $(run_in $SRV socat -T3 - TCP:$VIRT:7001,connect-timeout=3 </dev/null)"

say "4. A third party (203.0.113.2) tries the same address: the gateway refuses it"
if out=$(run_in $THIRD socat -T2 - TCP:$VIRT:7001,connect-timeout=2 </dev/null 2>&1); then
    echo "demo: the third party got through: $out" >&2; exit 1
fi
echo "   third | refused: connection timed out (no partner of $VIRT)"
pkill -f "TCP-LISTEN:7001" 2>/dev/null || true

say "5. The server asks the gateway's authority who is behind $VIRT (TLS 1.3, pinned certificate)"
CA=$TMP/state/tls/cert.pem
real=$(run_in $SRV "$VIPGATE" inquire --authority 198.51.100.1 --ca "$CA" --virtual "$VIRT")
echo "   server| vipgate inquire --virtual $VIRT  ->  $real"
[ "$real" = 192.0.2.10 ] || { echo "demo: the partner was not told the real address" >&2; exit 1; }
if out=$(run_in $THIRD "$VIPGATE" inquire --authority 203.0.113.1 --ca "$CA" --virtual "$VIRT" 2>&1); then
    echo "demo: the third party was told: $out" >&2; exit 1
fi
echo "   third | ${out#vipgate: }"

say "6. What the gateway knows (vipgate leases, vipgate stats)"
"$VIPGATE" leases --control-socket "$CTL" | sed 's/^/   /'
"$VIPGATE" stats --control-socket "$CTL" | grep -E 'packets|dropped|leases' | sed 's/^/   /'

say "7. Stop the gateway (SIGTERM): its TUN, routes and rules go away"
kill "$GWPID"; wait "$GWPID" || true; GWPID=
grep -E 'lease (created|ended)|signal|stopped' "$TMP/gateway.log" | sed 's/^/   gateway| /'
if ip -n $GW rule show | grep -q 7443; then echo "demo: rules left behind" >&2; exit 1; fi
echo "   gateway namespace rules: $(ip -n $GW rule show | wc -l) (kernel defaults only)"
say "Done."
