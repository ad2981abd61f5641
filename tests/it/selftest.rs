//! Checks the isolation `enter_netns!` promises: a fresh namespace per test thread, `lo` up.
//!
//! Runs on: libtest threads.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use crate::harness::{enter_netns, netns, run_bounded};

/// The test thread, not the process, moves to a fresh namespace and back.
#[test]
fn test_thread_gets_its_own_namespace() -> anyhow::Result<()> {
    let process = netns::process_id()?;
    let before = netns::current_id()?;
    let ns = enter_netns!("test_thread_gets_its_own_namespace");
    assert_ne!(
        ns.id(),
        process,
        "thread namespace must differ from the process's"
    );
    assert_eq!(netns::current_id()?, ns.id());
    assert_eq!(
        netns::process_id()?,
        process,
        "unshare must not move the process leader"
    );
    drop(ns);
    assert_eq!(
        netns::current_id()?,
        before,
        "guard restores the original namespace"
    );
    Ok(())
}

/// The fresh namespace has only `lo`, it is up, and children inherit it.
#[test]
fn loopback_is_up_and_children_share_the_namespace() -> anyhow::Result<()> {
    let ns = enter_netns!("loopback_is_up_and_children_share_the_namespace");
    let output = run_bounded(
        Command::new("ip").args(["-o", "link", "show"]),
        Duration::from_secs(5),
    )?;
    let links = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        links.lines().count(),
        1,
        "only lo in a fresh namespace:\n{links}"
    );
    assert!(
        links.contains("lo:") && links.contains("UP"),
        "lo up:\n{links}"
    );
    let child = run_bounded(
        Command::new("readlink").arg("/proc/self/ns/net"),
        Duration::from_secs(5),
    )?;
    assert_eq!(String::from_utf8_lossy(&child.stdout).trim(), ns.id());
    Ok(())
}

/// Loopback carries TCP and UDP (v4 and v6), and spawned threads share the namespace.
#[test]
fn loopback_carries_traffic_and_threads_inherit_the_namespace() -> anyhow::Result<()> {
    let ns = enter_netns!("loopback_carries_traffic_and_threads_inherit_the_namespace");
    // Port 53 is free: nothing else lives in this namespace.
    let listener = TcpListener::bind("127.0.0.53:53")?;
    let id = ns.id().to_owned();
    let from_thread = std::thread::spawn(move || -> anyhow::Result<String> {
        let _stream =
            TcpStream::connect_timeout(&"127.0.0.53:53".parse()?, Duration::from_secs(2))?;
        netns::current_id()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    assert_eq!(from_thread, id);
    let (_accepted, _) = listener.accept()?;
    let a = UdpSocket::bind("[::1]:0")?;
    let b = UdpSocket::bind("[::1]:0")?;
    b.set_read_timeout(Some(Duration::from_secs(2)))?;
    a.send_to(b"ping", b.local_addr()?)?;
    let mut buf = [0u8; 8];
    let (len, _) = b.recv_from(&mut buf)?;
    assert_eq!(&buf[..len], b"ping");
    Ok(())
}

/// Concurrent namespaces can each bind 127.0.0.1:53.
#[test]
fn parallel_tests_can_bind_the_same_port() -> anyhow::Result<()> {
    let _ns = enter_netns!("parallel_tests_can_bind_the_same_port");
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || -> anyhow::Result<()> {
                let _ns = enter_netns!(&format!("parallel_tests_can_bind_the_same_port/{i}"));
                let _socket = UdpSocket::bind("127.0.0.1:53")?;
                std::thread::sleep(Duration::from_millis(100));
                Ok(())
            })
        })
        .collect();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread panicked"))??;
    }
    Ok(())
}
