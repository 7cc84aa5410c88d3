#!/usr/bin/env bash
# Benchmarks vipgate's rental authority over TLS: durable rents per second and inquiries per
# second with several concurrent pipelining clients (examples/authority_load.rs), in network
# namespaces on this machine. Run as root. Results: docs/performance.md, "Rental authority
# (TLS)". Takes about a minute once the release build is there.
#
#   lan: 198.18.0.2/17 + host addresses 198.18.{1,2,3}.1-16, 2001:db8:1::3:1-16
#    │
#   gw:  vipgate gateway, authority on 198.18.0.1 / [2001:db8:1::1] / 203.0.113.1 port 7443
#    │
#   wan: partner addresses 203.0.113.10-25
#
# Three gateways, one after the other, each with a fresh state directory:
#   1. IPv4 (--lan 198.18.0.0/17 --pool 198.19.0.0/16): rent latency unloaded (1 connection,
#      one request at a time), 4 pipelining connections renting up to 58,000 new leases, then
#      4 more renting past 65,534 leases (the pool's size: the allocator's cliff).
#   2. IPv4 again: 16 connections renting up to 60,000 leases; then 128 leases rented for the
#      partners 203.0.113.10-25, which inquire about them: 1 connection one at a time, then
#      4 and 16 pipelining connections.
#   3. IPv6 (--lan 2001:db8:1::/64 --pool 2001:db8:ffff::/64, a pool without an end): 16
#      connections renting for 12 s, the rate as the database grows to a few 100,000 rows.
# Rent partners are 198.18.128.0/17 and 2001:db8:2::/64 (any unicast address outside the LAN
# and the pool will do; no packet is ever sent to them).
#
# Environment: WINDOW (requests outstanding per connection, default 64), LOG_LEVEL (the
# gateway's --log-level, default info as shipped), PERF=1 (perf record -g the daemon for 5 s
# of the IPv6 rent run and 3 s of the 16-connection inquiry run; those runs are then slower).
# Every run is bounded by its count and its duration; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

WINDOW=${WINDOW:-64}
LOG_LEVEL=${LOG_LEVEL:-info}
PERF=${PERF:-0}

[ "$(id -u)" -eq 0 ] || { echo "authority-bench: run as root (network namespaces, TUN)" >&2; exit 1; }
. scripts/lib.sh
need_packages iproute2 sqlite3 procps coreutils
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then need_packages linux-perf; fi

echo "authority-bench: building (release, examples)"
cargo build --quiet --release --bins --examples
VIPGATE=$PWD/target/release/vipgate
LOAD=$PWD/target/release/examples/authority_load
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

S=$$
GW=ab-gw-$S LAN=ab-lan-$S WAN=ab-wan-$S
TMP=$(mktemp -d /tmp/vipgate-authority-bench.XXXXXX)
GWPID=
PERFPID=
cleanup() {
    local rc=$?
    if [ -n "$PERFPID" ]; then kill "$PERFPID" 2>/dev/null || true; wait "$PERFPID" 2>/dev/null || true; fi
    if [ -n "$GWPID" ]; then kill "$GWPID" 2>/dev/null || true; wait "$GWPID" 2>/dev/null || true; fi
    for n in $GW $LAN $WAN; do ip netns del "$n" 2>/dev/null || true; done
    if [ $rc -ne 0 ] && [ -f "$TMP/gateway.log" ]; then
        echo "authority-bench: failed (status $rc); last lines of the gateway's log:" >&2
        tail -n 20 "$TMP/gateway.log" >&2 || true
    fi
    rm -rf "$TMP"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for n in $GW $LAN $WAN; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip -n $GW link add lan0 type veth peer name eth0 netns $LAN
ip -n $GW link add wan0 type veth peer name eth0 netns $WAN
ip -n $GW addr add 198.18.0.1/17 dev lan0
ip -n $GW addr add 2001:db8:1::1/64 dev lan0 nodad
ip -n $GW addr add 203.0.113.1/24 dev wan0
{
    echo "addr add 198.18.0.2/17 dev eth0"
    for i in $(seq 1 16); do
        echo "addr add 198.18.1.$i/17 dev eth0"
        echo "addr add 198.18.2.$i/17 dev eth0"
        echo "addr add 198.18.3.$i/17 dev eth0"
        echo "addr add 2001:db8:1::3:$i/64 dev eth0 nodad"
    done
} | ip -n $LAN -batch -
for i in $(seq 10 25); do echo "addr add 203.0.113.$i/24 dev eth0"; done | ip -n $WAN -batch -
ip -n $GW link set lan0 up
ip -n $GW link set wan0 up
ip -n $LAN link set eth0 up
ip -n $WAN link set eth0 up
ip netns exec $GW sysctl -qw net.ipv4.ip_forward=1
ip netns exec $GW sysctl -qw net.ipv6.conf.all.forwarding=1
ip netns exec $GW sysctl -qw net.ipv4.conf.all.rp_filter=2
srcs() { # PREFIX FIRST LAST: --source PREFIX<i> ...
    local i
    for i in $(seq "$2" "$3"); do printf -- '--source %s%s ' "$1" "$i"; done
}

# start_gateway N ARGS...: a fresh gateway (state directory $TMP/state-N).
start_gateway() {
    local n=$1; shift
    STATE=$TMP/state-$n
    CTL=$TMP/control-$n.sock
    ip netns exec $GW "$VIPGATE" gateway --max-leases 1000000 --inquiry-rate 100000000 \
        --max-leases-per-host 1000000 --rent-rate 100000000 \
        --state-dir "$STATE" --control-socket "$CTL" --log-level "$LOG_LEVEL" "$@" \
        2>"$TMP/gateway.log" &
    GWPID=$!
    for _ in $(seq 100); do
        "$VIPGATE" stats --control-socket "$CTL" >/dev/null 2>&1 && [ -f "$STATE/tls/cert.pem" ] \
            && break
        kill -0 $GWPID 2>/dev/null || { echo "authority-bench: the gateway did not start" >&2; exit 1; }
        sleep 0.1
    done
    CA=$STATE/tls/cert.pem
    DB=$STATE/leases.db
    echo "-- gateway $n: $*"
}
stop_gateway() {
    kill "$GWPID"
    wait "$GWPID" || true
    GWPID=
    echo "   gateway log: $(wc -l <"$TMP/gateway.log") lines"
}

# CPU ticks (utime+stime, 1/CLK_TCK s) of the daemon and of its threads by name; the box.
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$GWPID/stat"; }
thread_ticks() { # NAME
    local sum=0 t
    for t in /proc/$GWPID/task/*; do
        if [ "$(cat "$t/comm")" = "$1" ]; then sum=$((sum + $(awk '{print $14 + $15}' "$t/stat"))); fi
    done
    echo $sum
}
box_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
written() { awk '/^write_bytes/{print $2}' "/proc/$GWPID/io"; }
db_count() { sqlite3 "file:$DB?mode=ro" "SELECT count(*) FROM $1" 2>/dev/null || echo "?"; }
stat_field() {
    "$VIPGATE" stats --control-socket "$CTL" --json \
        | python3 -c "import json,sys; print(json.load(sys.stdin).get('$1', '?'))" 2>/dev/null \
        || echo "?"
}

ROWS=()
FAILED=0
# run LABEL NS AUTHORITY CONNS WINDOW PERFSECS LOAD-ARGS...: one bounded load run, with the
# daemon's CPU and disk writes around it.
run() {
    local label=$1 ns=$2 authority=$3 conns=$4 window=$5 perfsecs=$6; shift 6
    local b0 a0 b1 a1 t0 t1 l0 l1 w0 w1 d0 d1 out
    read -r b0 a0 < <(box_busy)
    t0=$(ticks) l0=$(thread_ticks vipgate) w0=$(thread_ticks vipgate-store) d0=$(written)
    if [ "$PERF" = 1 ] && [ "$perfsecs" -gt 0 ]; then
        (sleep 1; exec perf record -q -g -o "$TMP/perf-$label.data" -p $GWPID -- sleep "$perfsecs" \
            >/dev/null 2>&1) &
        PERFPID=$!
    fi
    if ! out=$(timeout 60 ip netns exec "$ns" "$LOAD" --authority "$authority" --ca "$CA" \
        --conns "$conns" --window "$window" "$@" 2>&1); then
        echo "$out" | sed 's/^/   /'
        echo "   authority-bench: the run $label failed" >&2
        FAILED=$((FAILED + 1))
    fi
    read -r b1 a1 < <(box_busy)
    t1=$(ticks) l1=$(thread_ticks vipgate) w1=$(thread_ticks vipgate-store) d1=$(written)
    if [ -n "$PERFPID" ]; then wait "$PERFPID" || true; PERFPID=; fi
    echo "$out" | grep -v '^RESULT' | sed 's/^/   /'
    local r elapsed ok
    r=$(echo "$out" | sed -n 's/^RESULT //p')
    [ -n "$r" ] || return 0
    elapsed=$(echo "$r" | sed 's/.*elapsed=\([0-9.]*\).*/\1/')
    ok=$(echo "$r" | sed 's/.* ok=\([0-9]*\).*/\1/')
    local cpu loop store box wpr
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v e="$elapsed" 'BEGIN{printf "%.2f", d/hz/e}')
    loop=$(awk -v d=$((l1 - l0)) -v hz="$HZ" -v e="$elapsed" 'BEGIN{printf "%.2f", d/hz/e}')
    store=$(awk -v d=$((w1 - w0)) -v hz="$HZ" -v e="$elapsed" 'BEGIN{printf "%.2f", d/hz/e}')
    box=$(awk -v b=$((b1 - b0)) -v a=$((a1 - a0)) 'BEGIN{printf "%.2f", a ? 2*b/a : 0}')
    wpr=$(awk -v d=$((d1 - d0)) -v n="$ok" 'BEGIN{printf "%.1f", n ? d/n/1024 : 0}')
    echo "   daemon CPU $cpu cores (loop thread $loop, store writer $store); box busy $box of 2 cores;" \
        "daemon wrote $(((d1 - d0) / 1048576)) MiB to disk ($wpr KiB per ok request)"
    ROWS+=("$label $r daemon_cores=$cpu loop_cores=$loop store_cores=$store box_cores=$box kib_per_ok=$wpr")
}
tables() {
    echo "   leases in memory $(stat_field leases), events lost $(stat_field events_lost);" \
        "database rows: lease $(db_count lease), history $(db_count history)"
}

echo
echo "== 1. IPv4 rents: 198.18.2.1-16 rent for partners 198.18.128.0/17"
start_gateway 1 --lan 198.18.0.0/17 --pool 198.19.0.0/16 --authority-listen 0.0.0.0:7443
run rent-1x1 $LAN 198.18.0.1:7443 1 1 0 --mode rent --source 198.18.1.1 --count 2000 --duration 3
run rent-4 $LAN 198.18.0.1:7443 4 "$WINDOW" 0 --mode rent $(srcs 198.18.2. 1 4) \
    --count 58000 --duration 8 --interval 0.25
tables
echo "   ... and past the pool's 65,534 addresses (every address in use at least once):"
run rent-4-past-pool $LAN 198.18.0.1:7443 4 "$WINDOW" 4 --mode rent $(srcs 198.18.2. 5 8) \
    --count 12000 --duration 6
tables
stop_gateway

echo
echo "== 2. IPv4 rents from 16 connections (198.18.3.1-16), then inquiries from 203.0.113.10-25"
start_gateway 2 --lan 198.18.0.0/17 --pool 198.19.0.0/16 --authority-listen 0.0.0.0:7443
run rent-16 $LAN 198.18.0.1:7443 16 "$WINDOW" 0 --mode rent $(srcs 198.18.3. 1 16) \
    --count 60000 --duration 8 --interval 0.25
tables
ip netns exec $LAN "$LOAD" --authority 198.18.0.1:7443 --ca "$CA" --mode rent \
    $(srcs 198.18.1. 1 8) --conns 8 --count 128 --partner-first 203.0.113.10 --partner-count 16 \
    --leases-out "$TMP/inquiry-leases.txt" | sed -n 's/^rent:/   set-up: rent:/p'
INQ=(--mode inquire --leases "$TMP/inquiry-leases.txt")
run inquire-1x1 $WAN 203.0.113.1:7443 1 1 0 "${INQ[@]}" --count 20000 --duration 3
run inquire-4 $WAN 203.0.113.1:7443 4 "$WINDOW" 0 "${INQ[@]}" --count 4000000 --duration 5
run inquire-16 $WAN 203.0.113.1:7443 16 "$WINDOW" 3 "${INQ[@]}" --count 4000000 --duration 5
stop_gateway

echo
echo "== 3. IPv6 rents, 16 connections (2001:db8:1::3:1-16), partners 2001:db8:2::/64, 12 s"
start_gateway 3 --lan 2001:db8:1::/64 --pool 2001:db8:ffff::/64 --authority-listen '[::]:7443'
run rent-16-v6 $LAN '[2001:db8:1::1]:7443' 16 "$WINDOW" 5 --mode rent \
    $(srcs 2001:db8:1::3: 1 16) --partner-first 2001:db8:2:: --partner-count 4000000 \
    --count 400000 --duration 12
tables
stop_gateway

echo
echo "== summary ($(date -u +%FT%TZ), commit $(git describe --always --dirty 2>/dev/null || echo '?')," \
    "$(nproc) cores, log level $LOG_LEVEL, window $WINDOW)"
printf '%-17s %5s %6s %8s %8s %8s %8s %6s %5s %5s %6s %5s %7s  %s\n' run conns window replies \
    rate/s p50_us p99_us daemon loop store client box KiB/ok errors
for row in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $row
    label=$1; shift
    declare -A f=()
    for kv in "$@"; do f[${kv%%=*}]=${kv#*=}; done
    client=$(awk -v c="${f[client_cpu_s]}" -v e="${f[elapsed]}" 'BEGIN{printf "%.2f", e ? c/e : 0}')
    printf '%-17s %5s %6s %8s %8s %8s %8s %6s %5s %5s %6s %5s %7s  %s\n' "$label" "${f[conns]}" \
        "${f[window]}" "${f[replies]}" "${f[rate]}" "${f[p50_us]}" "${f[p99_us]}" \
        "${f[daemon_cores]}" "${f[loop_cores]}" "${f[store_cores]}" "$client" "${f[box_cores]}" \
        "${f[kib_per_ok]}" "${f[errors]}"
    unset f
done
echo "(daemon, loop, store, client, box: cores busy over the run, of 2; client counts its"
echo " handshakes too. KiB/ok: the daemon's disk writes per successful request.)"

if [ "$PERF" = 1 ]; then
    for label in rent-4-past-pool rent-16-v6 inquire-16; do
        [ -f "$TMP/perf-$label.data" ] || continue
        echo
        echo "== perf: the daemon during $label, by thread and library, then by symbol (self)"
        perf report -q -i "$TMP/perf-$label.data" --no-children --sort comm,dso \
            --percent-limit 1 2>/dev/null | grep -E '^ +[0-9]' | head -8
        perf report -q -i "$TMP/perf-$label.data" --no-children --sort comm,sym \
            --percent-limit 1 2>/dev/null | grep -E '^ +[0-9]' | head -25
    done
fi
[ "$FAILED" -eq 0 ] || { echo "authority-bench: $FAILED run(s) failed" >&2; exit 1; }
