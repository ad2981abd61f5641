#!/usr/bin/env bash
# ringdns vs its peers (Unbound, dnsdist) and the kernel's limit (udp-echo), measured the way
# shared/ANCHORS.md measured the peers: a private network namespace (loopback only), knotd on
# 127.0.0.10:53 serving the synthetic cluster zones, the server under test pinned to CPU 1, the
# client (loadgen, testdns) and knotd on CPU 0, server CPU from utime+stime in /proc/PID/stat.
#
# Usage: perf/run.sh [--short] [--only ringdns,unbound,dnsdist,echo] [--no-build] [--keep]
#                    [--no-append]
#   --short      3 s saturated, 5 s paced, testdns -d 3 (the whole run < 3 min)
#   --only       servers to measure (default: all four, in that order)
#   --no-build   do not run cargo/go build first (default: build, a no-op when up to date)
#   --keep       keep the temp dir (zones, configs, every loadgen JSON and server log)
#   --no-append  print the table but do not append it to perf/RESULTS.md
#   --profile    also `perf record` ringdns during each of its runs (implies --keep
#                and --no-append: profiling perturbs the numbers); reports in the temp dir
#   --repeats N  run the paced and miss measurements N times and show the median (default 3;
#                --short: 1); every run's value goes to RESULTS.md
#   --paced-rate QPS  the paced measurement's rate (default 20000, the performance targets';
#                a node's usual few hundred to few thousand qps shows the cost of wake-ups)
#   --io uring|epoll  ringdns' I/O backend (default uring); epoll is what ringdns runs on
#                where io_uring is off (`kernel.io_uring_disabled`, a seccomp profile)
#   --install    apt-get install the Debian packages this needs, then exit
# Needs root (unshare -n / -m, binding port 53). See perf/README.md for what each number means.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$repo/perf/run.sh"
apt_packages=(knot knot-dnsutils bind9-dnsutils dnsperf unbound dnsdist golang-go jq util-linux)

die() { echo "run.sh: error: $*" >&2; exit 1; }
note() { echo "run.sh [${SECONDS}s]: $*" >&2; }

short=0
only="ringdns,unbound,dnsdist,echo"
build=1
keep=0
append=1
profile=0
repeats=""
paced_rate=""
io=uring
args=("$@")
while (($#)); do
    case "$1" in
        --short) short=1 ;;
        --only) [[ $# -ge 2 ]] || die "--only needs a list"; only="$2"; shift ;;
        --no-build) build=0 ;;
        --keep) keep=1 ;;
        --no-append) append=0 ;;
        --profile) profile=1; keep=1; append=0 ;;
        --repeats) [[ $# -ge 2 && $2 =~ ^[1-9]$ ]] || die "--repeats needs 1..9"; repeats="$2"; shift ;;
        --paced-rate) [[ $# -ge 2 && $2 =~ ^[1-9][0-9]{2,5}$ ]] || die "--paced-rate needs 100..999999"
            paced_rate="$2"; shift ;;
        --io) [[ $# -ge 2 && $2 =~ ^(uring|epoll)$ ]] || die "--io needs uring or epoll"; io="$2"; shift ;;
        --install)
            apt-get install -y "${apt_packages[@]}"
            exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$self" | sed '$d'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
IFS=, read -r -a servers <<<"$only"
for server in "${servers[@]}"; do
    case "$server" in ringdns|unbound|dnsdist|echo) ;; *) die "unknown server in --only: $server" ;; esac
done

bin="$repo/target/release"
testdns="$repo/perf/testdns/testdns"

# ---------------------------------------------------------------------------------------------
# Outside the namespace: checks and builds (cargo and go may need the network; the run does not).
if [[ "${RINGDNS_PERF_IN_NETNS:-}" != 1 ]]; then
    [[ $(id -u) == 0 ]] || die "needs root (unshare -n, unshare -m, port 53)"
    missing=()
    for tool in unshare taskset timeout ip getconf jq kdig knotd unbound dnsdist git; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) ||
        die "missing: ${missing[*]}; install with: apt-get install -y ${apt_packages[*]} (or perf/run.sh --install)"
    if ((build)); then
        note "building (cargo build --release -p ringdns -p ringdns-loadgen; go build testdns)"
        (cd "$repo" && cargo build --release --quiet -p ringdns -p ringdns-loadgen) ||
            die "cargo build failed"
        if [[ ! -x "$testdns" || "$repo/perf/testdns/main.go" -nt "$testdns" ]]; then
            command -v go >/dev/null || die "go missing: apt-get install -y golang-go"
            (cd "$repo/perf/testdns" && GOFLAGS=-mod=mod go build -o testdns .) ||
                die "go build of perf/testdns failed"
        fi
    fi
    for binary in "$bin/ringdns" "$bin/loadgen" "$bin/udp-echo" "$testdns"; do
        [[ -x "$binary" ]] || die "$binary missing: cargo build --release -p ringdns -p ringdns-loadgen; (cd perf/testdns && go build -o testdns .)"
    done
    exec unshare -n env RINGDNS_PERF_IN_NETNS=1 RINGDNS_PERF_ARGS="${args[*]:-}" "$self" "${args[@]}"
fi

# ---------------------------------------------------------------------------------------------
# Inside the private network namespace: only loopback exists, nothing can leave the machine.
ip link set lo up
if ip -o route show | grep -qv '^127\.\|^local\|dev lo'; then
    die "the namespace has a non-loopback route; refusing to run"
fi

if ((short)); then
    saturated_s=3; paced_s=5; testdns_s=3
else
    saturated_s=10; paced_s=10; testdns_s=10
fi
# Paced and miss runs are repeated and the median (by CPU per answer) is shown: single runs of
# those moved by ±5–10 % from one to the next on an idle host.
if [[ -z $repeats ]]; then
    if ((short)); then repeats=1; else repeats=3; fi
fi
paced_rate="${paced_rate:-20000}"
paced_queries=$((paced_rate * paced_s))
miss_queries=40000
# Extra loadgen arguments of the saturated run (experiments; recorded in RESULTS.md).
saturated_args="${PERF_SATURATED_ARGS-}"
hz=$(getconf CLK_TCK)
client_cpu=0
server_cpu=1
knot_addr=127.0.0.10
declare -A addr=([ringdns]=127.0.0.2 [unbound]=127.0.0.3 [dnsdist]=127.0.0.4 [echo]=127.0.0.5)

tmp="$(mktemp -d /tmp/ringdns-perf.XXXXXX)"
# Snapshot the binaries: others may rebuild target/release while this runs.
mkdir -p "$tmp/bin"
cp "$bin/ringdns" "$bin/loadgen" "$bin/udp-echo" "$testdns" "$tmp/bin/"
ringdns_binary="$(sha256sum "$bin/ringdns" | cut -c1-12), built $(date -u -r "$bin/ringdns" '+%Y-%m-%d %H:%M UTC')"
bin="$tmp/bin"
testdns="$tmp/bin/testdns"
pids=()     # every long-lived process started (wrappers and servers), stopped on exit
cleanup() {
    local status=$?
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if ((keep)); then note "kept $tmp"; else rm -rf "$tmp"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_pinned, stop_pid
# shellcheck source=perf/lib.sh
source "$repo/perf/lib.sh"

# Waits (≤ 10 s) until $1 answers kubernetes.default.svc.cluster.local A with 10.96.0.1.
wait_dns() {
    local server="$1" pid="$2" log="$3"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "server at $server exited (log above)"; }
        if [[ "$(kdig @"$server" +time=1 +retry=0 +short kubernetes.default.svc.cluster.local A 2>/dev/null)" == 10.96.0.1 ]]; then
            return 0
        fi
        sleep 0.2
    done
    cat "$log" >&2
    die "server at $server did not answer within 10 s"
}

# Waits (≤ 10 s) until log $1 contains $2.
wait_log() {
    for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    cat "$1" >&2
    die "no '$2' in $1 within 10 s"
}

cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_mb() { awk '/^VmRSS:/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
# Busy ticks (everything but idle and iowait) of CPU $1 so far, from /proc/stat.
cpu_busy() { awk -v cpu="cpu$1" '$1 == cpu { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
# Busy share of the whole machine over 1 s, in percent.
host_busy_pct() {
    local a b
    a=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    sleep 1
    b=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]
        printf "%.0f", ((busy + idle) > 0 ? 100 * busy / (busy + idle) : 0) }'
}
# Waits (bounded) until nothing else keeps the machine busy: other people's builds on these two
# cores make every number meaningless (the table marks runs where that happened anyway).
wait_idle() {
    local busy
    for _ in $(seq "$1"); do
        busy=$(host_busy_pct)
        last_busy=$busy
        ((busy < 10)) && return 0
        note "host is ${busy}% busy with other work; waiting for it to settle"
    done
    note "warning: host still ${busy}% busy; measuring anyway (see the notes column)"
}
rcvbuf_errors() {
    awk '/^Udp:/ { if (!header) { for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") col = i; header = 1 } else { print $col; exit } }' /proc/net/snmp
}

# ---------------------------------------------------------------------------------------------
# 1. Zones, hot set, miss set; knotd.
note "generating zones and query sets in $tmp"
mkdir -p "$tmp/knot"
awk 'BEGIN {
    print "$ORIGIN cluster.local."
    print "$TTL 30"
    print "@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30"
    print "@ IN NS ns"
    print "ns IN A 127.0.0.10"
    print "nginx-service.default.svc IN A 10.96.1.1"
    print "nginx-service.default.svc IN AAAA fd00:96::1:1"
    print "kubernetes.default.svc IN A 10.96.0.1"
    print "kube-dns.kube-system.svc IN A 10.96.0.10"
    print "_dns._udp.kube-dns.kube-system.svc IN SRV 0 100 53 kube-dns.kube-system.svc.cluster.local."
    for (n = 0; n < 10000; n++) {
        printf "svc-%d.default.svc IN A 10.100.%d.%d\n", n, int(n / 256), n % 256
        if (n % 2 == 0) printf "svc-%d.default.svc IN AAAA fd00:100::%x\n", n, n
        printf "_http._tcp.svc-%d.default.svc IN SRV 0 100 80 svc-%d.default.svc.cluster.local.\n", n, n
    }
}' >"$tmp/knot/cluster.local.zone"
awk 'BEGIN {
    print "$ORIGIN 10.in-addr.arpa."
    print "$TTL 30"
    print "@ IN SOA ns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30"
    print "@ IN NS ns.cluster.local."
    print "1.0.96 IN PTR kubernetes.default.svc.cluster.local."
    print "10.0.96 IN PTR kube-dns.kube-system.svc.cluster.local."
    print "1.1.96 IN PTR nginx-service.default.svc.cluster.local."
    for (n = 0; n < 10000; n++)
        printf "%d.%d.100 IN PTR svc-%d.default.svc.cluster.local.\n", n % 256, int(n / 256), n
}' >"$tmp/knot/10.in-addr.arpa.zone"
cat >"$tmp/knot/example.test.zone" <<'EOF'
$ORIGIN example.test.
$TTL 300
@ IN SOA ns.example.test. hostmaster.example.test. 1 7200 1800 86400 300
@ IN NS ns
ns IN A 127.0.0.10
* IN A 10.200.0.1
* IN AAAA fd00:200::1
EOF
# The hot set (ANCHORS.md): 400 A, 250 AAAA (odd N: NODATA), 100 SRV, 50 PTR, 150 NXDOMAIN
# search-path expansions, 48 example.test (wildcard), nginx-service A + AAAA = 1,000.
awk 'BEGIN {
    for (n = 0; n < 400; n++) printf "svc-%d.default.svc.cluster.local A\n", n
    for (n = 400; n < 650; n++) printf "svc-%d.default.svc.cluster.local AAAA\n", n
    for (n = 0; n < 100; n++) printf "_http._tcp.svc-%d.default.svc.cluster.local SRV\n", n
    for (n = 0; n < 50; n++) printf "%d.%d.100.10.in-addr.arpa PTR\n", n % 256, int(n / 256)
    split("default.svc.cluster.local svc.cluster.local cluster.local", search, " ")
    for (n = 0; n < 150; n++) printf "host-%d.example.test.%s A\n", int(n / 3), search[n % 3 + 1]
    for (n = 0; n < 48; n++) printf "host-%d.example.test %s\n", int(n / 2), (n % 2 ? "AAAA" : "A")
    print "nginx-service.default.svc.cluster.local A"
    print "nginx-service.default.svc.cluster.local AAAA"
}' >"$tmp/hot.txt"
[[ $(wc -l <"$tmp/hot.txt") == 1000 ]] || die "hot set is not 1,000 names"
# The miss set: 40,000 distinct questions (A, AAAA, SRV, PTR per Service), none in the hot set's
# order; each is asked once of a freshly started server, so every one is a cache miss.
awk 'BEGIN {
    for (n = 0; n < 10000; n++) {
        m = (n * 7919) % 10000   # spread Services so the first part of the file is a fair mix
        printf "svc-%d.default.svc.cluster.local A\n", m
        printf "svc-%d.default.svc.cluster.local AAAA\n", m
        printf "_http._tcp.svc-%d.default.svc.cluster.local SRV\n", m
        printf "%d.%d.100.10.in-addr.arpa PTR\n", m % 256, int(m / 256)
    }
}' >"$tmp/miss.txt"

cat >"$tmp/knot/knot.conf" <<EOF
server:
    rundir: "$tmp/knot"
    listen: $knot_addr@53
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
log:
  - target: stderr
    any: warning
database:
    storage: "$tmp/knot"
template:
  - id: default
    storage: "$tmp/knot"
    journal-content: none
    zonefile-sync: -1
zone:
  - domain: cluster.local
    file: cluster.local.zone
  - domain: 10.in-addr.arpa
    file: 10.in-addr.arpa.zone
  - domain: example.test
    file: example.test.zone
EOF
start_pinned 3600 "$client_cpu" "$tmp/knot/knotd.log" knotd -c "$tmp/knot/knot.conf"
knot_pid=$started_pid
wait_dns "$knot_addr" "$knot_pid" "$tmp/knot/knotd.log"
[[ "$(kdig @$knot_addr +short svc-9999.default.svc.cluster.local A)" == 10.100.39.15 ]] ||
    die "knotd does not serve the generated cluster.local zone"
note "knotd up on $knot_addr:53 (CPU $client_cpu, pid $knot_pid)"

# ---------------------------------------------------------------------------------------------
# 2. Servers.

# Writes the config of server $1 with upstream transport $2 (udp|tcp) into $3; prints the
# command line that runs it.
# Writes ringdns' configuration $1 for the runs: $2 workers, upstream transport $3, metrics on
# $4. NodeLocal DNSCache equivalent: cache defaults (9984 + 9984 entries, 30 s / 5 s caps).
ringdns_config() {
    cat >"$1" <<EOF
# NodeLocal DNSCache equivalent: cache defaults (9984 + 9984 entries, 30 s / 5 s caps).
[server]
listen = ["${addr[ringdns]}:53"]
workers = $2
io = "$io"

[[forward]]
zone = "."
upstreams = ["$knot_addr:53"]
transport = "$3"

[metrics]
listen = "$4"

[log]
level = "info"
EOF
}

server_command() {
    local name="$1" transport="$2" dir="$3" listen="${addr[$1]}"
    mkdir -p "$dir"
    case "$name" in
        ringdns)
            ringdns_config "$dir/ringdns.toml" 1 "$transport" "$listen:9253"
            echo "$bin/ringdns run --config $dir/ringdns.toml" ;;
        unbound)
            local tcp_upstream=no
            [[ $transport == tcp ]] && tcp_upstream=yes
            cat >"$dir/unbound.conf" <<EOF
# Pure forwarder to knotd: no root priming, no DNSSEC, caps like NodeLocal DNSCache's.
server:
    interface: $listen
    port: 53
    num-threads: 1
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$dir"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    do-not-query-localhost: no
    module-config: "iterator"
    qname-minimisation: no
    prefetch: no
    cache-max-ttl: 30
    cache-max-negative-ttl: 5
    msg-cache-size: 4m
    rrset-cache-size: 8m
    tcp-upstream: $tcp_upstream
    access-control: 127.0.0.0/8 allow
forward-zone:
    name: "."
    forward-addr: $knot_addr@53
EOF
            echo "unbound -d -c $dir/unbound.conf" ;;
        dnsdist)
            local tcp_only=false
            [[ $transport == tcp ]] && tcp_only=true
            cat >"$dir/dnsdist.conf" <<EOF
-- Packet cache in front of knotd; one UDP listener; no phone-home.
setSecurityPollSuffix("")
setLocal("$listen:53")
setMaxTCPClientThreads(1)
newServer({address="$knot_addr:53", tcpOnly=$tcp_only, checkName="kubernetes.default.svc.cluster.local."})
pc = newPacketCache(10000, {maxTTL=30, maxNegativeTTL=5})
getPool(""):setCache(pc)
EOF
            echo "dnsdist --supervised --disable-syslog -C $dir/dnsdist.conf" ;;
        echo)
            echo "$bin/udp-echo --listen $listen:53 --mode mmsg --cpu $server_cpu --max-seconds 600" ;;
    esac
}

# Starts server $1 with upstream transport $2; sets server_pid and server_log.
start_server() {
    local name="$1" transport="$2" dir="$tmp/$1-$2"
    local command
    command="$(server_command "$name" "$transport" "$dir")"
    server_log="$dir/server.log"
    # shellcheck disable=SC2086 # the command line is built above from paths without spaces
    start_pinned 600 "$server_cpu" "$server_log" $command
    server_pid=$started_pid
    case "$name" in
        ringdns) wait_log "$server_log" "ready udp=.*io=$io"; wait_dns "${addr[$name]}" "$server_pid" "$server_log" ;;
        echo) wait_log "$server_log" ready ;;
        *) wait_dns "${addr[$name]}" "$server_pid" "$server_log" ;;
    esac
}

# Whether run $1 (a JSON written by measure_once) had a pinned core > 15 % busy with work that
# was not ours.
contaminated() { jq -e '[.foreign_cpu0_pct, .foreign_cpu1_pct] | max > 15' "$1" >/dev/null; }

# Whether some of the retry budget is left (re-running contaminated runs, STYLE: bounded).
retry_left() { ((retry_spent < retry_budget)); }

# measure_once, repeated (after waiting for the host to settle and re-warming) while the run was
# contaminated by other work and the retry budget lasts. Only for hot-set runs: a miss run needs
# a fresh server, so its loop retries by itself.
measure() {
    local name="$1" label="$2"
    local started
    measure_once "$@"
    while contaminated "$tmp/$name.$label.json" && retry_left; do
        started=$SECONDS
        note "$name $label was disturbed by other work on the host; waiting, then measuring again"
        wait_idle 10
        [[ $name != echo ]] && warm "$name" rewarm
        measure_once "$@"
        retry_spent=$((retry_spent + SECONDS - started))
    done
}

# Of the runs $2-r1 .. $2-r$repeats of server $1, copies the one with the median CPU per answer
# to $tmp/$1.$2.json (what the table reads) and keeps every run's CPU per answer in
# repeat_values["$1 $2"] for RESULTS.md.
declare -A repeat_values=()
pick_median() {
    local name="$1" label="$2" repeat file median
    local -a files=()
    for ((repeat = 1; repeat <= repeats; repeat++)); do files+=("$tmp/$name.$label-r$repeat.json"); done
    median="$(for file in "${files[@]}"; do
        jq -r --arg file "$file" '"\(.server_ticks / ([.answered, 1] | max)) \($file)"' "$file"
    done | sort -g | awk -v n="${#files[@]}" 'NR == int((n + 1) / 2) { print $2 }')"
    cp "$median" "$tmp/$name.$label.json"
    repeat_values["$name $label"]="$(for file in "${files[@]}"; do
        jq -r --argjson hz "$hz" 'if .answered > 0 then (.server_ticks / $hz * 1e6 / .answered * 100 | round / 100) else "-" end' "$file"
    done | paste -sd ' ')"
}

# Runs loadgen against $1 (server name), label $2, the rest loadgen arguments; writes
# $tmp/$1.$2.json with the server's CPU ticks added as "server_ticks" and the UDP receive
# buffer overflows of the namespace during the run as "rcvbuf_errors".
measure_once() {
    local name="$1" label="$2"
    shift 2
    local out="$tmp/$name.$label.json" before after drops_before drops_after
    local knot_before knot_after cpu0_before cpu0_after cpu1_before cpu1_after
    drops_before=$(rcvbuf_errors)
    knot_before=$(cpu_ticks "$knot_pid")
    cpu0_before=$(cpu_busy "$client_cpu")
    cpu1_before=$(cpu_busy "$server_cpu")
    local perf_pid=""
    if ((profile)) && [[ $name == ringdns ]]; then
        command -v perf >/dev/null || die "--profile needs perf (apt-get install -y linux-perf)"
        timeout 120 taskset -c "$client_cpu" perf record -q -F 1999 -g -p "$server_pid" \
            -o "$tmp/$name.$label.perf.data" >/dev/null 2>&1 &
        perf_pid=$!
        pids+=("$perf_pid")
        sleep 0.5
    fi
    before=$(cpu_ticks "$server_pid")
    timeout 120 "$bin/loadgen" --server "${addr[$name]}:53" --cpu "$client_cpu" --json "$@" \
        >"$out.raw" 2>"$tmp/$name.$label.log" ||
        { cat "$tmp/$name.$label.log" >&2; die "loadgen $label against $name failed"; }
    after=$(cpu_ticks "$server_pid")
    cpu1_after=$(cpu_busy "$server_cpu")
    cpu0_after=$(cpu_busy "$client_cpu")
    knot_after=$(cpu_ticks "$knot_pid")
    drops_after=$(rcvbuf_errors)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        perf report -i "$tmp/$name.$label.perf.data" --no-children --sort dso,symbol -g none --percent-limit 0.3 --stdio 2>/dev/null |
            grep -v '^$' | head -150 >"$tmp/$name.$label.perf.txt" || true
        note "profile: $tmp/$name.$label.perf.txt"
    fi
    # Foreign CPU: busy time of each pinned core not accounted to our processes there (server on
    # CPU 1; loadgen and knotd on CPU 0), as a share of the run. Softirq accounting makes it a
    # few percent either way; much more means someone else's work shared the core.
    jq -c --argjson ticks $((after - before)) --argjson drops $((drops_after - drops_before)) \
        --argjson busy0 $((cpu0_after - cpu0_before)) --argjson busy1 $((cpu1_after - cpu1_before)) \
        --argjson knot $((knot_after - knot_before)) --argjson hz "$hz" \
        '. + {server_ticks: $ticks, rcvbuf_errors: $drops,
              foreign_cpu1_pct: (100 * ($busy1 - $ticks) / $hz / .elapsed_s | round),
              foreign_cpu0_pct: (100 * ($busy0 / $hz - .client_cpu_s - $knot / $hz) / .elapsed_s | round)}' \
        "$out.raw" >"$out"
    note "$name $label: $(jq -r --argjson hz "$hz" '"answered=\(.answered)/\(.sent) qps=\(.qps|floor) p50=\(.p50_us) p99=\(.p99_us) servfail=\(.rcodes.servfail) cpu_us/answer=\(if .answered > 0 then (.server_ticks / $hz * 1e6 / .answered * 100 | round / 100) else "-" end) client_limited=\(.client_limited) foreign_cpu0/1=\(.foreign_cpu0_pct)%/\(.foreign_cpu1_pct)%"' "$out")"
}

# Sends the hot set twice (the second pass should be all hits), paced low so knotd gets CPU 0.
warm() {
    local name="$1" label="$2"
    timeout 60 "$bin/loadgen" --server "${addr[$name]}:53" --cpu "$client_cpu" --json \
        --queries "$tmp/hot.txt" --max-queries 2000 --inflight 20 --wait epoll --duration 20 \
        >"$tmp/$name.$label.json" 2>/dev/null || die "warming $name failed"
    jq -e '.lost == 0 and .rcodes.servfail == 0' "$tmp/$name.$label.json" >/dev/null ||
        note "warning: warming $name: $(jq -c '{sent, answered, lost, rcodes}' "$tmp/$name.$label.json")"
}

# testdns like a pod: resolv.conf bind-mounted over /etc/resolv.conf in a private mount
# namespace, search expansion of nginx-service; -l $2 ms is the "over the limit" threshold.
run_testdns() {
    local name="$1" limit_ms="$2" out="$tmp/$1.testdns-$2.json"
    cat >"$tmp/$name.resolv.conf" <<EOF
nameserver ${addr[$name]}
search default.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
EOF
    timeout $((testdns_s + 45)) unshare -m sh -c \
        'mount --bind "$1" /etc/resolv.conf && exec taskset -c "$2" "$3" -host nginx-service -c 200 -d "$4" -l "$5" -json' \
        sh "$tmp/$name.resolv.conf" "$client_cpu" "$testdns" "$testdns_s" "$limit_ms" >"$out" 2>"$out.err" ||
        { cat "$out.err" >&2; die "testdns against $name failed"; }
    note "$name testdns -l $limit_ms: $(jq -c '{requests, errors, max_ms, timeouts, error_kinds}' "$out")"
}

if ((short)); then wait_idle 20; else wait_idle 60; fi
host_busy_start=$last_busy
# Seconds allowed for re-running disturbed runs, on top of the plan.
if ((short)); then retry_budget=45; else retry_budget=300; fi
retry_spent=0
first=1
for name in "${servers[@]}"; do
    ((first)) || { if ((short)); then wait_idle 5; else wait_idle 15; fi; }
    first=0
    note "=== $name (CPU $server_cpu, ${addr[$name]}:53)"
    start_server "$name" udp
    [[ $name != echo ]] && warm "$name" warm1
    # shellcheck disable=SC2086 # extra loadgen arguments, split on spaces on purpose
    measure "$name" saturated --queries "$tmp/hot.txt" --duration "$saturated_s" --max-queries 50000000 \
        $saturated_args
    [[ $name != echo ]] && warm "$name" warm2
    for ((repeat = 1; repeat <= repeats; repeat++)); do
        measure "$name" "paced-r$repeat" --queries "$tmp/hot.txt" --rate "$paced_rate" \
            --duration "$paced_s" --max-queries "$paced_queries"
    done
    pick_median "$name" paced
    if [[ $name != echo ]]; then
        run_testdns "$name" 5000
        run_testdns "$name" 1000
    fi
    rss_mb "$server_pid" >"$tmp/$name.rss"
    stop_pid "$server_pid"
    if [[ $name != echo ]]; then
        for transport in udp tcp; do
            for ((repeat = 1; repeat <= repeats; repeat++)); do
                label="miss-$transport-r$repeat"
                attempt_started=$SECONDS
                while true; do
                    start_server "$name" "$transport"
                    # Closed loop, 100 in flight, each distinct question once, on a fresh
                    # server; the client sleeps in epoll so knotd (on the client's core) is not
                    # starved.
                    measure_once "$name" "$label" --queries "$tmp/miss.txt" \
                        --max-queries "$miss_queries" --duration 30 --wait epoll --timeout-ms 2000
                    stop_pid "$server_pid"
                    contaminated "$tmp/$name.$label.json" && retry_left || break
                    note "$name $label was disturbed by other work on the host; measuring again"
                    wait_idle 10
                    retry_spent=$((retry_spent + SECONDS - attempt_started))
                    attempt_started=$SECONDS
                done
            done
            pick_median "$name" "miss-$transport"
        done
    fi
done

# ---------------------------------------------------------------------------------------------
# 2b. Two workers (ringdns only): does the hit path scale across cores? This host has 2 CPUs,
# so the load generator cannot get a core of its own: worker 0 shares CPU 0 with loadgen
# (--gso, busy-polling, 64 sockets spread over the SO_REUSEPORT group), worker 1 has CPU 1.
# Measured: each worker's CPU per query (its thread's utime+stime over the queries it counted
# in ringdns_worker_queries_total) and the split of queries between the workers.
# Derived: the rate at which the busier worker would fill its own core, min_i 1/(cpu_i ×
# share_i), over one worker's saturated rate per core (1 / its CPU per hit): 2.0 means two
# workers serve twice one worker's hits. Per-query CPU is taken below saturation here, which
# only raises it, so the figure errs low.
worker_queries() {
    curl -s --max-time 5 "http://${addr[ringdns]}:9253/metrics" |
        awk -v w="$1" '$1 == "ringdns_worker_queries_total{worker=\"" w "\"}" { print $2 + 0; f = 1 } END { if (!f) print 0 }'
}
thread_ticks() {
    local task
    for task in /proc/"$1"/task/*; do
        if [[ "$(cat "$task/comm" 2>/dev/null)" == "$2" ]]; then
            sed 's/.*) //' "$task/stat" | awk '{print $12 + $13}'
            return
        fi
    done
    echo 0
}
# Derived two-thread scaling of server $1 from its saturated one-thread run and the two-thread
# run: CPU seconds $2 / $3 and queries $4 / $5 of thread 0 (sharing CPU $client_cpu with
# loadgen) and thread 1; writes $tmp/$1.scaling.json.
derive_scaling() {
    jq -n --argjson hz "$hz" --argjson s0 "$2" --argjson s1 "$3" \
        --argjson q0 "$4" --argjson q1 "$5" \
        --slurpfile one "$tmp/$1.saturated.json" --slurpfile two "$tmp/$1.two-workers.json" '
        ($one[0].server_ticks / $hz * 1e6 / $one[0].answered) as $c1
        | ($s0 * 1e6 / ([$q0, 1] | max)) as $c0w
        | ($s1 * 1e6 / ([$q1, 1] | max)) as $c1w
        | (($q0 + $q1) | if . > 0 then . else 1 end) as $q
        | ([($c0w * $q0 / $q), ($c1w * $q1 / $q)] | max) as $worst
        | {one_worker_cpu_us: $c1, w0_cpu_us: $c0w, w1_cpu_us: $c1w, w0_share: ($q0 / $q),
           w1_share: ($q1 / $q), answered: $two[0].answered, qps: $two[0].qps,
           servfail: $two[0].rcodes.servfail, lost: $two[0].lost,
           scaling: (if $worst > 0 then $c1 / $worst else null end)}' >"$tmp/$1.scaling.json"
}
# The line for $tmp/$1.scaling.json, a thread called $2.
scaling_text() {
    jq -r --arg what "$2" '"two \($what)s (loadgen shares CPU 0 with \($what) 0): \(.qps | floor) qps measured, \(.lost) lost; CPU µs/query \($what) 0 \(.w0_cpu_us * 100 | round / 100), \($what) 1 \(.w1_cpu_us * 100 | round / 100) (one \($what) saturated: \(.one_worker_cpu_us * 100 | round / 100)); split \(.w0_share * 100 | round)/\(.w1_share * 100 | round) %; derived scaling \(if .scaling then (.scaling * 100 | round / 100 | tostring) + "x" else "–" end) one \($what)"' "$tmp/$1.scaling.json"
}
# The saturated closed loop of the two-thread runs, against server $1, into $tmp/$1.two-workers.*.
two_thread_load() {
    timeout 120 "$bin/loadgen" --server "${addr[$1]}:53" --cpu "$client_cpu" --json \
        --queries "$tmp/hot.txt" --duration "$saturated_s" --max-queries 50000000 --sockets 64 --gso \
        >"$tmp/$1.two-workers.json" 2>"$tmp/$1.two-workers.log" ||
        { cat "$tmp/$1.two-workers.log" >&2; die "loadgen against two $1 threads failed"; }
}
scaling_line=""
if [[ " ${servers[*]} " == *" ringdns "* && -f "$tmp/ringdns.saturated.json" ]]; then
    wait_idle 5
    dir="$tmp/ringdns-2w"
    mkdir -p "$dir"
    # As the one-worker runs, with two workers (pinned to CPUs $client_cpu and $server_cpu).
    ringdns_config "$dir/ringdns.toml" 2 udp "${addr[ringdns]}:9253"
    note "=== ringdns, 2 workers (CPUs $client_cpu,$server_cpu; loadgen on CPU $client_cpu)"
    start_pinned 600 "$client_cpu,$server_cpu" "$dir/server.log" "$bin/ringdns" run --config "$dir/ringdns.toml"
    server_pid=$started_pid
    wait_log "$dir/server.log" "ready udp=.*workers=2 io=$io"
    wait_dns "${addr[ringdns]}" "$server_pid" "$dir/server.log"
    # Each worker has its own cache shard: warm until both hold the hot set.
    for pass in 1 2 3; do warm ringdns "warm-2w-$pass"; done
    w0_ticks=$(thread_ticks "$server_pid" "ringdns-w$client_cpu")
    w1_ticks=$(thread_ticks "$server_pid" "ringdns-w$server_cpu")
    w0_queries=$(worker_queries 0)
    w1_queries=$(worker_queries 1)
    two_thread_load ringdns
    w0_ticks=$(($(thread_ticks "$server_pid" "ringdns-w$client_cpu") - w0_ticks))
    w1_ticks=$(($(thread_ticks "$server_pid" "ringdns-w$server_cpu") - w1_ticks))
    w0_queries=$(($(worker_queries 0) - w0_queries))
    w1_queries=$(($(worker_queries 1) - w1_queries))
    stop_pid "$server_pid"
    derive_scaling ringdns "$(jq -n "$w0_ticks / $hz")" "$(jq -n "$w1_ticks / $hz")" "$w0_queries" "$w1_queries"
    scaling_line="$(scaling_text ringdns worker)"
    note "$scaling_line"
fi
# The same placement and load against two udp-echo threads (one SO_REUSEPORT group, as
# ringdns' workers): the most this method can show on this host, since the echo shares
# nothing by construction. ringdns' derived scaling over the echo's says how close it comes.
if [[ -n $scaling_line && " ${servers[*]} " == *" echo "* && -f "$tmp/echo.saturated.json" ]]; then
    wait_idle 5
    note "=== echo, 2 threads (CPUs $client_cpu,$server_cpu; loadgen on CPU $client_cpu)"
    start_pinned 600 "$client_cpu,$server_cpu" "$tmp/echo-2t.log" "$bin/udp-echo" \
        --listen "${addr[echo]}:53" --mode mmsg --cpu "$client_cpu" --cpu "$server_cpu" --max-seconds 600
    echo_pid=$started_pid
    wait_log "$tmp/echo-2t.log" "udp-echo ready .*threads=2"
    two_thread_load echo
    stop_pid "$echo_pid"
    wait_log "$tmp/echo-2t.log" "udp-echo stopped"
    thread_field() { awk -v t="thread=$1" -v f="$2=" '$2 == t { for (i = 3; i <= NF; i++) if (index($i, f) == 1) print substr($i, length(f) + 1) }' "$tmp/echo-2t.log"; }
    derive_scaling echo "$(thread_field 0 cpu_s)" "$(thread_field 1 cpu_s)" \
        "$(thread_field 0 received)" "$(thread_field 1 received)"
    scaling_line+=$'\n\n'"$(scaling_text echo "echo thread")"
    scaling_line+="; ringdns' derived scaling ÷ the echo's: $(jq -rn --slurpfile r "$tmp/ringdns.scaling.json" \
        --slurpfile e "$tmp/echo.scaling.json" \
        'if $r[0].scaling and $e[0].scaling then ($r[0].scaling / $e[0].scaling * 100 | round / 100 | tostring) + "x" else "–" end')"
    note "${scaling_line##*$'\n'}"
fi

# ---------------------------------------------------------------------------------------------
# 3. The table.
# CPU µs per answer of run $1 ("-" without answers).
cpu_per_answer() {
    [[ -f "$1" ]] || { echo "–"; return; }
    jq -r --argjson hz "$hz" 'if .answered > 0 then (.server_ticks / $hz * 1e6 / .answered) else null end
        | if . == null then "–" else (. * 100 | round / 100 | tostring) end' "$1"
}
field() { [[ -f "$1" ]] && jq -r "$2" "$1" || echo "–"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else printf "–" }'; }

header="| server | CPU µs/hit saturated | hit QPS | CPU µs/q paced ${paced_rate} | p50/p99 µs paced | lost/late of sent paced | rcvbuf drops paced | miss CPU µs/q UDP / TCP upstream | miss QPS UDP / TCP | testdns c=200 ${testdns_s}s: requests / errors / max ms / ≥1 s / ≥5 s | RSS MB | ringdns÷row CPU/hit | ringdns÷row QPS | ringdns÷row CPU paced | notes |"
rule="|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
rows=()
ringdns_hit="$(cpu_per_answer "$tmp/ringdns.saturated.json")"
ringdns_qps="$(field "$tmp/ringdns.saturated.json" '.qps')"
ringdns_paced="$(cpu_per_answer "$tmp/ringdns.paced.json")"
for name in "${servers[@]}"; do
    sat="$tmp/$name.saturated.json"
    paced="$tmp/$name.paced.json"
    hit="$(cpu_per_answer "$sat")"
    qps="$(field "$sat" '.qps | floor')"
    paced_cpu="$(cpu_per_answer "$paced")"
    notes=()
    [[ "$(field "$sat" '.client_limited')" == true ]] && notes+=("client-limited (saturated)")
    [[ "$(field "$paced" '.client_limited')" == true ]] && notes+=("client-limited (paced)")
    for run in saturated paced miss-udp miss-tcp; do
        foreign="$(field "$tmp/$name.$run.json" '[.foreign_cpu0_pct, .foreign_cpu1_pct] | max')"
        [[ "$foreign" != – ]] && ((foreign > 15)) && notes+=("host busy during $run (foreign CPU up to ${foreign}%)")
        servfail="$(field "$tmp/$name.$run.json" '.rcodes.servfail')"
        [[ "$servfail" != – && "$servfail" != 0 ]] && notes+=("$servfail SERVFAIL ($run)")
        lost="$(field "$tmp/$name.$run.json" '.lost')"
        [[ $run == miss-* && "$lost" != – && "$lost" != 0 ]] && notes+=("$lost lost ($run)")
    done
    if [[ $name == echo ]]; then
        testdns_cell="–"; miss_cpu="–"; miss_qps="–"
    else
        t5="$tmp/$name.testdns-5000.json"
        t1="$tmp/$name.testdns-1000.json"
        testdns_cell="$(jq -r -s '"\(.[0].requests) / \(.[0].errors + .[1].errors) / \([.[0].max_ms, .[1].max_ms] | max | floor) / \(.[1].timeouts) / \(.[0].timeouts)"' "$t5" "$t1")"
        miss_cpu="$(cpu_per_answer "$tmp/$name.miss-udp.json") / $(cpu_per_answer "$tmp/$name.miss-tcp.json")"
        miss_qps="$(field "$tmp/$name.miss-udp.json" '.qps | floor') / $(field "$tmp/$name.miss-tcp.json" '.qps | floor')"
    fi
    if [[ $name == ringdns ]]; then
        ratios="| – | – | –"
    else
        ratios="| $(ratio "$ringdns_hit" "$hit") | $(ratio "$ringdns_qps" "$qps") | $(ratio "$ringdns_paced" "$paced_cpu")"
    fi
    note_cell="$(IFS=';'; echo "${notes[*]:-}")"
    rows+=("| $name | $hit | $qps | $paced_cpu | $(field "$paced" '"\(.p50_us) / \(.p99_us)"') | $(field "$paced" '"\(.lost) / \(.late) of \(.sent)"') | $(field "$paced" '.rcvbuf_errors') | $miss_cpu | $miss_qps | $testdns_cell | $(cat "$tmp/$name.rss") $ratios | ${note_cell//;/; } |")
done

table="$(printf '%s\n' "$header" "$rule" "${rows[@]}")"
repeats_line=""
if ((repeats > 1)); then
    repeats_line="each run of the repeated measurements (CPU µs per answer; the table shows the median):"
    for name in "${servers[@]}"; do
        for run in paced miss-udp miss-tcp; do
            [[ -n ${repeat_values["$name $run"]:-} ]] &&
                repeats_line+=" $name $run ${repeat_values["$name $run"]// / / };"
        done
    done
fi
echo
echo "$table"
[[ -n $repeats_line ]] && { echo; echo "$repeats_line"; }
[[ -n $scaling_line ]] && { echo; echo "$scaling_line"; }
echo

# ---------------------------------------------------------------------------------------------
# 4. RESULTS.md.
if ((append)); then
    commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        commit="$commit-dirty"
    fi
    [[ -s "$repo/perf/RESULTS.md" ]] || printf '%s\n' "# perf/run.sh results" "" \
        "Appended by perf/run.sh; see perf/README.md for the method and what each column means." \
        >"$repo/perf/RESULTS.md"
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — perf/run.sh ${RINGDNS_PERF_ARGS:-}"
        echo
        echo "- host: nproc=$(nproc), CPU \"$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)\", kernel $(uname -r)"
        echo "- commit: $commit; ringdns binary sha256 $ringdns_binary"
        echo "- other load on the host before the run: ${host_busy_start:-?}% busy (1 s sample)"
        echo "- pinned: server under test CPU $server_cpu; loadgen, testdns and knotd CPU $client_cpu"
        echo "- command: \`${saturated_args:+PERF_SATURATED_ARGS=\"$saturated_args\" }perf/run.sh ${RINGDNS_PERF_ARGS:-}\` (saturated ${saturated_s} s closed loop 8 sockets × 100 in flight; paced ${paced_rate} qps × ${paced_s} s; miss: ${miss_queries} distinct questions once each on a fresh server, closed loop 100 in flight; paced and miss runs ×${repeats}, median shown; testdns -c 200 -d ${testdns_s})"
        echo
        echo "$table"
        [[ -n $repeats_line ]] && { echo; echo "$repeats_line"; }
        [[ -n $scaling_line ]] && { echo; echo "$scaling_line"; }
    } >>"$repo/perf/RESULTS.md"
    note "appended to perf/RESULTS.md"
fi
