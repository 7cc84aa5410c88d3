#!/usr/bin/env bash
# vipgate end to end, in network namespaces on this machine (run as root):
#
#   client 192.0.2.10 ─┐                              ┌── server      198.51.100.2
#                      ├─ lan0 ── gateway (vipgate) ──┤
#   second 192.0.2.11 ─┘ (bridge)                     └── third party 203.0.113.2
#
# Act one, the gateway: the client talks to the server; the server sees a rented virtual
# address, connects back to it and reaches the client, and asks the gateway's authority who
# is behind it; the third party is refused both.
# Act two, rendezvous (seed 003): the server runs `vipgate rendezvous`; alice (the client),
# bob (the second inside host) and carol (the third party) are `vipgate peer`s. The server
# answers a buddy one bit, "is my buddy on my network?" (alice and bob both reach it from the
# gateway's pool, so yes), never an address; buddies swap local or global endpoints through
# it and send their message over a direct UDP path that bypasses the server; a non-buddy's
# question is refused. Everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
need_packages iproute2 iputils-ping socat
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 1; }

echo "demo: building vipgate"
cargo build --quiet
VIPGATE=$PWD/target/debug/vipgate

S=$$
CLI=demo-cli-$S CLI2=demo-cl2-$S GW=demo-gw-$S SRV=demo-srv-$S THIRD=demo-3rd-$S
TMP=$(mktemp -d /tmp/vipgate-demo.XXXXXX)
CTL=$TMP/control.sock
GWPID=
BG=() # every other background process (by id, not name)
cleanup() {
    set +e # a killed process's status must not cut the cleanup short
    [ -n "$GWPID" ] && kill "$GWPID" 2>/dev/null && wait "$GWPID" 2>/dev/null
    for ((i = ${#BG[@]} - 1; i >= 0; i--)); do # listeners before the server they use
        kill "${BG[i]}" 2>/dev/null && wait "${BG[i]}" 2>/dev/null
    done
    for n in $CLI $CLI2 $GW $SRV $THIRD; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
run_in() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
wait_for() { # wait_for FILE TEXT: until FILE has a line containing TEXT (at most 10 s)
    for _ in $(seq 100); do grep -qF -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "demo: '$2' did not appear in $(basename "$1") within 10 s:" >&2
    sed 's/^/   /' "$1" >&2; exit 1
}

for n in $CLI $CLI2 $GW $SRV $THIRD; do ip netns add "$n"; ip -n "$n" link set lo up; done
link() { # link NS_GW IF_GW ADDR_GW NS IF ADDR
    ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
    ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
    ip -n "$4" addr add "$6" dev "$5"; ip -n "$4" link set "$5" up
}
# The LAN is one L2 segment: a bridge in the gateway's namespace, each inside host on a port.
ip -n $GW link add lan0 type bridge
ip -n $GW addr add 192.0.2.1/24 dev lan0; ip -n $GW link set lan0 up
lan_host() { # lan_host NS PORT ADDR
    ip -n $GW link add "$2" type veth peer name eth0 netns "$1"
    ip -n $GW link set "$2" master lan0 up
    ip -n "$1" addr add "$3" dev eth0; ip -n "$1" link set eth0 up
    ip -n "$1" route add default via 192.0.2.1
}
lan_host $CLI lan-cli 192.0.2.10/24
lan_host $CLI2 lan-cl2 192.0.2.11/24
link $GW wan0 198.51.100.1/24 $SRV eth0 198.51.100.2/24
link $GW wan1 203.0.113.1/24 $THIRD eth0 203.0.113.2/24
# The WAN side only knows how to reach the pool through the gateway, never the LAN; the
# server and the third party reach each other through it too (plain forwarding, act two).
ip -n $SRV route add 198.18.0.0/24 via 198.51.100.1
ip -n $SRV route add 203.0.113.0/24 via 198.51.100.1
ip -n $THIRD route add 198.18.0.0/24 via 203.0.113.1
ip -n $THIRD route add 198.51.100.0/24 via 203.0.113.1
run_in $GW sysctl -qw net.ipv4.ip_forward=1

say "1. Start the gateway: serve 192.0.2.0/24, rent from 198.18.0.0/24 (all else default)"
ip netns exec $GW "$VIPGATE" gateway --lan 192.0.2.0/24 --pool 198.18.0.0/24 \
    --state-dir "$TMP/state" --control-socket "$CTL" 2>"$TMP/gateway.log" &
GWPID=$!
for _ in $(seq 50); do "$VIPGATE" stats --control-socket "$CTL" >/dev/null 2>&1 && break; sleep 0.1; done
sed 's/^/   gateway| /' "$TMP/gateway.log"

say "2. The client (192.0.2.10) connects to the server (198.51.100.2); the server says whom it sees"
ip netns exec $SRV socat TCP-LISTEN:7000,reuseaddr SYSTEM:'echo "server: you are $SOCAT_PEERADDR"' &
BG+=($!)
sleep 0.3
reply=$(run_in $CLI socat -T3 - TCP:198.51.100.2:7000,connect-timeout=3 </dev/null)
echo "   client| $reply"
VIRT=${reply##* }
case $VIRT in 198.18.0.*) ;; *) echo "demo: expected a pool address, got '$VIRT'" >&2; exit 1;; esac
run_in $CLI ping -c 1 -W 2 198.51.100.2 | sed -n '2p' | sed 's/^/   client| ping: /'

say "3. The server opens a NEW connection to $VIRT, the address it saw; it reaches the client"
ip netns exec $CLI socat TCP-LISTEN:7001,reuseaddr SYSTEM:'echo "client: hello $SOCAT_PEERADDR, you reached me"' &
BG+=($!)
sleep 0.3
echo "   server| $(run_in $SRV socat -T3 - TCP:$VIRT:7001,connect-timeout=3 </dev/null)"

say "4. A third party (203.0.113.2) tries the same address: the gateway refuses it"
if out=$(run_in $THIRD socat -T2 - TCP:$VIRT:7001,connect-timeout=2 </dev/null 2>&1); then
    echo "demo: the third party got through: $out" >&2; exit 1
fi
echo "   third | refused: connection timed out (no partner of $VIRT)"

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

# ---- Act two: the rendezvous server and direct peer paths (seed 003) ----
RDV=$TMP/rdv RCA=$TMP/rdv/tls/cert.pem PW=$TMP/password
echo "demo password" >"$PW"
peer() { # peer NS USER ARGS...: one `vipgate peer` run as USER from NS (bounded)
    local ns=$1 user=$2; shift 2
    run_in "$ns" timeout 20 "$VIPGATE" peer --server 198.51.100.2 --ca "$RCA" --user "$user" \
        --password-file "$PW" --timeout 5 "$@"
}
listen_bg() { # listen_bg NS USER: `vipgate peer listen` in the background, once it is up
    ip netns exec "$1" "$VIPGATE" peer --server 198.51.100.2 --ca "$RCA" --user "$2" \
        --password-file "$PW" listen >"$TMP/$2.out" 2>&1 &
    BG+=($!)
    wait_for "$TMP/$2.out" "listening user="
}

say "7. Act two: the server also runs the rendezvous server, told the gateway's pool is one network"
ip netns exec $SRV "$VIPGATE" rendezvous --state-dir "$RDV" --gateway-pool 198.18.0.0/24 \
    >"$TMP/rdv.log" 2>&1 &
BG+=($!)
wait_for "$TMP/rdv.log" " ready"
sed 's/^/   rendezvous| /' "$TMP/rdv.log"

show() { # show WHO COMMAND...: COMMAND's output, indented and labelled
    local label; label=$(printf '%-6s' "$1"); shift
    "$@" | sed "s/^/   $label| /"
}
relayed() { # the rendezvous server's log lines of the offer and answer between $1 and $2
    grep -E " (offer [0-9]+: $1 -> $2|answer [0-9]+: $2 -> $1) " "$TMP/rdv.log" |
        sed 's/^\[[^]]*\] //; s/^/   rendezvous| /'
}

say "8. alice (192.0.2.10), bob (192.0.2.11) and carol (203.0.113.2) register; alice befriends both"
show alice peer $CLI alice register
show bob peer $CLI2 bob register
show carol peer $THIRD carol register
show alice peer $CLI alice buddy add bob
show bob peer $CLI2 bob buddy accept alice
show alice peer $CLI alice buddy add carol
show carol peer $THIRD carol buddy accept alice

say "9. bob and carol listen; the server knows bob by his gateway address, carol by her own"
listen_bg $CLI2 bob
listen_bg $THIRD carol
show bob grep 'listening user=' "$TMP/bob.out"
show carol grep 'listening user=' "$TMP/carol.out"

say "10. alice -> bob: the one bit says same network: LAN endpoints, and the message goes direct"
show alice peer $CLI alice connect bob --message "hello bob, over the LAN"
wait_for "$TMP/bob.out" "from=alice"
show bob grep 'from=alice' "$TMP/bob.out"
relayed alice bob

say "11. alice -> carol: different networks, so global endpoints (from STUN), through the gateway"
show alice peer $CLI alice connect carol --message "hello carol, across the gateway"
wait_for "$TMP/carol.out" "from=alice"
show carol grep 'from=alice' "$TMP/carol.out"
relayed alice carol

say "12. carol asks about bob, who is not her buddy: refused, and she learns nothing about him"
if out=$(peer $THIRD carol connect bob --message "where are you?" 2>&1); then
    echo "demo: carol was answered: $out" >&2; exit 1
else
    status=$?
fi
[ "$status" -eq 3 ] || { echo "demo: expected exit status 3, got $status: $out" >&2; exit 1; }
echo "   carol | exit status $status: ${out#vipgate: }"

say "13. Stop the gateway (SIGTERM): it fails closed, its guard keeps the LAN's hosts in"
kill "$GWPID"; wait "$GWPID" || true; GWPID=
grep -E 'lease (created|ended)|signal|stopped' "$TMP/gateway.log" | sed 's/^/   gateway| /'
ip -n $GW rule show | grep -E 'prohibit|unreachable' | sed 's/^/   guard  | /'
if ip netns exec $CLI ping -n -c 1 -W 1 198.51.100.2 >/dev/null 2>&1; then
    echo "demo: the client got out with the gateway stopped" >&2; exit 1
fi
echo "   client | ping 198.51.100.2: refused while the gateway is stopped"

say "14. vipgate cleanup: the box routes as before vipgate ran"
ip netns exec $GW "$VIPGATE" cleanup | sed 's/^/   cleanup| /'
if ip -n $GW rule show | grep -q 7443; then echo "demo: rules left behind" >&2; exit 1; fi
echo "   gateway namespace rules: $(ip -n $GW rule show | wc -l) (kernel defaults only)"
say "Done."
