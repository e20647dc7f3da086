//! The operators' HTTP endpoint, on one address per service:
//!
//! - `GET /metrics`: the Prometheus text exposition of every metric recorded
//!   so far ([`crate::prometheus`]);
//! - `GET /healthz`: `200 ok` for as long as the process answers at all;
//! - `GET /readyz`: `200 ready`, or `503` with the one-line reason the
//!   service gave its [`Readiness`].
//!
//! hyper 1 with one HTTP/1 connection task per client. Three fixed routes
//! need no router, and hyper is in the workspace's tree anyway.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::health::Readiness;
use crate::prometheus::{self, PrometheusHandle, RecorderError};

/// How often histogram samples are drained into their buckets when nobody
/// scrapes (a scrape drains them too), which bounds their memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// A client that has not sent a whole request head by then is dropped, so
/// idle or stalled connections cannot pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The Prometheus text format, version 0.0.4, is what the exporter renders.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The service's error names its config key around this one.
    #[error("cannot listen on {addr} for /metrics, /healthz and /readyz")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Recorder(#[from] RecorderError),
}

/// A running endpoint. Dropping it stops the server and closes its
/// connections.
#[derive(Debug)]
pub struct OpsServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl OpsServer {
    /// The address bound, with the port the system chose for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        // The connections live in the task's JoinSet and go with it.
        self.task.abort();
    }
}

/// Installs the metrics recorder ([`prometheus::install`]), runs
/// `describe` (the service's HELP lines and series that start at 0, so they
/// are there from the first scrape) and serves the endpoint on `addr`.
/// Returns once the socket is bound, so that a busy or forbidden address
/// fails the service's start, not some later scrape.
pub async fn start(
    addr: SocketAddr,
    readiness: Readiness,
    describe: impl FnOnce(),
) -> Result<OpsServer, ServeError> {
    let metrics = prometheus::install()?;
    describe();
    serve(addr, metrics, readiness).await
}

/// Serves `metrics` and `readiness` on `addr` (see the module docs), from a
/// task of its own on the current runtime.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    readiness: Readiness,
) -> Result<OpsServer, ServeError> {
    let bind_error = |source| ServeError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    tracing::info!("serving /metrics, /healthz and /readyz on http://{local_addr}");
    let state = Arc::new(State { metrics, readiness });
    let task = tokio::spawn(accept_loop(listener, state));
    Ok(OpsServer { local_addr, task })
}

struct State {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    let mut upkeep = tokio::time::interval(UPKEEP_EVERY);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, state.clone()));
                }
                Err(err) => {
                    // Typically out of file descriptors: back off rather
                    // than spin, and keep serving once some are free.
                    tracing::warn!(error = %err, "cannot accept a metrics connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = upkeep.tick() => state.metrics.run_upkeep(),
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&state, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(err) = served {
        tracing::debug!(error = %err, "metrics connection ended with an error");
    }
}

fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::from(state.metrics.render()));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(EXPOSITION));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" => match state.readiness.get() {
            Ok(()) => text(StatusCode::OK, "ready"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
