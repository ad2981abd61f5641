#!/usr/bin/env bash
# Measures loadgen against udp-echo inside a private network namespace (loopback only), the way
# shared/ANCHORS.md measured the peers: echo pinned to one CPU, loadgen to another, echo CPU per
# answer from utime+stime in /proc/PID/stat.
#
# Usage: perf/loadgen/scripts/echo-bench.sh [--echo-mode mmsg|single] [--echo-cpu 1] [loadgen args...]
# Example: perf/loadgen/scripts/echo-bench.sh --cpu 0 --name svc-1.default.svc.cluster.local --duration 10
#          perf/loadgen/scripts/echo-bench.sh --cpu 0 --name svc-1.default.svc.cluster.local --rate 20000
# Build first: cargo build --release -p ringdns-loadgen. Needs root (unshare -n).
set -euo pipefail

if [[ "${ECHO_BENCH_IN_NETNS:-}" != 1 ]]; then
    exec unshare -n env ECHO_BENCH_IN_NETNS=1 "$0" "$@"
fi
ip link set lo up

bin_dir="${BIN_DIR:-$(cd "$(dirname "$0")/../../.." && pwd)/target/release}"
echo_mode=mmsg
echo_cpu=1
args=()
while (($#)); do
    case "$1" in
        --echo-mode) echo_mode="$2"; shift 2 ;;
        --echo-cpu) echo_cpu="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

port=5300
# Scratch files go to a temp dir, not the caller's working directory.
work="$(mktemp -d /tmp/echo-bench.XXXXXX)"
# The echo stops by itself after 120 s even if this script dies.
"$bin_dir/udp-echo" --listen "127.0.0.1:$port" --mode "$echo_mode" --cpu "$echo_cpu" \
    --max-seconds 120 2>"$work/echo.err" &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do grep -q ready "$work/echo.err" 2>/dev/null && break; sleep 0.05; done

ticks() { awk '{print $14 + $15}' "/proc/$echo_pid/stat"; }
before=$(ticks)
"$bin_dir/loadgen" --server "127.0.0.1:$port" --json "${args[@]}" >"$work/loadgen.json"
after=$(ticks)
kill "$echo_pid"
wait "$echo_pid" || true
trap 'rm -rf "$work"' EXIT

hz=$(getconf CLK_TCK)
answered=$(sed -E 's/.*"answered":([0-9]+).*/\1/' "$work/loadgen.json")
cat "$work/echo.err" >&2
awk -v t=$((after - before)) -v hz="$hz" -v n="$answered" -v mode="$echo_mode" \
    'BEGIN { printf "echo mode=%s cpu_s=%.2f cpu_us_per_answer=%.3f\n", mode, t / hz, n ? t / hz * 1e6 / n : 0 }'
cat "$work/loadgen.json"
