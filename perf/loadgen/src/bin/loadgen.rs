//! `loadgen`: sends DNS queries over UDP with `sendmmsg`/`recvmmsg`, closed loop or paced,
//! and reports throughput, answers by RCODE, losses and an exact latency distribution.
//!
//! Runs on: the main thread, or `--threads` generator threads that share nothing.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use argh::FromArgs;
use serde::Serialize;

use ringdns_loadgen::generator::{self, Counts, Settings, Wait};
use ringdns_loadgen::queries::{parse_query_file, QuerySet, QuerySpec};
use ringdns_loadgen::{pin_current_thread, process_cpu_time};

/// The client counts as the bottleneck when its own busy CPU time reaches this share of the
/// elapsed time per thread: then the rate measures the client, not the server.
const CLIENT_LIMITED_SHARE: f64 = 0.9;

/// DNS load generator: closed loop (keep --inflight outstanding) or paced (--rate).
#[derive(FromArgs)]
struct Args {
    /// server address, IPv4 or IPv6 (default 127.0.0.1:53)
    #[argh(
        option,
        default = "\"127.0.0.1:53\".parse().expect(\"a valid literal\")"
    )]
    server: SocketAddr,
    /// file of `name TYPE` lines (`#` starts a comment); sent round-robin
    #[argh(option)]
    queries: Option<PathBuf>,
    /// a single name to query (instead of --queries)
    #[argh(option)]
    name: Option<String>,
    /// record type for --name (default A)
    #[argh(option, long = "type", default = "String::from(\"A\")")]
    rtype: String,
    /// add an EDNS OPT record advertising this UDP payload size
    #[argh(option)]
    edns: Option<u16>,
    /// client sockets per thread (default 8)
    #[argh(option, default = "8")]
    sockets: usize,
    /// queries in flight across all sockets (default 100; paced: default rate x timeout, as a cap)
    #[argh(option)]
    inflight: Option<usize>,
    /// stop sending after this many seconds (default 10)
    #[argh(option, default = "10.0")]
    duration: f64,
    /// stop sending after this many queries (default 100000000)
    #[argh(option, default = "100_000_000")]
    max_queries: u64,
    /// an answer later than this is late; unanswered by the end plus this is lost (default 1000)
    #[argh(option, default = "1000")]
    timeout_ms: u64,
    /// paced mode: send this many queries per second, evenly spread, regardless of answers
    #[argh(option)]
    rate: Option<f64>,
    /// busy (poll sockets nonstop; closed-loop default) or epoll (sleep; paced default)
    #[argh(option, from_str_fn(parse_wait))]
    wait: Option<Wait>,
    /// datagrams per sendmmsg/recvmmsg (default 64)
    #[argh(option, default = "64")]
    batch: usize,
    /// send runs of equal-length queries as UDP GSO messages: the client's send path runs once
    /// per run, so a client core outruns a server core; the server still gets one datagram each
    #[argh(switch)]
    gso: bool,
    /// pin the generator thread to this CPU (thread k to CPU N+k)
    #[argh(option)]
    cpu: Option<usize>,
    /// generator threads, each with its own sockets and a share of the load (default 1)
    #[argh(option, default = "1")]
    threads: usize,
    /// print one JSON object on stdout (the human summary then goes to stderr)
    #[argh(switch)]
    json: bool,
}

/// Answers by RCODE.
#[derive(Serialize)]
struct Rcodes {
    /// RCODE 0.
    noerror: u64,
    /// RCODE 3.
    nxdomain: u64,
    /// RCODE 2.
    servfail: u64,
    /// Any other RCODE.
    other: u64,
}

/// The `--json` result. Field names are a stable interface for perf/run.sh.
#[derive(Serialize)]
struct Summary {
    /// `closed` or `paced`.
    mode: &'static str,
    /// Paced target rate, if any.
    rate: Option<f64>,
    /// Server address.
    server: String,
    /// Generator threads.
    threads: usize,
    /// Client sockets over all threads.
    sockets: usize,
    /// In-flight limit over all threads.
    inflight: usize,
    /// `busy` or `epoll`.
    wait: &'static str,
    /// Whether sends used UDP GSO.
    gso: bool,
    /// Queries handed to the kernel.
    sent: u64,
    /// Answers matched to a query (late ones included).
    answered: u64,
    /// Queries never answered by the end of sending plus the timeout.
    lost: u64,
    /// Answers later than the timeout.
    late: u64,
    /// Answers with an ID not in flight on their socket.
    unknown: u64,
    /// Answers with an in-flight ID but a different question, no QR bit, or too short.
    mismatched: u64,
    /// Paced sends skipped at the in-flight cap.
    skipped: u64,
    /// Failed send calls.
    send_errors: u64,
    /// Failed receive calls.
    recv_errors: u64,
    /// Answers by RCODE.
    rcodes: Rcodes,
    /// Answers with TC=1.
    tc: u64,
    /// Seconds from start to the end of sending or the last answer, whichever is later.
    elapsed_s: f64,
    /// Answers per second.
    qps: f64,
    /// Median latency, µs (upper edge of its 1 µs bucket below 10 ms).
    p50_us: u64,
    /// 90th percentile latency, µs.
    p90_us: u64,
    /// 99th percentile latency, µs.
    p99_us: u64,
    /// 99.9th percentile latency, µs.
    p999_us: u64,
    /// Largest latency, µs.
    max_us: u64,
    /// utime + stime of this process (getrusage).
    client_cpu_s: f64,
    /// Part of `client_cpu_s` spent in busy-poll passes that found nothing to do.
    client_idle_poll_s: f64,
    /// Whether the client's busy CPU (cpu minus idle polling) reached 90 % of elapsed per thread.
    client_limited: bool,
    /// recvmmsg calls made.
    recvmmsg_calls: u64,
    /// sendmmsg calls made.
    sendmmsg_calls: u64,
    /// epoll_pwait2 calls made.
    epoll_waits: u64,
}

fn main() -> anyhow::Result<()> {
    let args: Args = argh::from_env();
    let specs = match (&args.queries, &args.name) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            parse_query_file(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        (None, Some(name)) => vec![QuerySpec {
            name: name.clone(),
            rtype: args.rtype.clone(),
        }],
        _ => bail!("give exactly one of --queries FILE and --name NAME"),
    };
    let queries = QuerySet::build(&specs, args.edns)?;
    if args.threads == 0 || args.sockets == 0 {
        bail!("--threads and --sockets must be at least 1");
    }
    if args.batch == 0 || args.batch > 1024 {
        bail!("--batch must be 1..=1024");
    }
    if args
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        bail!("--rate must be a positive number");
    }
    let duration = Duration::try_from_secs_f64(args.duration).context("--duration out of range")?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let inflight = match (args.inflight, args.rate) {
        (Some(inflight), _) => inflight,
        (None, None) => 100,
        // Paced: the cap is only a safety net, so allow a full timeout's worth of queries.
        (None, Some(rate)) => ((rate * timeout.as_secs_f64()).ceil() as usize).max(100),
    };
    if inflight < args.threads {
        bail!("--inflight must be at least --threads");
    }
    let wait = args.wait.unwrap_or(if args.rate.is_some() {
        Wait::Epoll
    } else {
        Wait::Busy
    });

    let thread_settings: Vec<Settings> = (0..args.threads)
        .map(|thread| Settings {
            server: args.server,
            sockets: args.sockets,
            inflight: share(inflight as u64, args.threads, thread) as usize,
            duration,
            max_queries: share(args.max_queries, args.threads, thread),
            timeout,
            rate: args.rate.map(|rate| rate / args.threads as f64),
            wait,
            batch: args.batch,
            first_query: thread * queries.len() / args.threads,
            gso: args.gso,
        })
        .collect();

    let cpu_before = process_cpu_time()?;
    let counts = if args.threads == 1 {
        if let Some(cpu) = args.cpu {
            pin_current_thread(cpu)?;
        }
        generator::run(&thread_settings[0], &queries)?
    } else {
        run_threads(&thread_settings, &queries, args.cpu)?
    };
    let client_cpu = process_cpu_time()?.saturating_sub(cpu_before);

    let summary = summarize(&args, inflight, wait, &counts, client_cpu);
    let human = human_lines(&summary);
    if args.json {
        eprint!("{human}");
        println!(
            "{}",
            serde_json::to_string(&summary).context("serializing the summary")?
        );
    } else {
        print!("{human}");
    }
    Ok(())
}

/// Thread `index`'s share of `total` split over `parts` threads (the first ones get the rest).
fn share(total: u64, parts: usize, index: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((index as u64) < total % parts)
}

/// Runs one generator per entry of `settings` on its own thread, pinned to `cpu + k` if asked,
/// and merges their counts.
fn run_threads(
    settings: &[Settings],
    queries: &QuerySet,
    cpu: Option<usize>,
) -> anyhow::Result<Counts> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = settings
            .iter()
            .enumerate()
            .map(|(index, settings)| {
                std::thread::Builder::new()
                    .name(format!("loadgen-{index}"))
                    .spawn_scoped(scope, move || {
                        if let Some(cpu) = cpu {
                            pin_current_thread(cpu + index)?;
                        }
                        generator::run(settings, queries)
                    })
                    .context("spawning a generator thread")
            })
            .collect::<anyhow::Result<_>>()?;
        let mut total = Counts::default();
        for handle in handles {
            let counts = handle
                .join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
            total.merge(&counts);
        }
        Ok(total)
    })
}

/// Builds the JSON summary from the merged counts.
fn summarize(
    args: &Args,
    inflight: usize,
    wait: Wait,
    counts: &Counts,
    client_cpu: Duration,
) -> Summary {
    let elapsed_s = counts.elapsed.as_secs_f64();
    let client_cpu_s = client_cpu.as_secs_f64();
    let client_idle_poll_s = counts.idle_poll.as_secs_f64();
    let histogram = &counts.histogram;
    Summary {
        mode: if args.rate.is_some() {
            "paced"
        } else {
            "closed"
        },
        rate: args.rate,
        server: args.server.to_string(),
        threads: args.threads,
        sockets: args.sockets * args.threads,
        inflight,
        wait: match wait {
            Wait::Busy => "busy",
            Wait::Epoll => "epoll",
        },
        gso: args.gso,
        sent: counts.sent,
        answered: counts.answered,
        lost: counts.lost(),
        late: counts.late,
        unknown: counts.unknown,
        mismatched: counts.mismatched,
        skipped: counts.skipped,
        send_errors: counts.send_errors,
        recv_errors: counts.recv_errors,
        rcodes: Rcodes {
            noerror: counts.noerror,
            nxdomain: counts.nxdomain,
            servfail: counts.servfail,
            other: counts.other_rcode,
        },
        tc: counts.tc,
        elapsed_s,
        qps: if elapsed_s > 0.0 {
            counts.answered as f64 / elapsed_s
        } else {
            0.0
        },
        p50_us: histogram.quantile_us(0.50),
        p90_us: histogram.quantile_us(0.90),
        p99_us: histogram.quantile_us(0.99),
        p999_us: histogram.quantile_us(0.999),
        max_us: histogram.max_us(),
        client_cpu_s,
        client_idle_poll_s,
        client_limited: client_cpu_s - client_idle_poll_s
            >= CLIENT_LIMITED_SHARE * elapsed_s * args.threads as f64,
        recvmmsg_calls: counts.recv_calls,
        sendmmsg_calls: counts.send_calls,
        epoll_waits: counts.epoll_waits,
    }
}

/// The human-readable summary, one `key=value` line per topic.
fn human_lines(summary: &Summary) -> String {
    let rate = summary
        .rate
        .map_or(String::new(), |rate| format!(" rate={rate}"));
    let busy_share = if summary.elapsed_s > 0.0 {
        100.0 * (summary.client_cpu_s - summary.client_idle_poll_s)
            / (summary.elapsed_s * summary.threads as f64)
    } else {
        0.0
    };
    let answered = summary.answered.max(1) as f64;
    format!(
        "loadgen server={} mode={}{rate} threads={} sockets={} inflight={} wait={} gso={}\n\
         sent={} answered={} lost={} late={} unknown={} mismatched={} skipped={} errors={}/{}\n\
         rcode noerror={} nxdomain={} servfail={} other={} tc={}\n\
         elapsed_s={:.3} qps={:.0}\n\
         latency_us p50={} p90={} p99={} p99.9={} max={}\n\
         client cpu_s={:.3} idle_poll_s={:.3} busy={busy_share:.1}% client_limited={}\n\
         syscalls recvmmsg={} ({:.2}/answer) sendmmsg={} ({:.2}/answer) epoll_wait={}\n",
        summary.server,
        summary.mode,
        summary.threads,
        summary.sockets,
        summary.inflight,
        summary.wait,
        summary.gso,
        summary.sent,
        summary.answered,
        summary.lost,
        summary.late,
        summary.unknown,
        summary.mismatched,
        summary.skipped,
        summary.send_errors,
        summary.recv_errors,
        summary.rcodes.noerror,
        summary.rcodes.nxdomain,
        summary.rcodes.servfail,
        summary.rcodes.other,
        summary.tc,
        summary.elapsed_s,
        summary.qps,
        summary.p50_us,
        summary.p90_us,
        summary.p99_us,
        summary.p999_us,
        summary.max_us,
        summary.client_cpu_s,
        summary.client_idle_poll_s,
        summary.client_limited,
        summary.recvmmsg_calls,
        summary.recvmmsg_calls as f64 / answered,
        summary.sendmmsg_calls,
        summary.sendmmsg_calls as f64 / answered,
        summary.epoll_waits,
    )
}

/// Parses `--wait`.
fn parse_wait(value: &str) -> Result<Wait, String> {
    match value {
        "busy" => Ok(Wait::Busy),
        "epoll" => Ok(Wait::Epoll),
        other => Err(format!("unknown wait {other:?}: use busy or epoll")),
    }
}
