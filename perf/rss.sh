#!/usr/bin/env bash
# Resident memory of ringdns builds: for each binary in turn, on a freshly started server (one
# worker, io_uring) inside its own network namespace (loopback only), knotd and loadgen on CPU 0,
# ringdns on CPU 1 — perf/run.sh's placement — prints VmRSS idle, with both caches full and after
# a burst of misses, with the cache entry gauges and the process's THP_enabled:
#   idle   after start-up;
#   full   after 10,000 names under example.test's wildcard (NOERROR) and 10,000 missing names
#          (NXDOMAIN), none of them in the miss set, each asked once, 50 in flight: both caches
#          at their 9984-entry default (checked on the gauges);
#   burst  after the 40,000 distinct misses of perf/run.sh's miss set, 1,000 in flight.
#
# Usage: perf/rss.sh DIR BIN...
#   DIR  a temp dir kept by `perf/run.sh --keep` (zones, knot.conf, miss.txt)
#   BIN  ringdns binaries to compare (copy them out of target/ first)
# Needs root (unshare -n), curl and kdig.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "rss.sh: error: $*" >&2; exit 1; }

# start_pinned, stop_pid, ab_setup, in_own_netns, ticks, on_cpu_ns
# shellcheck source=perf/lib.sh
source "$repo/perf/lib.sh"
in_own_netns "$@"

dir="${1:-}"; shift || true
[[ -f "$dir/knot/knot.conf" && -f "$dir/miss.txt" ]] || die "DIR must be a dir kept by perf/run.sh --keep"
binaries=()
for binary in "$@"; do
    [[ -x "$binary" ]] || die "not an executable: $binary"
    binaries+=("$binary")
done
((${#binaries[@]} > 0)) || die "give at least one ringdns binary"
command -v curl >/dev/null && command -v kdig >/dev/null || die "needs curl and kdig"
ab_setup ringdns-rss

# The fill: names none of which are in the miss set, so that the burst is 40,000 misses.
for ((n = 0; n < 10000; n++)); do
    echo "fill-$n.example.test A"
    echo "nx-$n.default.svc.cluster.local A"
done >"$work/fill.txt"

rm -f "$dir/knot/knot.pid"
start_pinned $((120 + 300 * ${#binaries[@]})) 0 "$work/knotd.log" knotd -c "$dir/knot/knot.conf"
knot=$started_pid
for _ in $(seq 50); do
    [[ "$(kdig @127.0.0.10 +time=1 +retry=0 +short kubernetes.default.svc.cluster.local A 2>/dev/null)" == 10.96.0.1 ]] && break
    sleep 0.2
done
[[ "$(kdig @127.0.0.10 +time=1 +retry=0 +short kubernetes.default.svc.cluster.local A 2>/dev/null)" == 10.96.0.1 ]] ||
    { cat "$work/knotd.log" >&2; die "knotd did not answer (50 tries)"; }
cat >"$work/ringdns.toml" <<EOF
[server]
listen = ["127.0.0.2:53"]
workers = 1
io = "uring"

[[forward]]
zone = "."
upstreams = ["127.0.0.10:53"]

[metrics]
listen = "127.0.0.2:9253"
EOF

# Field $2 of /proc/$1/status (empty if this kernel has none); dies with ringdns' log if the
# process has gone.
status() {
    [[ -r "/proc/$1/status" ]] || { cat "$work/ringdns.log" >&2; die "ringdns (pid $1) has exited"; }
    awk -v key="$2:" '$1 == key {print $2}' "/proc/$1/status"
}
# The coredns_cache_entries gauge of kind $1 (success, denial); empty if /metrics did not answer.
entries() {
    { curl --noproxy '*' -s --max-time 5 http://127.0.0.2:9253/metrics || true; } |
        awk -v kind="type=\"$1\"" 'index($0, "coredns_cache_entries{") == 1 && index($0, kind) {value = $2} END {print value}'
}
echo "nproc=$(nproc) kernel=$(uname -r) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown)"
for binary in "${binaries[@]}"; do
    start_pinned 300 1 "$work/ringdns.log" "$binary" run --config "$work/ringdns.toml"
    server=$started_pid
    for _ in $(seq 100); do grep -q "ready udp" "$work/ringdns.log" && break; sleep 0.1; done
    grep -q "ready udp" "$work/ringdns.log" || { cat "$work/ringdns.log" >&2; die "$binary did not start"; }
    idle=$(status "$server" VmRSS)
    [[ -n "$idle" ]] || die "no VmRSS for ringdns (pid $server)"
    timeout 120 "$loadgen" --server 127.0.0.2:53 --cpu 0 --json --queries "$work/fill.txt" \
        --max-queries 20000 --inflight 50 --wait epoll --timeout-ms 2000 >"$work/fill.json" 2>/dev/null ||
        die "the fill failed against $binary"
    full=$(status "$server" VmRSS)
    success=$(entries success)
    denial=$(entries denial)
    [[ "$success" == 9984 && "$denial" == 9984 ]] ||
        die "$binary: caches not full after the fill (success=${success:-?} denial=${denial:-?})"
    timeout 120 "$loadgen" --server 127.0.0.2:53 --cpu 0 --json --queries "$dir/miss.txt" \
        --max-queries 40000 --inflight 1000 --wait epoll --timeout-ms 2000 >"$work/burst.json" 2>/dev/null ||
        die "the burst failed against $binary"
    burst=$(status "$server" VmRSS)
    thp=$(status "$server" THP_enabled)
    stop_pid "$server"
    answered() { grep -o '"answered":[0-9]*' "$1" | cut -d: -f2; }
    echo "$binary: VmRSS idle ${idle} kB, full ${full} kB (entries success=$success denial=$denial; answered $(answered "$work/fill.json")/20000), burst ${burst} kB (answered $(answered "$work/burst.json")/40000); THP_enabled=${thp:-n/a}"
done
stop_pid "$knot"
