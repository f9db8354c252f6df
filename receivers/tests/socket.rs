//! The socket text receiver against a real TCP server on loopback.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tributary::testing::next_event;
use tributary::{
    Backoff, Directive, EventKind, ReceiverSpec, Store, Strategy, Supervisor, SupervisorError,
};
use tributary_receivers::socket::{recommended_strategy, SocketError, SocketTextReceiver};

const WITHIN: Duration = Duration::from_secs(10);

fn strategy() -> Strategy {
    recommended_strategy()
}

async fn recv_n(rx: &mut tokio::sync::mpsc::Receiver<String>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WITHIN, rx.recv()).await {
            Ok(Some(l)) => out.push(l),
            _ => break,
        }
    }
    out
}

#[tokio::test]
async fn reads_lines_reconnects_after_a_drop_and_skips_bad_lines() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        // First connection: three lines, then the server drops it.
        let (mut c, _) = listener.accept().await.unwrap();
        c.write_all(b"alpha\nbeta\r\ngamma\n").await.unwrap();
        drop(c);
        // Second connection: an over-long line, invalid UTF-8, then good lines; kept open.
        let (mut c, _) = listener.accept().await.unwrap();
        let long = "x".repeat(300);
        c.write_all(format!("delta\n{long}\nepsilon\n").as_bytes())
            .await
            .unwrap();
        c.write_all(b"\xff\xfe\nzeta\n").await.unwrap();
        c.flush().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });

    let root = Supervisor::start("root", strategy()).await.unwrap();
    let mut events = root.subscribe();
    let (store, mut rx) = Store::channel(64);
    let receiver = SocketTextReceiver::new(addr).max_line_len(100);
    root.spawn_receiver(
        ReceiverSpec::new("socket", receiver, store).backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
        )),
    )
    .await
    .unwrap();

    let got = recv_n(&mut rx, 6).await;
    assert_eq!(got, ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]);

    let closed = next_event(&mut events, WITHIN, |e| {
        matches!(&e.kind, EventKind::Failed { error, directive: Directive::Restart, .. } if error.contains("closed by the peer"))
    })
    .await;
    assert!(
        closed.is_some(),
        "the dropped connection was a typed error, restarted"
    );
    let too_long = next_event(&mut events, WITHIN, |e| {
        matches!(&e.kind, EventKind::Failed { error, directive: Directive::Resume, .. } if error.contains("longer than 100"))
    })
    .await;
    assert!(
        too_long.is_some(),
        "the over-long line was a typed error, resumed"
    );
    let utf8 = next_event(
        &mut events,
        WITHIN,
        |e| matches!(&e.kind, EventKind::Failed { error, .. } if error.contains("UTF-8")),
    )
    .await;
    assert!(utf8.is_some(), "invalid UTF-8 was a typed error");
    root.shutdown().await.unwrap();
    server.abort();
}

#[tokio::test]
async fn a_refused_connection_is_a_typed_start_failure() {
    // Bind then drop: the port is (very likely) closed now.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let root = Supervisor::start("root", strategy()).await.unwrap();
    let (store, _rx) = Store::channel(8);
    let err = root
        .spawn_receiver(ReceiverSpec::new(
            "socket",
            SocketTextReceiver::new(addr),
            store,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<SocketError>(),
            Some(SocketError::Connect { .. })
        ),
        "{err}"
    );
    root.shutdown().await.unwrap();
}

/// A sender faster than `store`: the reader reads at most its window ahead, then stops
/// reading, and TCP holds the sender back (nothing queues without bound in the receiver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_cannot_store_stops_reading_and_tcp_holds_the_sender_back() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let server = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let line = format!("{}\n", "w".repeat(99));
        let chunk = line.repeat(640); // 64,000 bytes
        while w.load(Ordering::Relaxed) < 512 << 20 {
            if c.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    let root = Supervisor::start("root", strategy()).await.unwrap();
    // Nobody reads the store's channel: after 64 lines, `store` waits.
    let (store, rx) = Store::channel(64);
    root.spawn_receiver(ReceiverSpec::new(
        "socket",
        SocketTextReceiver::new(addr),
        store,
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = written.load(Ordering::Relaxed);
    // The window (16 messages of at most 1,000 100-byte lines) plus the kernel's buffers.
    let window = (tributary_receivers::socket::READ_AHEAD * 1000 * 100) as u64;
    assert!(
        b < window + (32 << 20),
        "the sender wrote {b} bytes into a receiver that stores nothing"
    );
    assert_eq!(
        a, b,
        "the sender is held back: it wrote nothing more in a second"
    );
    // Closing the channel under a waiting `store` ends it with `Closed` (the lines it held are
    // counted as unstored, never acknowledged); the receiver escalates that unless the shutdown
    // reached it first. Either way the tree ends promptly. (Shutting down first would leave the
    // receiver inside `store` until the supervisor's child stop timeout.)
    drop(rx);
    match root.shutdown().await {
        Ok(()) => {}
        Err(SupervisorError::Escalated { child, error }) => {
            assert_eq!(child, "root/socket");
            assert!(format!("{error:?}").contains("Closed"), "{error:?}");
        }
        Err(e) => panic!("unexpected end of the tree: {e}"),
    }
    server.abort();
}
