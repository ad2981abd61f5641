#!/usr/bin/env bash
# What a client sees while ringdns is replaced under load, inside its own network namespace
# (loopback only): knotd from a perf/run.sh --keep dir as upstream, a paced loadgen (the hot
# set plus distinct misses) against 127.0.0.2:53, and one replacement in the middle:
#
#   handover  the new instance starts beside the old one with the same `[node] handover` path,
#             takes its sockets; the old one is sent SIGTERM once it idles (a DaemonSet update
#             with maxSurge and node.handover)
#   restart   the old instance gets SIGTERM (its 5 s lame duck, then exit), and the new one
#             starts when it has exited (a DaemonSet update without surge, or systemctl restart)
#
# Prints, per mode and run, what loadgen counted: sent, answered, lost (no answer by the end),
# late (answered after --timeout-ms), p50/p99/max latency of the answered.
#
# Usage: perf/upgrade.sh DIR [--runs N] [--rate QPS] [--seconds S] [BIN]
#   DIR  a temp dir kept by `perf/run.sh --keep` (zones, knot.conf, hot.txt, miss.txt)
#   BIN  the ringdns binary (default target/release/ringdns)
# Needs root (unshare -n). Every process it starts is bounded by `timeout` and stopped by PID.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "upgrade.sh: error: $*" >&2; exit 1; }

# start_pinned, stop_pid, ab_setup, in_own_netns, ticks, on_cpu_ns
# shellcheck source=perf/lib.sh
source "$repo/perf/lib.sh"
in_own_netns "$@"

dir="${1:-}"; shift || true
[[ -f "$dir/knot/knot.conf" && -f "$dir/hot.txt" && -f "$dir/miss.txt" ]] ||
    die "DIR must be a dir kept by perf/run.sh --keep"
runs=1
rate=20000
seconds=10
binary="$repo/target/release/ringdns"
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --rate) rate="$2"; shift ;;
        --seconds) seconds="$2"; shift ;;
        *) binary="$1" ;;
    esac
    shift
done
[[ -x "$binary" ]] || die "not an executable: $binary (cargo build --release)"
ab_setup ringdns-upgrade
# Nothing is pinned here: every CPU.
cpus="0-$(($(nproc) - 1))"

# Waits (at most 20 s) until file $1 has a line matching $2.
wait_line() {
    for _ in $(seq 400); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    die "no line '$2' in $1"
}

# Waits (at most 30 s) until process $1 has exited.
wait_gone() {
    for _ in $(seq 600); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    die "process $1 did not exit"
}

rm -f "$dir/knot/knot.pid"
start_pinned 300 "$cpus" "$work/knot.log" knotd -c "$dir/knot/knot.conf"
knot=$started_pid
# Queries: the hot set, with one distinct miss in every 20 (misses are in flight at any time).
awk 'NR == FNR { hot[n++] = $0; next } { print hot[FNR % n]; if (FNR % 20 == 0) print }' \
    "$dir/hot.txt" "$dir/miss.txt" >"$work/queries.txt"
cat >"$work/ringdns.toml" <<EOF
[server]
listen = ["127.0.0.2:53"]
workers = 1
io = "uring"
[[forward]]
zone = "."
upstreams = ["127.0.0.10:53"]
transport = "udp"
[metrics]
listen = "127.0.0.2:9253"
[health]
listen = "127.0.0.2:8080"
[node]
handover = "$work/run/handover.sock"
EOF
sed '/^handover = /d' "$work/ringdns.toml" >"$work/ringdns-plain.toml"

printf '%-9s %3s %8s %8s %6s %6s %8s %8s %8s\n' mode run sent answered lost late p50_us p99_us max_us
for ((run = 1; run <= runs; run++)); do
    for mode in handover restart; do
        config="$work/ringdns.toml"
        [[ $mode == restart ]] && config="$work/ringdns-plain.toml"
        start_pinned 300 "$cpus" "$work/old.log" "$binary" run --config "$config"
        old=$started_pid
        wait_line "$work/old.log" "ready udp"
        "$loadgen" --server 127.0.0.2:53 --queries "$work/queries.txt" --rate "$rate" \
            --duration "$seconds" --timeout-ms 1000 --json >"$work/lg.json" 2>/dev/null &
        load=$!
        sleep 2
        if [[ $mode == handover ]]; then
            start_pinned 300 "$cpus" "$work/new.log" "$binary" run --config "$config"
            new=$started_pid
            wait_line "$work/old.log" "handover: done"
            kill -TERM "$old"
            wait_gone "$old"
        else
            kill -TERM "$old"
            wait_gone "$old"
            start_pinned 300 "$cpus" "$work/new.log" "$binary" run --config "$config"
            new=$started_pid
            wait_line "$work/new.log" "ready udp"
        fi
        wait "$load" || true
        kill -TERM "$new"
        wait_gone "$new"
        jq -r --arg mode "$mode" --arg run "$run" \
            '"\($mode) \($run) \(.sent) \(.answered) \(.lost) \(.late) \(.p50_us) \(.p99_us) \(.max_us)"' \
            "$work/lg.json" | xargs printf '%-9s %3s %8s %8s %6s %6s %8s %8s %8s\n'
    done
done
stop_pid "$knot"
