#!/usr/bin/env bash
# The whole ringdns test suite on a fresh Debian machine (run as root: the integration tests
# create network namespaces). Installs the real DNS servers and clients the tests use from
# Debian's packages, then runs formatting, lints, unit tests, the hit-path allocation test and
# the black-box integration tests (knotd upstream, dig/kdig, getent, the Go resolver).
# Usage: sudo tests/run-all.sh        (.ci/run calls exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(knot knot-dnsutils bind9-dnsutils golang-go iproute2 util-linux iptables nftables conntrack dnsperf)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's knot package starts a knotd on boot; the tests start their own in namespaces.

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== go vet + build perf/testdns"
(cd perf/testdns && GOPROXY=off go vet . && go build -o "$PWD/testdns" .)
echo "== cargo test (unit, hit-path allocations, integration on io_uring and epoll)"
export RINGDNS_TESTDNS="$PWD/perf/testdns/testdns"
cargo test --workspace -- --test-threads=4
