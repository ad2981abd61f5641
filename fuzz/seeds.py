#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): real-shaped DNS
queries for `query`, for `upstream_answer` a question selector byte (see
fuzz/checks.rs QUESTIONS) followed by an upstream answer, and for `config` config files: the
example, the embedded default, the DaemonSet's ConfigMap as deploy/README.md's sed commands fill
it, small ones that together use every key, and broken ones (${VAR} and resolv.conf paths as in
fuzz/config_checks.rs VARS and FILES). Run from anywhere: python3 fuzz/seeds.py (it rewrites the
corpus; cargo fuzz adds its own finds beside them)."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 16, 28, 33, 41, 255
QUESTIONS = [  # must match fuzz/checks.rs QUESTIONS
    ("svc-1.default.svc.cluster.local", A),
    ("svc-1.default.svc.cluster.local", AAAA),
    ("_http._tcp.svc-1.default.svc.cluster.local", SRV),
    ("10.0.96.10.in-addr.arpa", PTR),
]


def name(dotted):
    out = b""
    for label in [l for l in dotted.split(".") if l]:
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def header(ident=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0):
    return struct.pack(">HHHHHH", ident, flags, qd, an, ns, ar)


def question(dotted, qtype, qclass=1):
    return name(dotted) + struct.pack(">HH", qtype, qclass)


def opt(payload=1232, ext_rcode=0, version=0, do=False, options=b""):
    flags = 0x8000 if do else 0
    return b"\0" + struct.pack(">HHBBHH", OPT, payload, ext_rcode, version, flags, len(options)) + options


def option(code, data):
    return struct.pack(">HH", code, len(data)) + data


def rr(owner, rtype, ttl, rdata, rclass=1):
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


PTR0 = b"\xc0\x0c"  # the question's name


def queries():
    svc = "svc-1.default.svc.cluster.local"
    return {
        "a-edns": header(ar=1) + question(svc, A) + opt(),
        "a-plain": header() + question(svc, A),
        "aaaa-do": header(ar=1) + question("svc-2.default.svc.cluster.local", AAAA) + opt(do=True),
        "mixed-case": header(ar=1) + question("SvC-1.Default.SVC.cluster.LOCAL", A) + opt(4096),
        "srv": header() + question("_http._tcp.svc-1.default.svc.cluster.local", SRV),
        "ptr": header() + question("10.0.96.10.in-addr.arpa", PTR),
        "cookie": header(ar=1) + question(svc, A) + opt(options=option(10, bytes(range(8)))),
        "ecs": header(ar=1) + question(svc, A) + opt(options=option(8, b"\x00\x01\x18\x00\x0a\x00\x00")),
        "edns-v1": header(ar=1) + question(svc, A) + opt(version=1),
        "payload-512": header(ar=1) + question(svc, A) + opt(payload=512),
        "notify": header(flags=0x2000) + question(svc, SOA),
        "response": header(flags=0x8180) + question(svc, A),
        "two-questions": header(qd=2) + question(svc, A) + question(svc, AAAA),
        "no-question": header(qd=0),
        "compressed-qname": header() + b"\x05svc-1\xc0\x12" + b"\x07default\x00" + struct.pack(">HH", A, 1),
        "short-header": header()[:5],
        "any": header() + question(svc, ANY),
        "id-server": header() + question("id.server", TXT, 3),
        "with-answer": header(an=1) + question(svc, A) + rr(PTR0, A, 30, b"\x0a\x00\x00\x01"),
        "long-name": header() + question(".".join(["a" * 63] * 3 + ["b" * 61]), A),
        "two-opts": header(ar=2) + question(svc, A) + opt() + opt(),
        "cd-bit": header(flags=0x0110, ar=1) + question(svc, A) + opt(),
        "empty": b"",
    }


def answers():
    out = {}
    for index, (qname, qtype) in enumerate(QUESTIONS):
        ask = question(qname, qtype)
        # A NOERROR answer of the right type.
        if qtype == A:
            records = [rr(PTR0, A, 30, bytes([10, 100, 0, n])) for n in (1, 2)]
        elif qtype == AAAA:
            records = [rr(PTR0, AAAA, 30, bytes(15) + b"\x01")]
        elif qtype == SRV:
            records = [rr(PTR0, SRV, 30, struct.pack(">HHH", 0, 100, 80) + b"\x05svc-1\xc0\x1b")]
        else:
            records = [rr(PTR0, PTR, 30, name("kube-dns.kube-system.svc.cluster.local"))]
        out[f"{index}-noerror"] = bytes([index]) + header(0, 0x8180, 1, len(records)) + ask + b"".join(records)
        out[f"{index}-noerror-opt"] = (
            bytes([index | 0x80]) + header(0, 0x8180, 1, len(records), 0, 1) + ask + b"".join(records) + opt()
        )
    svc = QUESTIONS[0][0]
    ask = question(svc, A)
    soa = rr(b"\xc0\x12", SOA, 30, name("ns.dns.cluster.local") + name("hostmaster.cluster.local")
             + struct.pack(">IIIII", 1, 7200, 1800, 86400, 5))
    out["0-nxdomain"] = b"\0" + header(0, 0x8183, 1, 0, 1) + ask + soa
    out["1-nodata"] = b"\1" + header(0, 0x8180, 1, 0, 1) + question(svc, AAAA) + soa
    chain = (rr(PTR0, CNAME, 30, name("alias.default.svc.cluster.local"))
             + rr(name("alias.default.svc.cluster.local"), A, 10, b"\x0a\x00\x00\x09"))
    out["0-cname"] = b"\0" + header(0, 0x8180, 1, 2) + ask + chain
    out["0-servfail"] = b"\0" + header(0, 0x8182, 1) + ask
    out["0-refused"] = b"\0" + header(0, 0x8185, 1) + ask
    out["0-truncated"] = b"\0" + header(0, 0x8380, 1) + ask
    out["0-ext-rcode"] = b"\x80" + header(0, 0x8180, 1, 0, 0, 1) + ask + opt(ext_rcode=1)
    out["0-opt-not-last"] = (b"\0" + header(0, 0x8180, 1, 1, 0, 2) + ask + rr(PTR0, A, 30, b"\x0a\0\0\1")
                             + opt() + rr(PTR0, A, 30, b"\x0a\0\0\2"))
    out["0-wrong-question"] = b"\0" + header(0, 0x8180, 1, 1) + question("other.test", A) + rr(PTR0, A, 30, b"\x0a\0\0\1")
    out["0-ttl-extremes"] = (b"\0" + header(0, 0x8180, 1, 2) + ask + rr(PTR0, A, 0, b"\x0a\0\0\1")
                             + rr(PTR0, A, 0xFFFFFFFF, b"\x0a\0\0\2"))
    many = b"".join(rr(PTR0, A, 30, bytes([10, 1, n // 256, n % 256])) for n in range(100))
    out["0-many-records"] = b"\0" + header(0, 0x8180, 1, 100) + ask + many
    medium = b"".join(rr(PTR0, A, 30, bytes([10, 2, 0, n])) for n in range(40))
    # ~700 bytes: over 512 for a client without EDNS (pick bit 7 clear), under 1232 with it.
    out["0-medium"] = b"\0" + header(0, 0x8180, 1, 40) + ask + medium
    out["0-medium-edns"] = b"\x80" + header(0, 0x8180, 1, 40) + ask + medium
    glue = rr(b"\xc0\x12", NS, 30, name("ns.cluster.local")) + rr(name("ns.cluster.local"), A, 30, b"\x0a\0\0\x35")
    out["0-authority-glue"] = b"\0" + header(0, 0x8580, 1, 1, 1, 1) + ask + rr(PTR0, A, 30, b"\x0a\0\0\1") + glue
    out["0-not-response"] = b"\0" + header(0, 0x0100, 1) + ask
    out["0-pointer-loop"] = b"\0" + header(0, 0x8180, 1, 1) + ask + b"\xc0\x2d" + struct.pack(">HHIH", A, 1, 30, 4) + b"\x0a\0\0\1"
    return out


def scripts():
    """`exchanges` scripts (fuzz/exchanges.rs): first the configuration and timeout bytes,
    then operations: 0 start(question), 1 answer(sent, how), 2 raw(socket, len, bytes...),
    3 mangle(sent, at, value), 4 error(socket, errno), 5 advance(step), 6 toggle full,
    7 toggle unreachable(upstream), 8 reload(configuration, timeout)."""
    start = lambda q: bytes([0, q])
    answer = lambda sent, how=0: bytes([1, sent, how])
    advance = lambda step: bytes([5, step])  # 8: 250 ms, 10: 500 ms, 11: 1 s, 13: 3 s
    error = lambda socket, errno=0: bytes([4, socket, errno])  # errno 0: ECONNREFUSED
    return {
        "answered": bytes([0, 7]) + start(0) + answer(0),
        "two-then-late": bytes([0, 7]) + start(2) + start(3) + advance(8) * 3 + answer(0) + answer(1),
        "refused-failover": bytes([0, 7]) + start(0) + error(0) + answer(0) + error(1, 1),
        "truncated-cut-long": bytes([0, 7]) + start(0) + answer(0, 2) + start(1) + answer(0, 3) + start(2) + answer(0, 4),
        "garbage": bytes([0, 7]) + start(0) + bytes([2, 0, 12]) + bytes(range(12)) + bytes([3, 0, 2, 0])
        + answer(0, 6) + answer(0, 7) + answer(0, 8) + answer(0, 5),
        "timeouts": bytes([2, 11]) + start(0) + start(1) + start(5) + advance(11) * 3 + advance(13),
        "no-send-slot": bytes([0, 7]) + bytes([6]) + start(0) + advance(1) + bytes([6]) + advance(8) + answer(0),
        "unreachable": bytes([0, 7]) + bytes([7, 0]) + start(0) + advance(11) + answer(0),
        "reload": bytes([0, 7]) + start(0) + bytes([8, 1, 3]) + start(0) + start(5) + answer(1) + advance(13),
        "zones": bytes([1, 7]) + start(4) + start(0) + start(5) + answer(0) + answer(1),
        "retransmit-echo": bytes([0, 7]) + start(0) + advance(8) * 2 + advance(10) + answer(0) + answer(1),
    }


def write(target, seeds):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for seed, data in seeds.items():
        with open(os.path.join(directory, seed), "wb") as file:
            file.write(data)


def configmap(mode):
    """The config.toml of deploy/ringdns.yaml's ConfigMap, filled as deploy/README.md's sed
    command for `mode` ("iptables" or "ipvs") fills it, with kube-dns at 10.96.0.10."""
    with open(os.path.join(HERE, "..", "deploy", "ringdns.yaml")) as file:
        manifest = file.read()
    start = manifest.index("  config.toml: |\n") + len("  config.toml: |\n")
    end = manifest.index("\n---", start)
    text = "".join(line[4:] + "\n" for line in manifest[start:end].split("\n"))
    text = text.replace("__PILLAR__LOCAL__DNS__", "169.254.20.10")
    text = text.replace("__PILLAR__DNS__DOMAIN__", "cluster.local")
    if mode == "ipvs":
        text = text.replace(', "__PILLAR__DNS__SERVER__:53"', "")
        return text.replace("__PILLAR__CLUSTER__DNS__", "10.96.0.10")
    text = text.replace("__PILLAR__DNS__SERVER__", "10.96.0.10")
    return text.replace("__PILLAR__CLUSTER__DNS__", "${KUBE_DNS_UPSTREAM_SERVICE_HOST}")


def embedded_default():
    """src/config.rs EMBEDDED_DEFAULT."""
    with open(os.path.join(HERE, "..", "src", "config.rs")) as file:
        source = file.read()
    opening = 'pub const EMBEDDED_DEFAULT: &str = r#"'
    start = source.index(opening) + len(opening)
    return source[start:source.index('"#;', start)]


def configs():
    out = {}
    with open(os.path.join(HERE, "..", "config.toml.example")) as file:
        out["example.toml"] = file.read()
    out["embedded-default.toml"] = embedded_default()
    out["daemonset-iptables-mode.toml"] = configmap("iptables")
    out["daemonset-ipvs-mode.toml"] = configmap("ipvs")
    out["every-key.toml"] = """[server]
listen = ["169.254.20.10:53", "[fd00::a]:53"]
workers = 4
io = "uring"
udp_payload = 1400
tcp_idle_timeout = "30s"
max_tcp_connections = 512
udp_receive_buffer = 8388608
batch_wait = "100us"

[cache]
success_capacity = 4096
success_ttl = "1m"
denial_capacity = 1024
denial_ttl = "10s"
servfail_ttl = "2s"

[[forward]]
zone = "cluster.local"
upstreams = ["10.96.0.10:53"]
transport = "tcp"
timeout = "1500ms"

[[forward]]
zone = "."
upstreams = ["/etc/resolv.conf"]
transport = "prefer_udp"
timeout = "3s"

[log]
level = "debug"

[node]
setup_interface = true
interface = "nodelocaldns"
setup_iptables = true
rules = "nftables"
sync_interval = "30s"
teardown = false
fallback_service_chain = "KUBE-SVC-TCOQ7XJHQPQMWC2M"
handover = "/run/ringdns/handover.sock"

[health]
listen = "169.254.20.10:8080"
lameduck = "10s"

[metrics]
listen = "[fd00::a]:9253"
"""
    out["durations.toml"] = """[server]
tcp_idle_timeout = "1h"
batch_wait = "0s"

[cache]
success_ttl = "7d"
denial_ttl = "1s"
servfail_ttl = "30000ms"

[[forward]]
zone = "."
upstreams = ["10.0.0.2"]
timeout = "100000000ns"

[node]
sync_interval = "1m"

[health]
lameduck = "60000000us"
"""
    out["ipv6.toml"] = """[server]
listen = ["[::1]:53", "[fd00::a]:5353", "127.0.0.1:53"]

[[forward]]
zone = "ip6.arpa."
upstreams = ["2001:db8::1", "[2001:db8::2]", "[2001:db8::3]:5353", "fe80::1%1", "[fe80::2%lo]:53"]

[[forward]]
zone = "."
upstreams = ["${UPSTREAM_V6}:53", "::ffff:10.0.0.2"]
transport = "udp"

[health]
listen = ""

[metrics]
listen = "[::1]:9253"
"""
    out["resolv-conf-paths.toml"] = """# resolv.conf paths expand to their nameservers, duplicates removed.
[[forward]]
zone = "."
upstreams = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf", "10.0.0.2"]
transport = "prefer_udp"

[[forward]]
zone = "Example.COM"
upstreams = ["/run/systemd/resolve/resolv.conf"]
"""
    out["env-vars.toml"] = """[server]
listen = ["${KUBE_DNS_UPSTREAM_SERVICE_HOST}:53"]

[[forward]]
zone = "cluster.local"
upstreams = ["${KUBE_DNS_UPSTREAM_SERVICE_HOST}", "${UPSTREAM_V6}:53", "[${UPSTREAM_V6}]:5353"]
transport = "tcp"

[health]
listen = "${KUBE_DNS_UPSTREAM_SERVICE_HOST}:8080"
"""
    out["no-forward.toml"] = """# No [[forward]]: "." goes to /etc/resolv.conf.
[server]
listen = ["127.0.0.1:53"]

[log]
level = "warn"
"""
    out["inline-and-dotted.toml"] = """server.listen = ["127.0.0.1:5300"]
server.workers = 0x2
cache = { success_capacity = 1_000, denial_ttl = "5s" }
forward = [
  { zone = "cluster.local", upstreams = ["10.96.0.10"], transport = "tcp" },
  { zone = "in-addr.arpa", upstreams = ['10.96.0.10:53'] },
]
log.level = 'error'
node.teardown = true
metrics.listen = ""
"""
    out["bad-unknown-key.toml"] = """[server]
workers = 2

[[forward]]
zone = "."
upstreams = ["10.0.0.2"]
timeot = "1s"
"""
    out["bad-duration.toml"] = """[cache]
success_ttl = "30"
denial_ttl = 5
servfail_ttl = "1.5s"
"""
    out["bad-out-of-range.toml"] = """[server]
udp_payload = 4097
workers = -1

[cache]
servfail_ttl = "31s"
"""
    out["bad-missing-variable.toml"] = """[[forward]]
zone = "cluster.local"
upstreams = ["${KUBE_DNS_SERVICE_HOST}:53"]
"""
    out["bad-missing-resolv-conf.toml"] = """[[forward]]
zone = "."
upstreams = ["/etc/resolv.conf.d/none"]
"""
    out["bad-duplicate-zone.toml"] = """[[forward]]
zone = "cluster.local"
upstreams = ["10.96.0.10"]

[[forward]]
zone = "Cluster.Local."
upstreams = ["10.96.0.11"]
"""
    out["bad-address-taken.toml"] = """[server]
listen = ["127.0.0.1:53", "127.0.0.1:9253"]

[metrics]
listen = "127.0.0.1:9253"
"""
    out["bad-syntax.toml"] = """[server
workers = = 2
"""
    # Found by reading the parser while writing the config target: this error had no line
    # (the clash is with health's implied address, the first listen IP on port 8080).
    out["bad-listen-takes-default-health.toml"] = """[server]
listen = ["127.0.0.1:53", "127.0.0.1:8080"]
"""
    return {name: text.encode() for name, text in out.items()}


write("query", queries())
write("upstream_answer", answers())
write("config", configs())
write("exchanges", scripts())
