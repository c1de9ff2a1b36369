//! One HTTP/1.1 request over a plain TCP connection, for the tests of the dashboard's
//! server (no HTTP client crate needed, and the exact method and `Host` are ours).
// Each test file uses what it needs of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response: the status, the headers (lowercase names) and the body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `method path` to `address`, naming `host` in the `Host` header.
pub fn request(address: SocketAddr, method: &str, host: &str, path: &str) -> Response {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status");
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `GET path` from `address`, addressed to it.
pub fn get(address: SocketAddr, path: &str) -> Response {
    request(address, "GET", &address.to_string(), path)
}
