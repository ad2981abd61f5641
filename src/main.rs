//! The `ringdns` command: argh → Config::load → ringdns::run(config, shutdown), on mimalloc.
//!
//! Runs on: the main thread.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use ringdns::config::Config;

/// mimalloc instead of glibc's malloc. A miss keeps several allocations alive until its answer
/// comes (100s in flight under load, past glibc's 7-chunk per-size thread cache), and over TCP
/// they cross threads (a worker's request is freed on `ringdns-ctl`, the control side's answer on
/// the worker), glibc's slow path; mimalloc's per-thread pages and free lists serve both. A
/// cache hit allocates nothing, so the hit path is the same with either (perf/RESULTS.md).
/// Its arena is 1 GiB of address space: see [`no_huge_pages`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ringdns: a node-local DNS cache with one pinned io_uring worker per core.
#[derive(FromArgs, Debug)]
struct Cli {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    /// what to do
    #[argh(subcommand)]
    command: Option<Subcommand>,
}

/// The subcommands.
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Subcommand {
    /// Serve DNS.
    Run(Run),
    /// Check a configuration file.
    Check(Check),
}

/// Serve DNS (with no --config: the embedded default, 127.0.0.1:5353 and [::1]:5353).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "run")]
struct Run {
    /// configuration file (TOML)
    #[argh(option)]
    config: Option<PathBuf>,
}

/// Validate a configuration file and print the effective configuration.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
struct Check {
    /// configuration file (TOML)
    #[argh(option)]
    config: PathBuf,
}

/// Turns transparent huge pages off for the process (`PR_SET_THP_DISABLE`, inherited by its
/// children). Where THP is `always`, the kernel would back mimalloc's arena and the 2 MiB
/// receive area of each worker with 2 MiB pages, so that a few small allocations make megabytes
/// resident: one idle worker took 29 MB instead of 6 with THP on for the arena (perf/RESULTS.md
/// 18:55). A DaemonSet's memory limit wants the smaller, predictable figure. Memory touched
/// before `main` is covered by mimalloc's own start-up, built to set the same flag before its
/// first arena mapping (`MI_DEFAULT_ALLOW_THP=0`, .cargo/config.toml); without that, an
/// `always` host had 4 MiB of huge pages at idle (9.4 MB against 6.0). It cannot fail on the
/// kernels ringdns runs on (3.15+); if it did, only memory use would grow.
fn no_huge_pages() {
    let _ = nix::sys::prctl::set_thp_disable(true);
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("ringdns {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    match cli.command {
        Some(Subcommand::Check(check)) => match Config::load(&check.config) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ringdns: {error}");
                ExitCode::FAILURE
            }
        },
        Some(Subcommand::Run(run)) => {
            let loaded = match &run.config {
                Some(path) => Config::load(path),
                None => Config::embedded_default(),
            };
            let config = match loaded {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("ringdns: {error}");
                    return ExitCode::FAILURE;
                }
            };
            ringdns::control::logger::install(config.log.level);
            log::info!(
                "starting version={} config={}",
                env!("CARGO_PKG_VERSION"),
                run.config
                    .as_ref()
                    .map_or("<embedded default>".into(), |p| p.display().to_string())
            );
            let result = ringdns::control::Shutdown::from_signals()
                .and_then(|shutdown| ringdns::run(config, shutdown));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    log::error!("fatal: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            eprintln!("ringdns: missing subcommand (try `ringdns run` or `ringdns --help`)");
            ExitCode::FAILURE
        }
    }
}
