//! One small HTTP/1.1 client: a request over a fresh connection with
//! `Connection: close`, as a probe or a scraper sends it. Hand-written on
//! purpose: the test sees exactly the bytes a scraper gets, and the
//! workspace needs no HTTP client crate for it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A whole request must be answered within this; a hung endpoint fails
/// the test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The status line and the headers, lower-cased (header names are
    /// case-insensitive).
    pub headers: String,
    pub body: String,
}

/// `method path` to `addr`; panics if there is no answer within 10 s.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} http://{addr}{path}: no answer within {TIMEOUT:?}"));
    let (headers, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {headers:?}"));
    Reply {
        status,
        headers: headers.to_lowercase(),
        body: body.to_string(),
    }
}

/// `GET path` to `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}
