//! A real Kafka-protocol broker (tansu) for tests, on a free loopback port. Without the
//! binary (on PATH, or at `TRIBUTARY_TANSU`) a test prints why and passes; under CI
//! (`TRIBUTARY_CI` set) it fails.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The broker binary, or why there is none.
pub fn tansu() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TRIBUTARY_TANSU") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
}

/// The broker, or `None` (skipped, with the reason printed) when it is not installed.
pub fn broker_binary(test: &str) -> Option<PathBuf> {
    match tansu() {
        Some(b) => Some(b),
        None if std::env::var_os("TRIBUTARY_CI").is_some() => {
            panic!("{test}: the tansu broker is not installed (CI installs it: see .ci/run)")
        }
        None => {
            println!("{test}: skipped: no `tansu` on PATH nor TRIBUTARY_TANSU (see README, Kafka)");
            None
        }
    }
}

/// A running broker; killed when dropped.
pub struct Broker {
    pub child: Child,
    pub addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the broker on `port` (in-memory storage) and waits until it accepts connections.
pub fn start_broker(bin: &PathBuf, port: u16) -> Broker {
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(bin)
        .arg("broker")
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let broker = Broker {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&broker.addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "tansu did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    broker
}
