// Command testdns is a DNS load client for measuring Kubernetes DNS the way
// cluster operators already do: it is a re-write, from its described
// behaviour, of the Go "testdns" tool used in the "5 second DNS delay"
// write-ups, so its numbers can be compared with theirs. Only the Go standard
// library is used.
//
// Build and run:
//
//	cd perf/testdns && go build -o testdns .
//	./testdns -host nginx-service.default.svc.cluster.local -c 100 -d 10 -l 5000
//
// CONCURRENCY (-c) goroutines each call net.Resolver.LookupIPAddr for -host in
// a loop until -d seconds have passed (at most 10 million lookups each). Every
// goroutine owns its own net.Resolver, so the resolver's in-process
// de-duplication of identical concurrent lookups never hides load: each lookup
// sends its own queries. A lookup still running when the time is up is
// finished and counted; each lookup has a 30 s deadline, so the run ends at
// most about 30 s after -d. A lookup that returns an error counts as an
// error; one that takes -l milliseconds or longer counts as a timeout (-l 0
// turns timeout counting off).
//
// The pure-Go resolver is always used. Without -server it reads
// /etc/resolv.conf (servers, search list, ndots, timeout, attempts), which is
// how a pod resolves: the perf scripts run testdns under "unshare -m" with a
// pod-style resolv.conf bind-mounted over /etc/resolv.conf, for example
//
//	nameserver 169.254.20.10
//	search default.svc.cluster.local svc.cluster.local cluster.local
//	options ndots:5
//
// With -server IP:PORT every query goes to that address instead; the search
// list, ndots and retry options still come from /etc/resolv.conf (each
// nameserver line there becomes one more try against -server, and Go's error
// strings still name that resolv.conf server).
//
// Output is three lines with full-width colons, exactly as the original
// prints them (times are whole milliseconds, "n" follows the timeout count):
//
//	request count：N
//	error count：N
//	request time：min(Nms) max(Nms) avg(Nms) timeout(Nn)
//
// In text mode the distinct error strings, if any, go to stderr. With -json a
// single JSON object is printed instead, with fractional milliseconds,
// p50/p99/p999 latencies (from a log-linear histogram, within about 1.6%) and
// the first few distinct error strings with their counts (local socket
// addresses removed; further kinds are counted under "(other)"). The exit
// status is 0 even when lookups failed, and 2 for bad flags.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"math/bits"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// maxIterations caps the lookups of one goroutine so nothing runs away.
	maxIterations = 10_000_000
	// lookupTimeout is the deadline of a single lookup, so a stuck one ends.
	lookupTimeout = 30 * time.Second
	// maxErrorKinds is how many distinct error strings are kept; the rest
	// are counted under otherErrorsKey.
	maxErrorKinds  = 8
	otherErrorsKey = "(other)"
)

type config struct {
	host        string
	concurrency int
	durationS   int
	limitMs     int
	json        bool
	server      string
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var cfg config
	fs := flag.NewFlagSet("testdns", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.host, "host", "nginx-service.default.svc.cluster.local", "name to resolve")
	fs.IntVar(&cfg.concurrency, "c", 100, "number of concurrent lookup loops")
	fs.IntVar(&cfg.durationS, "d", 10, "duration in seconds")
	fs.IntVar(&cfg.limitMs, "l", 5000, "a lookup taking this many ms or more counts as a timeout (0: off)")
	fs.BoolVar(&cfg.json, "json", false, "print one JSON object instead of the text lines")
	fs.StringVar(&cfg.server, "server", "", "send every query to this IP:PORT instead of the /etc/resolv.conf servers")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	bad := func(format string, a ...any) (config, error) {
		err := fmt.Errorf(format, a...)
		fmt.Fprintln(stderr, "testdns:", err)
		fs.Usage()
		return cfg, err
	}
	switch {
	case fs.NArg() != 0:
		return bad("unexpected arguments: %q", fs.Args())
	case cfg.host == "":
		return bad("-host must not be empty")
	case cfg.concurrency < 1:
		return bad("-c must be at least 1, got %d", cfg.concurrency)
	case cfg.durationS < 1:
		return bad("-d must be at least 1, got %d", cfg.durationS)
	case cfg.limitMs < 0:
		return bad("-l must not be negative, got %d", cfg.limitMs)
	}
	if cfg.server != "" {
		h, p, err := net.SplitHostPort(cfg.server)
		if err != nil {
			return bad("-server %q: %v", cfg.server, err)
		}
		if net.ParseIP(h) == nil {
			return bad("-server %q: %q is not an IP address", cfg.server, h)
		}
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return bad("-server %q: bad port %q", cfg.server, p)
		}
	}
	return cfg, nil
}

// newResolver returns a fresh pure-Go resolver. A fresh one per goroutine
// matters: a net.Resolver merges identical lookups that are in flight at the
// same time, which would turn many goroutines into one stream of queries.
func newResolver(server string) *net.Resolver {
	r := &net.Resolver{PreferGo: true}
	if server != "" {
		r.Dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server)
		}
	}
	return r
}

// histogram is a log-linear latency histogram over microseconds: values
// below 2^subBits are exact, above that each power of two is split into
// 2^subBits buckets, so a bucket is at most 1/64 (about 1.6%) of its values.
type histogram struct {
	counts [histBuckets]atomic.Int64
}

const (
	subBits     = 6
	subCount    = 1 << subBits
	maxExponent = 40 // 2^40 µs is about 12.7 days; anything above is clamped
	histBuckets = (maxExponent - subBits + 1) * subCount
)

func bucketOf(us int64) int {
	if us < 0 {
		us = 0
	}
	u := uint64(us)
	if u < subCount {
		return int(u)
	}
	shift := bits.Len64(u) - subBits - 1
	idx := (shift+1)*subCount + int(u>>uint(shift)) - subCount
	if idx >= histBuckets {
		idx = histBuckets - 1
	}
	return idx
}

// bucketRange returns the smallest value of bucket idx and its width, in µs.
func bucketRange(idx int) (low, width int64) {
	if idx < subCount {
		return int64(idx), 1
	}
	shift := idx/subCount - 1
	m := int64(idx%subCount + subCount)
	return m << uint(shift), 1 << uint(shift)
}

func (h *histogram) record(d time.Duration) {
	h.counts[bucketOf(d.Microseconds())].Add(1)
}

// quantiles returns, for each q, the nearest-rank quantile in ms: the middle
// of the bucket holding that rank, clamped to the observed [minMs, maxMs].
func (h *histogram) quantiles(total int64, minMs, maxMs float64, qs ...float64) []float64 {
	out := make([]float64, len(qs))
	if total == 0 {
		return out
	}
	ranks := make([]int64, len(qs))
	for i, q := range qs {
		r := int64(math.Ceil(q * float64(total)))
		if r < 1 {
			r = 1
		}
		ranks[i] = r
	}
	var seen int64
	next := 0
	for idx := 0; idx < histBuckets && next < len(qs); idx++ {
		seen += h.counts[idx].Load()
		for next < len(qs) && seen >= ranks[next] {
			low, width := bucketRange(idx)
			v := (float64(low) + float64(width-1)/2) / 1000
			out[next] = math.Min(math.Max(v, minMs), maxMs)
			next++
		}
	}
	for ; next < len(qs); next++ {
		out[next] = maxMs
	}
	return out
}

type stats struct {
	requests atomic.Int64
	errors   atomic.Int64
	timeouts atomic.Int64
	sumNs    atomic.Int64
	minNs    atomic.Int64 // math.MaxInt64 until the first lookup
	maxNs    atomic.Int64
	hist     histogram

	mu         sync.Mutex
	errorKinds map[string]int64
}

func newStats() *stats {
	s := &stats{errorKinds: make(map[string]int64)}
	s.minNs.Store(math.MaxInt64)
	return s
}

func (s *stats) record(d time.Duration, err error, limit time.Duration) {
	ns := int64(d)
	s.requests.Add(1)
	s.sumNs.Add(ns)
	for cur := s.minNs.Load(); ns < cur && !s.minNs.CompareAndSwap(cur, ns); cur = s.minNs.Load() {
	}
	for cur := s.maxNs.Load(); ns > cur && !s.maxNs.CompareAndSwap(cur, ns); cur = s.maxNs.Load() {
	}
	s.hist.record(d)
	if limit > 0 && d >= limit {
		s.timeouts.Add(1)
	}
	if err != nil {
		s.errors.Add(1)
		key := errorKind(err)
		s.mu.Lock()
		if _, ok := s.errorKinds[key]; !ok && len(s.errorKinds) >= maxErrorKinds {
			key = otherErrorsKey
		}
		s.errorKinds[key]++
		s.mu.Unlock()
	}
}

// localAddr matches the "LOCAL->" part of "read udp 127.0.0.1:36928->…":
// without it every ephemeral port would make a distinct error kind.
var localAddr = regexp.MustCompile(`[^\s]+->`)

// errorKind is the error string with local socket addresses removed.
func errorKind(err error) string {
	return localAddr.ReplaceAllString(err.Error(), "")
}

// run performs the load and returns the collected stats and the elapsed time.
func run(cfg config) (*stats, time.Duration) {
	s := newStats()
	limit := time.Duration(cfg.limitMs) * time.Millisecond
	start := time.Now()
	deadline := start.Add(time.Duration(cfg.durationS) * time.Second)
	var wg sync.WaitGroup
	for g := 0; g < cfg.concurrency; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resolver := newResolver(cfg.server)
			for i := 0; i < maxIterations && time.Now().Before(deadline); i++ {
				ctx, cancel := context.WithTimeout(context.Background(), lookupTimeout)
				t0 := time.Now()
				_, err := resolver.LookupIPAddr(ctx, cfg.host)
				d := time.Since(t0)
				cancel()
				s.record(d, err, limit)
			}
		}()
	}
	wg.Wait()
	return s, time.Since(start)
}

type report struct {
	Requests    int64            `json:"requests"`
	Errors      int64            `json:"errors"`
	MinMs       float64          `json:"min_ms"`
	MaxMs       float64          `json:"max_ms"`
	AvgMs       float64          `json:"avg_ms"`
	Timeouts    int64            `json:"timeouts"`
	LimitMs     int              `json:"limit_ms"`
	P50Ms       float64          `json:"p50_ms"`
	P99Ms       float64          `json:"p99_ms"`
	P999Ms      float64          `json:"p999_ms"`
	Concurrency int              `json:"concurrency"`
	DurationS   int              `json:"duration_s"`
	ElapsedS    float64          `json:"elapsed_s"`
	Host        string           `json:"host"`
	Server      string           `json:"server"`
	ErrorKinds  map[string]int64 `json:"error_kinds"`

	// Exact nanoseconds for the text lines, which truncate to whole ms.
	minNs, maxNs, avgNs int64
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

func makeReport(cfg config, s *stats, elapsed time.Duration) report {
	n := s.requests.Load()
	var minNs, maxNs, avgNs int64
	if n > 0 {
		minNs, maxNs, avgNs = s.minNs.Load(), s.maxNs.Load(), s.sumNs.Load()/n
	}
	minMs, maxMs := float64(minNs)/1e6, float64(maxNs)/1e6
	q := s.hist.quantiles(n, minMs, maxMs, 0.50, 0.99, 0.999)
	s.mu.Lock()
	kinds := make(map[string]int64, len(s.errorKinds))
	for k, v := range s.errorKinds {
		kinds[k] = v
	}
	s.mu.Unlock()
	return report{
		Requests:    n,
		Errors:      s.errors.Load(),
		MinMs:       round3(minMs),
		MaxMs:       round3(maxMs),
		AvgMs:       round3(float64(avgNs) / 1e6),
		Timeouts:    s.timeouts.Load(),
		LimitMs:     cfg.limitMs,
		P50Ms:       round3(q[0]),
		P99Ms:       round3(q[1]),
		P999Ms:      round3(q[2]),
		Concurrency: cfg.concurrency,
		DurationS:   cfg.durationS,
		ElapsedS:    round3(elapsed.Seconds()),
		Host:        cfg.host,
		Server:      cfg.server,
		ErrorKinds:  kinds,
		minNs:       minNs,
		maxNs:       maxNs,
		avgNs:       avgNs,
	}
}

func writeText(stdout, stderr io.Writer, r report) {
	// Whole milliseconds, truncated, as the original prints them.
	fmt.Fprintf(stdout, "request count：%d\nerror count：%d\n", r.Requests, r.Errors)
	fmt.Fprintf(stdout, "request time：min(%dms) max(%dms) avg(%dms) timeout(%dn)\n",
		r.minNs/1e6, r.maxNs/1e6, r.avgNs/1e6, r.Timeouts)
	keys := make([]string, 0, len(r.ErrorKinds))
	for k := range r.ErrorKinds {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return r.ErrorKinds[keys[i]] > r.ErrorKinds[keys[j]] })
	for _, k := range keys {
		fmt.Fprintf(stderr, "errors: %d x %s\n", r.ErrorKinds[k], k)
	}
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if err != nil {
		if err == flag.ErrHelp {
			os.Exit(0)
		}
		os.Exit(2)
	}
	s, elapsed := run(cfg)
	r := makeReport(cfg, s, elapsed)
	if cfg.json {
		enc := json.NewEncoder(os.Stdout)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(r); err != nil {
			fmt.Fprintln(os.Stderr, "testdns:", err)
			os.Exit(1)
		}
		return
	}
	writeText(os.Stdout, os.Stderr, r)
}
