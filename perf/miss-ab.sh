#!/usr/bin/env bash
# A/B of ringdns builds on the miss path: runs each binary on the same 40,000-miss set, in
# turn, N times, each run on a freshly started server inside its own network namespace
# (loopback only), knotd and loadgen on CPU 0, ringdns on CPU 1 — perf/run.sh's miss method —
# and prints CPU µs per miss per run: process utime+stime (ticks, as run.sh) and the sum of the
# threads' on-CPU time from /proc/PID/task/*/schedstat (ns), with the worker/ctl split.
#
# Usage: perf/miss-ab.sh DIR [--runs N] [--transport udp|tcp] [--io uring|epoll] BIN...
#   DIR  a temp dir kept by `perf/run.sh --keep` (zones, knot.conf, miss.txt)
#   BIN  ringdns binaries to compare (copy them out of target/ first)
# Needs root (unshare -n). Interleaves A B A B ... so slow drifts of the host hit all alike.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "miss-ab.sh: error: $*" >&2; exit 1; }

# start_pinned, stop_pid, ab_setup, in_own_netns, ticks, on_cpu_ns
# shellcheck source=perf/lib.sh
source "$repo/perf/lib.sh"
in_own_netns "$@"

dir="${1:-}"; shift || true
[[ -f "$dir/knot/knot.conf" && -f "$dir/miss.txt" ]] || die "DIR must be a dir kept by perf/run.sh --keep"
runs=3
transport=udp
io=uring
binaries=()
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --transport) transport="$2"; shift ;;
        --io) [[ $2 == uring || $2 == epoll ]] || die "--io needs uring or epoll"; io="$2"; shift ;;
        *) [[ -x "$1" ]] || die "not an executable: $1"; binaries+=("$1") ;;
    esac
    shift
done
((${#binaries[@]} > 0)) || die "give at least one ringdns binary"
ab_setup ringdns-ab
thread_ns() {
    local task
    for task in /proc/"$1"/task/*; do
        # shellcheck disable=SC2053 # $2 is a glob: the main thread's name (the binary's) must
        # not match the worker's pattern, whatever the binary is called.
        [[ "$(cat "$task/comm")" == $2 ]] && awk '{print $1}' "$task/schedstat" && return
    done
    echo 0
}

rm -f "$dir/knot/knot.pid"
start_pinned 300 0 "$work/knotd.log" knotd -c "$dir/knot/knot.conf"
knot=$started_pid
sleep 1
cat >"$work/ringdns.toml" <<EOF
[server]
listen = ["127.0.0.2:53"]
workers = 1
io = "$io"

[[forward]]
zone = "."
upstreams = ["127.0.0.10:53"]
transport = "$transport"

[metrics]
listen = ""

[log]
level = "info"
EOF
hz=$(getconf CLK_TCK)
misses=$(wc -l <"$dir/miss.txt")
echo "transport=$transport io=$io misses/run=$misses runs=$runs"
for ((run = 1; run <= runs; run++)); do
    for binary in "${binaries[@]}"; do
        start_pinned 300 1 "$work/ringdns.log" "$binary" run --config "$work/ringdns.toml"
        server=$started_pid
        for _ in $(seq 100); do grep -q "ready udp" "$work/ringdns.log" && break; sleep 0.1; done
        grep -q "ready udp" "$work/ringdns.log" || { cat "$work/ringdns.log" >&2; die "$binary did not start"; }
        t0=$(ticks "$server"); n0=$(on_cpu_ns "$server")
        w0=$(thread_ns "$server" 'ringdns-w[0-9]*'); c0=$(thread_ns "$server" ringdns-ctl)
        timeout 60 "$loadgen" --server 127.0.0.2:53 --cpu 0 --json --queries "$dir/miss.txt" \
            --max-queries "$misses" --duration 30 --wait epoll --timeout-ms 2000 >"$work/lg.json" 2>/dev/null ||
            die "loadgen failed against $binary"
        t1=$(ticks "$server"); n1=$(on_cpu_ns "$server")
        w1=$(thread_ns "$server" 'ringdns-w[0-9]*'); c1=$(thread_ns "$server" ringdns-ctl)
        stop_pid "$server"
        answered=$(grep -o '"answered":[0-9]*' "$work/lg.json" | cut -d: -f2)
        awk -v b="$binary" -v t=$((t1 - t0)) -v n=$((n1 - n0)) -v w=$((w1 - w0)) -v c=$((c1 - c0)) \
            -v a="$answered" -v hz="$hz" -v run="$run" 'BEGIN {
            printf "run %d %s: answered=%d cpu_us/miss ticks=%.2f schedstat=%.2f (worker %.2f, ctl %.2f)\n",
                run, b, a, t / hz * 1e6 / a, n / 1e3 / a, w / 1e3 / a, c / 1e3 / a }'
    done
done
stop_pid "$knot"
