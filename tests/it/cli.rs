//! The command line: `check` prints the effective config or names the bad line and key;
//! `--version` prints the version.
//!
//! Runs on: libtest threads. These start no server, but still enter a fresh namespace like
//! every test, so nothing they run could touch the host's network.

use crate::harness::ringdns::{run_cli, Io, TestConfig};
use crate::harness::{backend_tests, enter_netns};

backend_tests!(
    check_prints_the_effective_config,
    check_rejects_an_unknown_key_naming_line_and_key,
    check_rejects_an_unknown_io_backend,
);

/// Writes `text` to a fresh config file; returns the dir (keep it alive) and the path.
fn write_config(text: &str) -> anyhow::Result<(tempfile::TempDir, String)> {
    let dir = tempfile::Builder::new().prefix("ringdns-cli").tempdir()?;
    let path = dir.path().join("ringdns.toml");
    std::fs::write(&path, text)?;
    let path = path
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("UTF-8 path"))?
        .to_owned();
    Ok((dir, path))
}

/// `ringdns check` prints the effective config as TOML that checks again.
fn check_prints_the_effective_config(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("check_prints_the_effective_config/{io}"));
    let config = TestConfig::for_tests(io)
        .workers(3)
        .cache_str("denial_ttl", "5s")
        .forward_with(
            "cluster.local",
            &["127.0.0.10:53".parse()?],
            "prefer_udp",
            "2s",
        );
    let (_dir, path) = write_config(&config.to_toml())?;
    let output = run_cli(&["check", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}: {stdout}{stderr}",
        output.status
    );
    let effective: toml::Table = toml::from_str(&stdout)
        .map_err(|e| anyhow::anyhow!("check output is not TOML: {e}\n{stdout}"))?;
    let server = &effective["server"];
    assert_eq!(
        server["io"].as_str(),
        Some(io.to_string().as_str()),
        "{stdout}"
    );
    assert_eq!(server["workers"].as_integer(), Some(3), "{stdout}");
    let listen: Vec<_> = server["listen"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(listen, ["127.0.0.1:53", "[::1]:53"], "{stdout}");
    // Effective: defaults filled in for keys the file left out.
    assert!(
        server.get("udp_payload").is_some(),
        "defaults shown:\n{stdout}"
    );
    assert!(effective["cache"].get("success_ttl").is_some(), "{stdout}");
    let forward = &effective["forward"][0];
    let zone = forward["zone"].as_str().unwrap_or("");
    assert_eq!(zone.trim_end_matches('.'), "cluster.local", "{stdout}");
    assert_eq!(
        forward["transport"].as_str(),
        Some("prefer_udp"),
        "{stdout}"
    );
    // The output is itself a valid config.
    let (_dir2, again) = write_config(&stdout)?;
    let output = run_cli(&["check", "--config", &again])?;
    assert!(
        output.status.success(),
        "check's own output must check: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `ringdns check` on an unknown key fails naming file:line and the key.
fn check_rejects_an_unknown_key_naming_line_and_key(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!(
        "check_rejects_an_unknown_key_naming_line_and_key/{io}"
    ));
    let good = TestConfig::for_tests(io).forward("cluster.local", "127.0.0.10:53".parse()?);
    // Line 1 is `[server]`; the unknown key becomes line 2.
    let text = good
        .to_toml()
        .replacen("[server]\n", "[server]\nlisten_backlog_typo = 7\n", 1);
    let (_dir, path) = write_config(&text)?;
    let output = run_cli(&["check", "--config", &path])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail: {stderr}");
    assert!(
        stderr.contains("listen_backlog_typo"),
        "names the key: {stderr}"
    );
    assert!(stderr.contains(&path), "names the file: {stderr}");
    assert!(
        stderr.contains(&format!("{path}:2")),
        "names file:line: {stderr}"
    );
    Ok(())
}

/// `ringdns check` on `io = "kqueue"` fails naming file:line.
fn check_rejects_an_unknown_io_backend(io: Io) -> anyhow::Result<()> {
    let _ns = enter_netns!(&format!("check_rejects_an_unknown_io_backend/{io}"));
    let text = TestConfig::for_tests(io)
        .to_toml()
        .replace(&format!("io = \"{io}\""), "io = \"kqueue\"");
    let (_dir, path) = write_config(&text)?;
    let output = run_cli(&["check", "--config", &path])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail: {stderr}");
    assert!(stderr.contains("io"), "names the key: {stderr}");
    assert!(
        stderr.contains(&format!("{path}:4")),
        "names file:line: {stderr}"
    );
    Ok(())
}

/// `ringdns --version` prints the crate version.
#[test]
fn version_prints_the_package_version() -> anyhow::Result<()> {
    let _ns = enter_netns!("version_prints_the_package_version");
    let output = run_cli(&["--version"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}: {stdout}", output.status);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
    Ok(())
}
