//! Headless Chromium for browser tests.
//!
//! [`Browser::start`] starts Debian's `chromedriver` on a free loopback port and opens a
//! WebDriver session in headless `chromium` with a fresh profile, with the flags that keep
//! Chromium off the network (no background networking, no component updates, no sync, no
//! QUIC): tests only ever load pages served on loopback. The driver process is killed when
//! the [`Browser`] is dropped.
//!
//! Both binaries come from the OS packages `chromium` and `chromium-driver`, which
//! `scripts/install-deps` installs when missing; `CHROMIUM_BIN` and `CHROMEDRIVER_BIN`
//! point elsewhere. [`Browser::screenshot`] saves a PNG under `target/screenshots/` (or
//! `SCREENSHOT_DIR`) so a test run leaves a picture of each page it checked.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub use fantoccini::{elements::Element, Client, Locator};

/// What can go wrong starting the browser or talking to it.
pub type BrowserError = Box<dyn std::error::Error + Send + Sync>;

/// A headless Chromium session driven over WebDriver.
pub struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// Where the Chromium binary is: `CHROMIUM_BIN`, else the Debian package's path.
pub fn chromium_bin() -> PathBuf {
    binary(
        "CHROMIUM_BIN",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    )
}

/// Where chromedriver is: `CHROMEDRIVER_BIN`, else the Debian package's path.
pub fn chromedriver_bin() -> PathBuf {
    binary("CHROMEDRIVER_BIN", &["/usr/bin/chromedriver"])
}

fn binary(env: &str, candidates: &[&str]) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(candidates[0]))
}

fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session (1280x900 window).
    pub async fn start() -> Result<Browser, BrowserError> {
        let (chromium, chromedriver) = (chromium_bin(), chromedriver_bin());
        for (what, path) in [("chromium", &chromium), ("chromedriver", &chromedriver)] {
            if !path.exists() {
                return Err(format!(
                    "{what} not found at {} (run scripts/install-deps, or set {})",
                    path.display(),
                    if what == "chromium" {
                        "CHROMIUM_BIN"
                    } else {
                        "CHROMEDRIVER_BIN"
                    }
                )
                .into());
            }
        }
        let port = free_loopback_port()?;
        let mut driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", chromedriver.display()))?;
        let profile = tempfile::tempdir()?;
        let url = format!("http://127.0.0.1:{port}");
        let client = match connect(&url, &chromium, profile.path()).await {
            Ok(client) => client,
            Err(e) => {
                let _ = driver.kill().await;
                return Err(e);
            }
        };
        Ok(Browser {
            client,
            driver,
            _profile: profile,
        })
    }

    /// The WebDriver session.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Saves a PNG of the page as `NAME.png` in the screenshot directory and returns its path.
    pub async fn screenshot(&self, name: &str) -> Result<PathBuf, BrowserError> {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, self.client.screenshot().await?)?;
        Ok(path)
    }

    /// Waits up to `timeout` for `script` (a JavaScript expression's body, `return ...;`)
    /// to return `true`, polling every 50 ms. The error names the script.
    pub async fn wait_until_js(&self, script: &str, timeout: Duration) -> Result<(), BrowserError> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.client.execute(script, vec![]).await?;
            if value == serde_json::Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for: {script} (last: {value})"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the session and stops the driver.
    pub async fn close(mut self) -> Result<(), BrowserError> {
        let closed = self.client.clone().close().await;
        let _ = self.driver.kill().await;
        closed.map_err(Into::into)
    }
}

/// Where screenshots go: `SCREENSHOT_DIR`, else `target/screenshots` of the workspace.
pub fn screenshot_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("../../target/screenshots")
}

async fn connect(url: &str, chromium: &Path, profile: &Path) -> Result<Client, BrowserError> {
    let options = serde_json::json!({
        "binary": chromium.display().to_string(),
        "args": [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--window-size=1280,900",
            format!("--user-data-dir={}", profile.display()),
        ],
    });
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    // chromedriver needs a moment to listen; retry the session for up to 20 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = fantoccini::ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(url)
            .await;
        match attempt {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("no WebDriver session at {url}: {e}").into()),
        }
    }
}
