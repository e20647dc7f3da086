//! The ops endpoint over a real socket: test-support's hand-written HTTP/1.1
//! client, so the test sees exactly the bytes a scraper or a probe gets.

use std::net::SocketAddr;
use std::time::Duration;

use cdc_telemetry::Readiness;
use cdc_telemetry::server::{self, ServeError};
use test_support::http::{Reply, request};
use test_support::wait_until;
use tokio::net::TcpStream;

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

#[tokio::test]
async fn serves_health_readiness_and_metrics() {
    let readiness = Readiness::new("connecting to the database");
    let ops = server::start("127.0.0.1:0".parse().unwrap(), readiness.clone(), || {})
        .await
        .unwrap();
    let addr = ops.local_addr();
    assert_ne!(addr.port(), 0);

    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));

    let not_ready = get(addr, "/readyz").await;
    assert_eq!(
        (not_ready.status, not_ready.body.as_str()),
        (503, "connecting to the database")
    );
    readiness.set_ready();
    let ready = get(addr, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready"));
    readiness.set(Err("lost the connection:\nreset by peer".into()));
    let lost = get(addr, "/readyz").await;
    assert_eq!(
        (lost.status, lost.body.as_str()),
        (503, "lost the connection: reset by peer")
    );

    metrics::counter!("telemetry_test_events_total", "kind" => "a").increment(3);
    metrics::histogram!("telemetry_test_step_duration_seconds").record(0.007);
    metrics::histogram!("telemetry_test_step_duration_seconds").record(42.0);
    let scrape = get(addr, "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        scrape.headers
    );
    let body = scrape.body;
    assert!(
        body.contains("# TYPE telemetry_test_events_total counter"),
        "{body}"
    );
    assert!(
        body.contains("telemetry_test_events_total{kind=\"a\"} 3"),
        "{body}"
    );
    // A histogram with the duration buckets, not a summary: 7 ms is in the
    // 10 ms bucket and above, 42 s only from 60 s on.
    let h = "telemetry_test_step_duration_seconds";
    assert!(body.contains(&format!("# TYPE {h} histogram")), "{body}");
    for (le, n) in [("0.005", 0), ("0.01", 1), ("30", 1), ("60", 2), ("+Inf", 2)] {
        let line = format!("{h}_bucket{{le=\"{le}\"}} {n}\n");
        assert!(body.contains(&line), "no `{line}` in\n{body}");
    }
    assert!(body.contains(&format!("{h}_count 2\n")), "{body}");
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let ops = server::start("127.0.0.1:0".parse().unwrap(), Readiness::default(), || {})
        .await
        .unwrap();
    let addr = ops.local_addr();
    assert_eq!(get(addr, "/").await.status, 404);
    let post = request(addr, "POST", "/metrics").await;
    assert_eq!(post.status, 405);
    assert!(
        post.headers.contains("allow: get, head"),
        "{}",
        post.headers
    );
    let head = request(addr, "HEAD", "/healthz").await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
}

#[tokio::test]
async fn a_busy_address_is_an_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = server::start(addr, Readiness::default(), || {})
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn dropping_the_server_closes_the_port() {
    let ops = server::start("127.0.0.1:0".parse().unwrap(), Readiness::default(), || {})
        .await
        .unwrap();
    let addr = ops.local_addr();
    drop(ops);
    // The accept task is aborted asynchronously: wait until a connection
    // is refused.
    wait_until(
        &format!("{addr} to refuse connections after the server was dropped"),
        Duration::from_secs(1),
        async || match TcpStream::connect(addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("a connection was accepted"),
        },
    )
    .await;
}
