# Process helpers shared by perf/run.sh, perf/miss-ab.sh, perf/upgrade.sh, perf/batch-wait.sh
# and perf/rss.sh (sourced, not run).
# The caller defines `die` and a `pids` array, which its EXIT trap stops by PID
# (ab_setup makes both for the A/B scripts).

# For the A/B scripts, first thing: runs the calling script again ("$0" "$@") inside a network
# namespace of its own (unshare -n: only lo, which ab_setup brings up), unless this is that run.
# Needs root.
in_own_netns() {
    [[ "${RINGDNS_AB_IN_NETNS:-}" == 1 ]] && return 0
    [[ $(id -u) == 0 ]] || die "needs root (unshare -n)"
    exec unshare -n env RINGDNS_AB_IN_NETNS=1 "$0" "$@"
}

# Starts "$@" under `timeout` (so it dies by itself after $1 s even if the script is killed)
# pinned to CPU list $2, logging to $3; sets started_pid to the process itself (not the wrapper).
start_pinned() {
    local life="$1" cpu="$2" log="$3"
    shift 3
    timeout -k 5 "$life" taskset -c "$cpu" "$@" >"$log" 2>&1 &
    local wrapper=$!
    pids+=("$wrapper")
    started_pid=""
    for _ in $(seq 200); do
        started_pid="$(cat "/proc/$wrapper/task/$wrapper/children" 2>/dev/null | awk '{print $1}')"
        [[ -n "$started_pid" ]] && break
        kill -0 "$wrapper" 2>/dev/null || break
        sleep 0.01
    done
    [[ -n "$started_pid" ]] || { cat "$log" >&2; die "could not start: $*"; }
    pids+=("$started_pid")
}

# CPU time of process $1 so far: utime+stime in clock ticks (as perf/run.sh counts it).
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# On-CPU time of all threads of process $1 so far, ns (/proc/PID/task/*/schedstat); printed
# with %.0f, since awk's default number format turns sums past 2^31 into 3.6e+09.
on_cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'; }

# Stops process $1 (started by start_pinned): SIGTERM, then SIGKILL after 5 s.
stop_pid() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null || true
}

# For the A/B scripts (miss-ab.sh, upgrade.sh, batch-wait.sh), inside their namespace: checks that the load
# generator is built (sets loadgen), brings lo up, makes the scratch dir $work (prefix $1) and
# an EXIT trap that stops every process in pids by PID and removes $work.
ab_setup() {
    loadgen="$repo/target/release/loadgen"
    [[ -x "$loadgen" ]] || die "build loadgen first: cargo build --release -p ringdns-loadgen"
    ip link set lo up
    work="$(mktemp -d "/tmp/$1.XXXXXX")"
    pids=()
    trap ab_cleanup EXIT
}

ab_cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
