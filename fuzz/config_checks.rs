//! What the `config` fuzz target checks, shared by `fuzz/fuzz_targets/config.rs` (cargo fuzz,
//! libFuzzer) and `tests/fuzz_corpus.rs` (the stable test suite): any text as the config file
//! `ringdns check`, `ringdns run` and a reload read, parsed against a fake host (a fixed
//! environment and two fixed resolv.conf files), so no input reads a real file.
//!
//! - [`config`]: no panic. A rejected file gets a [`ConfigError::Invalid`] (never a read
//!   error) that starts with the file's path; a line it names is in the text (or one past it,
//!   for a syntax error at the end). Unless the toml crate reported it (syntax and type errors,
//!   [`Problem::Toml`]), the error names the dotted key and the line it is on; the one
//!   exception is the implied default zone (no `[[forward]]`), which has a key and no line.
//!   An accepted file round-trips through `ringdns check`'s output ([`Config::to_toml`]): that
//!   output parses to an equal config (source included) and prints the same again.
//!
//! Runs on: the fuzzer's or the test's thread; reads no file and no environment variable (an
//! IPv6 scope given by interface name is still looked up, with `if_nametoindex`).

use std::path::Path;

use ringdns::config::{Config, ConfigError, Problem};

/// The path every input claims to come from (the DaemonSet's and the systemd unit's).
pub(crate) const SOURCE: &str = "/etc/ringdns/config.toml";

/// The fake environment: the variable a DaemonSet's pod gets for the kube-dns-upstream Service,
/// and an IPv6 one (which `"${VAR}:53"` brackets). Any other `${VAR}` is unset.
pub(crate) const VARS: [(&str, &str); 2] = [
    ("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.96.0.10"),
    ("UPSTREAM_V6", "fd00::10"),
];

/// The fake file system: the host's resolv.conf (the default `[[forward]]` reads it) and
/// systemd-resolved's. Any other path is not found.
pub(crate) const FILES: [(&str, &str); 2] = [
    (
        "/etc/resolv.conf",
        "nameserver 10.0.0.2\nnameserver fd00::2\n",
    ),
    (
        "/run/systemd/resolve/resolv.conf",
        "# resolved\nnameserver 10.0.0.3\nsearch example.com\nnameserver 10.0.0.2\n",
    ),
];

/// Parses `text` as [`SOURCE`] in the fake world ([`VARS`], [`FILES`]).
fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_isolated(text, Some(Path::new(SOURCE)), &VARS, &FILES)
}

/// Asserts that `error`, for `text`, says what an operator needs (see the module docs).
fn check_error(error: &ConfigError, text: &str) {
    let shown = error.to_string();
    let ConfigError::Invalid { at, problem } = error else {
        panic!("text input gave a read error: {shown}");
    };
    assert!(
        shown.starts_with(&format!("{SOURCE}:")),
        "an error that does not start with the file: {shown}"
    );
    let lines = text.lines().count();
    if let Some(line) = at.line {
        // A syntax error may be at the end of the text, after its last line break.
        assert!(
            (1..=lines + 1).contains(&line),
            "an error on line {line} of a {lines}-line file: {shown}"
        );
    }
    if matches!(problem.as_ref(), Problem::Toml { .. }) {
        // The toml crate's wording; it names no key for syntax errors and, rarely, no
        // position (a dotted key of 80 or more parts: "recursion limit").
        return;
    }
    let implied_zone = at
        .key
        .as_deref()
        .is_some_and(|key| key.starts_with("forward (default"));
    if implied_zone {
        // No [[forward]]: the default zone's /etc/resolv.conf is on no line of the file.
        return;
    }
    assert!(
        at.key.is_some() && at.line.is_some_and(|line| line <= lines),
        "an error without its key or a line of the file that holds it: {shown}"
    );
}

/// Asserts that `config` round-trips through [`Config::to_toml`] (see the module docs).
fn check_round_trip(config: &Config) {
    let printed = config.to_toml();
    let again = parse(&printed)
        .unwrap_or_else(|error| panic!("ringdns check's output is rejected: {error}\n{printed}"));
    assert_eq!(
        &again, config,
        "ringdns check's output parses to another config:\n{printed}"
    );
    assert_eq!(
        again.to_toml(),
        printed,
        "ringdns check's output prints differently once parsed"
    );
}

/// `data` as a config file (see the module docs); bytes that are not UTF-8 become U+FFFD, so
/// mutations that break UTF-8 still reach the parser.
pub(crate) fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse(&text) {
        Ok(config) => check_round_trip(&config),
        Err(error) => check_error(&error, &text),
    }
}
