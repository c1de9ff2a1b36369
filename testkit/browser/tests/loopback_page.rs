//! The kit itself: Chromium loads a page served on loopback, runs its script, and the
//! screenshot is a PNG.

use browser_kit::{Browser, Locator};
use std::io::{Read, Write};
use std::time::Duration;

#[tokio::test]
async fn a_loopback_page_renders_and_runs_its_script() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let body = "<!doctype html><title>kit</title><p id=out>waiting</p>\
                        <script>document.getElementById('out').textContent = 'ran ' + (6 * 7);</script>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let browser = Browser::start().await.expect("browser");
    browser
        .client()
        .goto(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("goto");
    browser
        .wait_until_js(
            "return document.getElementById('out').textContent === 'ran 42';",
            Duration::from_secs(10),
        )
        .await
        .expect("script ran");
    let text = browser
        .client()
        .find(Locator::Id("out"))
        .await
        .expect("find")
        .text()
        .await
        .expect("text");
    assert_eq!(text, "ran 42");
    let shot = browser
        .screenshot("browser-kit-loopback")
        .await
        .expect("screenshot");
    let png = std::fs::read(&shot).expect("read screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    browser.close().await.expect("close");
}
