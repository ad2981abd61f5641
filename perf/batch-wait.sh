#!/usr/bin/env bash
# server.batch_wait sweep: what each batch wait costs in latency and saves in CPU at a
# paced rate of cache hits. One ringdns (one worker, CPU 1) inside its own network namespace
# (loopback only), knotd and loadgen on CPU 0 — perf/run.sh's paced method — warmed once; then
# for each round, each wait in turn: rewrite the config, SIGHUP (a live reload: the cache stays),
# send --rate qps of the hot set for --seconds, and print CPU µs per answer (process
# utime+stime ticks as run.sh, and the threads' on-CPU ns from /proc/PID/task/*/schedstat),
# p50/p90/p99/max µs and lost. Rounds interleave the waits so slow drifts of the host hit all.
#
# Usage: perf/batch-wait.sh DIR [--runs N] [--rate QPS] [--seconds S] [--waits LIST]
#                           [--io uring|epoll] [--addresses 1|2] [BIN]
#   DIR     a temp dir kept by `perf/run.sh --keep` (zones, knot.conf, hot.txt)
#   --runs  rounds (default 3); --rate (default 20000); --seconds per point (default 5)
#   --waits comma-separated batch_wait values (default 0s,50us,100us,200us,400us,1ms)
#   --io    the worker's backend (default uring)
#   --addresses  listen addresses (default 1); with 2 (127.0.0.2 and 127.0.0.3, as a node's
#           link-local IP and ClusterIP) two loadgens send half the rate each
#   BIN     the ringdns binary (default target/release/ringdns)
# Needs root (unshare -n).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "batch-wait.sh: error: $*" >&2; exit 1; }

# start_pinned, stop_pid, ab_setup, in_own_netns, ticks, on_cpu_ns
# shellcheck source=perf/lib.sh
source "$repo/perf/lib.sh"
in_own_netns "$@"

dir="${1:-}"; shift || true
[[ -f "$dir/knot/knot.conf" && -f "$dir/hot.txt" ]] || die "DIR must be a dir kept by perf/run.sh --keep"
runs=3
rate=20000
seconds=5
waits=0s,50us,100us,200us,400us,1ms
binary="$repo/target/release/ringdns"
io=uring
addresses=1
while (($#)); do
    case "$1" in
        --runs) runs="$2"; shift ;;
        --rate) rate="$2"; shift ;;
        --seconds) seconds="$2"; shift ;;
        --waits) waits="$2"; shift ;;
        --io) io="$2"; shift ;;
        --addresses) addresses="$2"; shift ;;
        *) binary="$1" ;;
    esac
    shift
done
[[ -x "$binary" ]] || die "not an executable: $binary"
[[ $runs =~ ^[1-9][0-9]?$ && $rate =~ ^[1-9][0-9]*$ && $seconds =~ ^[1-9][0-9]?$ ]] ||
    die "--runs 1..99, --rate a positive integer, --seconds 1..99"
[[ $io == uring || $io == epoll ]] || die "--io needs uring or epoll"
[[ $addresses == 1 || $addresses == 2 ]] || die "--addresses needs 1 or 2"
listen='"127.0.0.2:53"'
((addresses == 2)) && listen+=', "127.0.0.3:53"'
IFS=, read -r -a wait_list <<<"$waits"
command -v jq >/dev/null || die "needs jq"
ab_setup ringdns-batch-wait

config() {
    cat >"$work/ringdns.toml" <<EOF
[server]
listen = [$listen]
workers = 1
io = "$io"
batch_wait = "$1"

[[forward]]
zone = "."
upstreams = ["127.0.0.10:53"]

[metrics]
listen = ""
EOF
}

rm -f "$dir/knot/knot.pid"
start_pinned 900 0 "$work/knotd.log" knotd -c "$dir/knot/knot.conf"
knot=$started_pid
sleep 1
config "${wait_list[0]}"
start_pinned 900 1 "$work/ringdns.log" "$binary" run --config "$work/ringdns.toml"
server=$started_pid
for _ in $(seq 100); do grep -q "ready udp" "$work/ringdns.log" && break; sleep 0.1; done
grep -q "ready udp" "$work/ringdns.log" || { cat "$work/ringdns.log" >&2; die "ringdns did not start"; }
# Warm: the hot set twice, slowly (knotd shares CPU 0).
for _ in 1 2; do
    timeout 60 "$loadgen" --server 127.0.0.2:53 --cpu 0 --json --queries "$dir/hot.txt" \
        --max-queries 2000 --inflight 20 --wait epoll --duration 20 >/dev/null 2>&1 ||
        die "warming failed"
done
hz=$(getconf CLK_TCK)
queries=$((rate * seconds))
echo "binary=$binary io=$io addresses=$addresses rate=$rate seconds=$seconds runs=$runs waits=$waits nproc=$(nproc) kernel=$(uname -r)"
for ((run = 1; run <= runs; run++)); do
    for wait in "${wait_list[@]}"; do
        reloads=$(grep -c "reload applied" "$work/ringdns.log" || true)
        config "$wait"
        kill -HUP "$server"
        for _ in $(seq 50); do
            (($(grep -c "reload applied" "$work/ringdns.log" || true) > reloads)) && break
            sleep 0.1
        done
        (($(grep -c "reload applied" "$work/ringdns.log" || true) > reloads)) ||
            { cat "$work/ringdns.log" >&2; die "reload to batch_wait=$wait not applied"; }
        t0=$(ticks "$server"); n0=$(on_cpu_ns "$server")
        pids=()
        for ((a = 1; a <= addresses; a++)); do
            timeout 120 "$loadgen" --server "127.0.0.$((a + 1)):53" --cpu 0 --json --queries "$dir/hot.txt" \
                --rate $((rate / addresses)) --duration "$seconds" --max-queries $((queries / addresses)) \
                >"$work/lg$a.json" 2>/dev/null &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do wait "$pid" || die "loadgen failed at batch_wait=$wait"; done
        t1=$(ticks "$server"); n1=$(on_cpu_ns "$server")
        # One line per point: CPU over every answer; latency per address (127.0.0.2, then .3).
        jq -rs --arg wait "$wait" --argjson run "$run" --argjson t $((t1 - t0)) --argjson n $((n1 - n0)) \
            --argjson hz "$hz" '(map(.answered) | add) as $a | "run \($run) batch_wait=\($wait): answered=\($a)/\(map(.sent) | add) lost=\(map(.lost) | add) cpu_us/answer ticks=\($t / $hz * 1e6 / $a * 100 | round / 100) schedstat=\($n / 1e3 / $a * 100 | round / 100) p50/p90/p99/max_us=\(map("\(.p50_us)/\(.p90_us)/\(.p99_us)/\(.max_us)") | join(" "))"' \
            "$work"/lg[0-9].json
    done
done
stop_pid "$server"
stop_pid "$knot"
