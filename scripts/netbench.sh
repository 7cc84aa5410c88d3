#!/usr/bin/env bash
# End-to-end throughput, packet rate and latency of vipgate against the kernel and against a
# bare TUN copy loop, in network namespaces on this machine (run as root):
#
#   client 198.18.1.2 ─veth─ 198.18.1.1 [gateway] 198.18.2.1 ─veth─ 198.18.2.2 server
#
# Modes, interleaved in one run (the order rotates every repetition):
#   route       plain kernel forwarding
#   kernel-nat  nftables 1:1 source NAT of the client to 198.19.0.10 (pool 198.19.0.0/24)
#   tun-copy    examples/tun_copy.rs: every packet, both directions, goes through a TUN and
#               is written back unchanged (same policy routing as the gateway)
#   tun-copy-offload  the same with the gateway's TUN offloads (tun_copy --offload): frames
#               keep their virtio-net header, super-packets stay whole
#   tun-copy-mq-offload  (not in the default list) the same on a multi-queue TUN with two
#               queues, a thread each: what multi-queue could add on this machine
#   vipgate     `vipgate gateway --lan 198.18.1.0/24 --pool 198.19.0.0/24 --offload off`
#   vipgate-offload  the same with `--offload on` (IFF_VNET_HDR, TSO4/6, USO)
#   vipgate-mq-offload  (not in the default list) the same with `--queues 2`
# Tests per mode: ping RTT (-c 50 -i 0.01), iperf3 TCP -P 1 and -P 4, iperf3 UDP 64-byte
# packets at -b 0; the forwarding process's CPU per test. In the NAT modes the server must
# see a pool address on every test, or the mode fails (and so does the run).
#
# Environment: REPS (2), DUR (5 s per iperf3 test), MODES ("route kernel-nat tun-copy
# tun-copy-offload vipgate vipgate-offload"), NETBENCH_LOGDIR (keep the per-test files
# there), NETBENCH_CSV (raw results), PERF=1 (perf record -g the forwarder during TCP ×1 and
# UDP-64 of the first repetition; summaries in perf-*.txt in the log directory).
# `scripts/netbench.sh cleanup` removes namespaces left by a killed run (vnb-*).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
[ "$(id -u)" -eq 0 ] || { echo "netbench: run as root (it creates network namespaces)" >&2; exit 1; }

if [ "${1:-}" = cleanup ]; then
    for n in $(ip netns list | awk '/^vnb-/ {print $1}'); do
        for p in $(ip netns pids "$n"); do kill "$p" 2>/dev/null || true; done
        ip netns del "$n" && echo "netbench: removed $n"
    done
    exit 0
fi

REPS=${REPS:-2}
DUR=${DUR:-5}
MODES=${MODES:-"route kernel-nat tun-copy tun-copy-offload vipgate vipgate-offload"}
case $REPS$DUR in *[!0-9]*) echo "netbench: REPS and DUR must be integers" >&2; exit 1;; esac
[ "$REPS" -ge 1 ] && [ "$REPS" -le 20 ] && [ "$DUR" -ge 1 ] && [ "$DUR" -le 60 ] ||
    { echo "netbench: REPS must be 1..20 and DUR 1..60" >&2; exit 1; }
# Hard bound on the whole run: every test is bounded on its own as well.
read -ra MODE_LIST <<<"$MODES"
DEADLINE=$(( $(date +%s) + 120 + REPS * ${#MODE_LIST[@]} * (4 * (DUR + 12) + 20) ))

need_packages iperf3 iputils-ping iproute2 nftables jq procps
PERF=${PERF:-0}
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then need_packages linux-perf; fi

echo "netbench: building (release)"
cargo build --quiet --release --bins --examples
VIPGATE=$PWD/target/release/vipgate
TUNCOPY=$PWD/target/release/examples/tun_copy

S=$$
CLI=vnb-cli-$S GW=vnb-gw-$S SRV=vnb-srv-$S
LAN=198.18.1.0/24 CLIENT=198.18.1.2 GW_LAN=198.18.1.1
WAN_IP=198.18.2.1 SERVER=198.18.2.2
POOL=198.19.0.0/24 NAT_ADDR=198.19.0.10
TUN=vnbtun0 TABLE=7443 PRIO=7443
TMP=$(mktemp -d /tmp/vipgate-netbench.XXXXXX)
LOGDIR=${NETBENCH_LOGDIR:-$TMP/log}
CSV=${NETBENCH_CSV:-$TMP/netbench.csv}
mkdir -p "$LOGDIR"
HZ=$(getconf CLK_TCK)
FWD_PID=

run_in() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
log() { echo "netbench: $*" >&2; }

stop_fwd() {
    [ -n "$FWD_PID" ] || return 0
    kill -TERM "$FWD_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$FWD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$FWD_PID" 2>/dev/null || true
    wait "$FWD_PID" 2>/dev/null || true
    FWD_PID=
}
cleanup() {
    set +e
    stop_fwd
    for n in $CLI $GW $SRV; do
        # Only processes of the namespaces this run created: iperf3 servers, forwarders.
        for p in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$n" 2>/dev/null
    done
    [ -n "${NETBENCH_LOGDIR:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- topology
for n in $CLI $GW $SRV; do ip netns add "$n"; ip -n "$n" link set lo up; done
ip -n "$GW" link add gw-lan type veth peer name eth0 netns "$CLI"
ip -n "$GW" link add gw-wan type veth peer name eth0 netns "$SRV"
ip -n "$GW" addr add $GW_LAN/24 dev gw-lan; ip -n "$GW" link set gw-lan up
ip -n "$GW" addr add $WAN_IP/24 dev gw-wan; ip -n "$GW" link set gw-wan up
ip -n "$CLI" addr add $CLIENT/24 dev eth0; ip -n "$CLI" link set eth0 up
ip -n "$SRV" addr add $SERVER/24 dev eth0; ip -n "$SRV" link set eth0 up
ip -n "$CLI" route add default via $GW_LAN
ip -n "$SRV" route add $POOL via $WAN_IP
for k in net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0; do
    run_in "$GW" sysctl -qw "$k"
done
gw_state() { # what a mode may change in the gateway namespace (not the kernel's own IPv6 routes)
    ip -n "$GW" -4 rule show; ip -n "$GW" -6 rule show
    ip -n "$GW" -4 route show table all; ip -n "$GW" -6 route show table $TABLE 2>/dev/null
    ip -n "$GW" link show "$TUN" 2>/dev/null | head -1
    run_in "$GW" nft list ruleset
}
GW_BASELINE=$(gw_state)

# ---------------------------------------------------------------- per-mode set-up
cpu_ticks() { # utime+stime of a process, all its threads (fields 14 and 15 of /proc/PID/stat)
    [ -n "$FWD_PID" ] && [ -r "/proc/$FWD_PID/stat" ] || { echo 0; return; }
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$FWD_PID/stat"
}
wait_link() {
    for _ in $(seq 50); do ip -n "$GW" link show "$TUN" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}
mode_up() {
    case $1 in
    route) ip -n "$SRV" route add $LAN via $WAN_IP ;;
    kernel-nat)
        run_in "$GW" nft -f - <<EOF
table ip vnb_nat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "gw-wan" ip saddr $CLIENT counter snat ip to $NAT_ADDR
    }
}
EOF
        ;;
    tun-copy*)
        ip -n "$SRV" route add $LAN via $WAN_IP
        local flags=()
        case $1 in tun-copy-offload) flags=(--offload) ;; tun-copy-mq-offload) flags=(--offload --queues 2) ;; esac
        ip netns exec "$GW" "$TUNCOPY" "$TUN" "${flags[@]}" >"$LOGDIR/$2.out" 2>"$LOGDIR/$2.err" &
        FWD_PID=$!
        wait_link || { log "tun_copy did not open $TUN"; return 1; }
        ip -n "$GW" link set "$TUN" up
        run_in "$GW" sysctl -qw net.ipv4.conf.$TUN.rp_filter=0 net.ipv4.conf.$TUN.accept_local=1
        ip -n "$GW" route replace default dev "$TUN" table $TABLE
        ip -n "$GW" rule add priority $PRIO iif "$TUN" lookup main
        ip -n "$GW" rule add priority $((PRIO + 1)) to $POOL lookup $TABLE
        # Both directions cross the TUN, as with the gateway (whose replies go to the pool).
        ip -n "$GW" rule add priority $((PRIO + 3)) iif gw-wan to $LAN lookup $TABLE
        ip -n "$GW" rule add priority $((PRIO + 4)) from $LAN lookup $TABLE
        ;;
    vipgate*)
        mkdir -p "$TMP/state"
        local opts=(--offload off)
        case $1 in vipgate-offload) opts=(--offload on) ;; vipgate-mq-offload) opts=(--offload on --queues 2) ;; esac
        ip netns exec "$GW" "$VIPGATE" gateway --lan $LAN --pool $POOL --tun "$TUN" "${opts[@]}" \
            --state-dir "$TMP/state" --control-socket "$TMP/control.sock" --no-authority \
            >"$LOGDIR/$2.out" 2>"$LOGDIR/$2.err" &
        FWD_PID=$!
        for _ in $(seq 100); do
            "$VIPGATE" stats --control-socket "$TMP/control.sock" >/dev/null 2>&1 && return 0
            kill -0 "$FWD_PID" 2>/dev/null || break
            sleep 0.1
        done
        log "vipgate did not start:"; sed 's/^/    /' "$LOGDIR/$2.err" >&2; return 1
        ;;
    esac
}
mode_down() {
    case $1 in
    route) ip -n "$SRV" route del $LAN via $WAN_IP 2>/dev/null || true ;;
    kernel-nat) run_in "$GW" nft delete table ip vnb_nat 2>/dev/null || true ;;
    tun-copy*)
        ip -n "$SRV" route del $LAN via $WAN_IP 2>/dev/null || true
        for p in 0 1 3 4; do ip -n "$GW" rule del priority $((PRIO + p)) 2>/dev/null || true; done
        ip -n "$GW" route flush table $TABLE 2>/dev/null || true
        stop_fwd
        ;;
    vipgate*)
        [ -z "$FWD_PID" ] || "$VIPGATE" stats --control-socket "$TMP/control.sock" \
            >"$LOGDIR/$2.stats" 2>&1 || true
        stop_fwd
        rm -rf "$TMP/state" "$TMP/control.sock"
        ;;
    esac
    local now
    now=$(gw_state)
    if [ "$now" != "$GW_BASELINE" ]; then
        log "mode $1 left state behind in the gateway namespace:"
        diff <(echo "$GW_BASELINE") <(echo "$now") | sed 's/^/    /' >&2 || true
        FAILED+=("$1: state left behind")
        for p in $(seq $PRIO $((PRIO + 9))); do
            while ip -n "$GW" rule del priority "$p" 2>/dev/null; do :; done
        done
        ip -n "$GW" route flush table $TABLE 2>/dev/null || true
        run_in "$GW" nft flush ruleset || true
        GW_BASELINE=$(gw_state)
    fi
}

# ---------------------------------------------------------------- tests
PORT=5200
iperf_test() { # iperf_test TAG ARGS... -> prints "seen_src client.json server.json"
    local tag=$1; shift
    local sj=$LOGDIR/$tag.server.json cj=$LOGDIR/$tag.client.json
    run_in "$SRV" timeout $((DUR + 20)) iperf3 -s -1 -B $SERVER -p $PORT --json >"$sj" 2>&1 &
    local spid=$!
    for _ in $(seq 50); do
        run_in "$SRV" ss -Hltn "sport = :$PORT" | grep -q . && break; sleep 0.05
    done
    run_in "$CLI" timeout $((DUR + 15)) iperf3 -c $SERVER -p $PORT -t "$DUR" --json "$@" \
        >"$cj" 2>&1 || true
    wait "$spid" 2>/dev/null || true
    jq -r '[.start.connected[]?.remote_host] | unique | join(",")' "$sj" 2>/dev/null || echo "?"
}
expect_src() { # expect_src MODE SEEN -> 0 if the server saw what the mode must show
    case $1 in
    kernel-nat) [ "$2" = "$NAT_ADDR" ] ;;
    vipgate*) [[ $2 =~ ^198\.19\.0\.[0-9]+$ ]] ;;
    *) [ "$2" = "$CLIENT" ] ;;
    esac
}

echo "rep,mode,test,value,value2,cpu_pct,seen_src" >"$CSV"
FAILED=()
run_mode() { # run_mode MODE REP
    local m=$1 r=$2 tag=$1.r$2 t0 c0 c1 t1 seen v v2
    if [ "$(date +%s)" -gt "$DEADLINE" ]; then log "time bound reached, skipping $m"; FAILED+=("$m r$r: time bound"); return; fi
    log "rep $r: $m"
    if ! mode_up "$m" "$tag"; then FAILED+=("$m r$r: set-up failed"); mode_down "$m" "$tag"; return; fi
    # ping: the path works at all, and RTT
    c0=$(cpu_ticks); t0=$(date +%s%N)
    run_in "$CLI" timeout 20 ping -n -c 50 -i 0.01 -W 1 $SERVER >"$LOGDIR/$tag.ping" 2>&1 || true
    c1=$(cpu_ticks); t1=$(date +%s%N)
    read -r v v2 < <(grep -o 'time=[0-9.]*' "$LOGDIR/$tag.ping" | cut -d= -f2 | sort -g |
        awk '{a[NR]=$1*1000; s+=$1*1000} END {if (NR) printf "%.0f %.0f\n", a[int((NR+1)/2)], s/NR; else print "- -"}')
    if [ "$v" = - ]; then
        log "$m: ping got no replies"; FAILED+=("$m r$r: no ping replies"); mode_down "$m" "$tag"; return
    fi
    echo "$r,$m,ping,$v,$v2,$(cpu_pct "$c0" "$c1" "$t0" "$t1")," >>"$CSV"
    local test args
    for test in tcp1 tcp4 udp; do
        case $test in
        tcp1) args=(-P 1) ;; tcp4) args=(-P 4) ;; udp) args=(-u -l 64 -b 0) ;;
        esac
        PORT=$((PORT + 1))
        local perfpid=
        if [ "$PERF" = 1 ] && [ "$r" = 1 ] && [ -n "$FWD_PID" ] && [ "$test" != tcp4 ]; then
            (sleep 1; exec perf record -q -g -o "$LOGDIR/$tag.$test.perf" -p "$FWD_PID" -- sleep $((DUR > 3 ? DUR - 2 : 1))) \
                >/dev/null 2>&1 &
            perfpid=$!
        fi
        c0=$(cpu_ticks); t0=$(date +%s%N)
        seen=$(iperf_test "$tag.$test" "${args[@]}")
        c1=$(cpu_ticks); t1=$(date +%s%N)
        if [ -n "$perfpid" ]; then
            wait "$perfpid" 2>/dev/null || true
            perf report -q -i "$LOGDIR/$tag.$test.perf" --no-children --sort sym --percent-limit 1.5 \
                -g none 2>/dev/null | grep -v '^$' | head -25 >"$LOGDIR/perf-$tag.$test.txt" || true
        fi
        local sj=$LOGDIR/$tag.$test.server.json cj=$LOGDIR/$tag.$test.client.json
        if [ "$test" = udp ]; then
            # received pps = (server's highest sequence - gaps) / seconds; loss vs. sent
            read -r v v2 < <(jq -r --slurpfile c "$cj" '
                (.end.sum.packets - .end.sum.lost_packets) as $rx
                | ($c[0].end.sum.packets // $c[0].end.sum_sent.packets) as $tx
                | "\($rx / .end.sum.seconds / 1000) \(if $tx > 0 then 100 * (1 - $rx / $tx) else 0 end)"' \
                "$sj" 2>/dev/null || echo "- -")
        else
            read -r v v2 < <(jq -r '"\(.end.sum_received.bits_per_second / 1e9) -"' "$sj" 2>/dev/null ||
                echo "- -")
        fi
        echo "$r,$m,$test,$v,$v2,$(cpu_pct "$c0" "$c1" "$t0" "$t1"),$seen" >>"$CSV"
        if ! expect_src "$m" "$seen"; then
            log "$m $test: the server saw '$seen', expected $(case $m in kernel-nat) echo $NAT_ADDR;; vipgate*) echo "an address of $POOL";; *) echo $CLIENT;; esac)"
            FAILED+=("$m r$r $test: server saw '$seen'")
        fi
        [ "$v" != - ] || FAILED+=("$m r$r $test: no result")
    done
    if [ "$m" = kernel-nat ]; then
        run_in "$GW" nft list table ip vnb_nat | grep -o 'packets [0-9]*' | head -1 >"$LOGDIR/$tag.nft" || true
    fi
    mode_down "$m" "$tag"
}
cpu_pct() { # cpu_pct TICKS0 TICKS1 NS0 NS1 -> % of one core, "-" without a forwarder
    [ -n "$FWD_PID" ] || { echo -; return; }
    awk -v a="$1" -v b="$2" -v t0="$3" -v t1="$4" -v hz="$HZ" \
        'BEGIN {printf "%.0f", 100 * (b - a) / hz / ((t1 - t0) / 1e9)}'
}

for r in $(seq "$REPS"); do
    n=${#MODE_LIST[@]}
    for i in $(seq 0 $((n - 1))); do
        run_mode "${MODE_LIST[$(( (i + r - 1) % n ))]}" "$r"
    done
done

# ---------------------------------------------------------------- report
stat() { # stat MODE TEST COLUMN [FMT] -> "median [min–max]"
    awk -F, -v m="$1" -v t="$2" -v c="$3" '$2 == m && $3 == t && $c != "-" && $c != "" {print $c}' "$CSV" |
        sort -g | awk -v f="${4:-%.2f}" '{a[NR]=$1} END {
            if (!NR) {print "–"; exit}
            med = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2
            if (NR == 1) printf f "\n", med; else printf f " [" f "–" f "]\n", med, a[1], a[NR]}'
}
median() { stat "$1" "$2" "$3" %.6g | awk '{print $1}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "–" || b == "–" || b + 0 == 0) print "–"; else printf "%.2f", a / b}'; }

{
echo
echo "netbench: REPS=$REPS DUR=$DUR, $(nproc) CPUs, $(date -u +%Y-%m-%d)"
echo
echo "| mode | TCP ×1 Gbit/s | TCP ×4 Gbit/s | UDP-64 rx kpps | UDP loss % | RTT p50 µs | RTT avg µs | fwd CPU % tcp1/tcp4/udp |"
echo "|---|---|---|---|---|---|---|---|"
for m in "${MODE_LIST[@]}"; do
    echo "| $m | $(stat "$m" tcp1 4) | $(stat "$m" tcp4 4) | $(stat "$m" udp 4 %.0f) | $(stat "$m" udp 5 %.1f) | $(stat "$m" ping 4 %.0f) | $(stat "$m" ping 5 %.0f) | $(median "$m" tcp1 6 | cut -d. -f1)/$(median "$m" tcp4 6 | cut -d. -f1)/$(median "$m" udp 6 | cut -d. -f1) |"
done
for ref in kernel-nat tun-copy tun-copy-offload tun-copy-mq-offload; do
    [[ " ${MODE_LIST[*]} " == *" $ref "* ]] || continue
    echo
    echo "Ratios of medians to $ref (higher is better, except RTT):"
    echo
    echo "| mode | TCP ×1 | TCP ×4 | UDP-64 rx pps | RTT p50 |"
    echo "|---|---|---|---|---|"
    for m in "${MODE_LIST[@]}"; do
        [ "$m" != "$ref" ] || continue
        echo "| $m | $(ratio "$(median "$m" tcp1 4)" "$(median $ref tcp1 4)") | $(ratio "$(median "$m" tcp4 4)" "$(median $ref tcp4 4)") | $(ratio "$(median "$m" udp 4)" "$(median $ref udp 4)") | $(ratio "$(median "$m" ping 4)" "$(median $ref ping 4)") |"
    done
done
echo
echo "Source address the server saw, per mode: $(awk -F, 'NR > 1 && $7 != "" && !seen[$2 FS $7]++ {s[$2] = s[$2] (s[$2] ? " " : "") $7}
    END {for (m in s) printf "%s %s; ", m, s[m]}' "$CSV")"
echo "Raw results: $CSV$([ -n "${NETBENCH_LOGDIR:-}" ] || echo ' (removed at exit; set NETBENCH_CSV/NETBENCH_LOGDIR to keep)')"
} | tee "$TMP/report.md"
if [ -n "${NETBENCH_LOGDIR:-}" ]; then cp "$TMP/report.md" "$LOGDIR/report.md"; fi

if [ ${#FAILED[@]} -gt 0 ]; then
    echo
    echo "netbench: FAILED:" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "netbench: ok"
