//! Finding the `nats-server` binary, and its version: the one lookup the tests, the
//! benchmarks and the demo share.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use super::{lock, TestServerError};

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";

/// Where Debian's `nats-server` package installs the binary (not on a normal user's
/// `PATH`).
pub const DEBIAN_SERVER_PATH: &str = "/usr/sbin/nats-server";

const INSTALL_HINT: &str = "install it with `sudo apt-get install nats-server` (Debian/Ubuntu) \
     or run scripts/install-deps, or set NATS_SERVER_BIN to a nats-server binary \
     (scripts/install-nats-current puts an upstream v2.14.0 in .tools/)";

/// The `nats-server` binary to run.
///
/// In order: the `NATS_SERVER_BIN` environment variable (a path, or a bare name looked up
/// on `PATH`; when set it must be valid, there is no fallback), then `nats-server` on
/// `PATH`, then `/usr/sbin/nats-server`. A relative `NATS_SERVER_BIN` path is looked up
/// from the current directory and then its parents, so a path relative to the workspace
/// root works for the tests of every crate. When none is found the error says how to install
/// one: `sudo apt-get install nats-server`, `scripts/install-deps`, or `NATS_SERVER_BIN`.
/// The environment is read on every call: a binary installed meanwhile is found.
pub fn server_binary() -> Result<PathBuf, TestServerError> {
    resolve_server_binary(
        std::env::var_os(NATS_SERVER_BIN_ENV).as_deref(),
        std::env::var_os("PATH").as_deref(),
        Path::new(DEBIAN_SERVER_PATH),
    )
}

/// The resolution rules of [`server_binary`], with the environment passed in (testable).
fn resolve_server_binary(
    env_bin: Option<&OsStr>,
    path_var: Option<&OsStr>,
    fallback: &Path,
) -> Result<PathBuf, TestServerError> {
    if let Some(value) = env_bin.filter(|v| !v.is_empty()) {
        let given = Path::new(value);
        let candidate = if given.components().count() == 1 && !given.is_absolute() {
            // A bare name: look it up on PATH like a shell would.
            find_on_path(value, path_var)
        } else if given.is_relative() {
            // cargo runs each crate's tests in that crate's directory: a path relative to
            // the workspace root is found in an ancestor of the current directory.
            std::env::current_dir().ok().map(|cwd| {
                cwd.ancestors()
                    .map(|dir| dir.join(given))
                    .find(|candidate| is_executable_file(candidate))
                    .unwrap_or_else(|| cwd.join(given))
            })
        } else {
            Some(given.to_path_buf())
        };
        return match candidate {
            Some(path) if is_executable_file(&path) => Ok(path),
            Some(path) => Err(TestServerError::binary_not_found(format!(
                "{NATS_SERVER_BIN_ENV}={} points to {}, which {}; fix or unset \
                 {NATS_SERVER_BIN_ENV}, or {INSTALL_HINT}",
                given.display(),
                path.display(),
                if path.exists() {
                    "is not an executable file"
                } else {
                    "does not exist"
                }
            ))),
            None => Err(TestServerError::binary_not_found(format!(
                "{NATS_SERVER_BIN_ENV}={} was not found on PATH; fix or unset \
                 {NATS_SERVER_BIN_ENV}, or {INSTALL_HINT}",
                given.display()
            ))),
        };
    }
    if let Some(path) = find_on_path(OsStr::new("nats-server"), path_var) {
        return Ok(path);
    }
    if is_executable_file(fallback) {
        return Ok(fallback.to_path_buf());
    }
    Err(TestServerError::binary_not_found(format!(
        "nats-server not found ({NATS_SERVER_BIN_ENV} is not set, `nats-server` is not on \
         PATH, and {} does not exist): {INSTALL_HINT}",
        fallback.display()
    )))
}

fn find_on_path(name: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The version of the [`server_binary`], without the `v`: `nats-server: v2.9.10` gives
/// `"2.9.10"`. Computed once per binary path and cached.
pub fn server_version() -> Result<String, TestServerError> {
    binary_version(&server_binary()?)
}

/// The version `bin --version` reports, cached per path.
pub(super) fn binary_version(bin: &Path) -> Result<String, TestServerError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(version) = lock(cache).get(bin) {
        return Ok(version.clone());
    }
    let output = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            TestServerError::version(format!("running {} --version: {e}", bin.display()))
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let version = parse_version_output(&text).ok_or_else(|| {
        TestServerError::version(format!(
            "unexpected output of {} --version: {:?}",
            bin.display(),
            text.trim()
        ))
    })?;
    lock(cache).insert(bin.to_path_buf(), version.clone());
    Ok(version)
}

/// `"nats-server: v2.9.10"` -> `"2.9.10"`.
fn parse_version_output(text: &str) -> Option<String> {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix('v'))
        .find(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_output() {
        assert_eq!(
            parse_version_output("nats-server: v2.9.10\n").as_deref(),
            Some("2.9.10")
        );
        assert_eq!(
            parse_version_output("nats-server: v2.14.0").as_deref(),
            Some("2.14.0")
        );
        assert_eq!(parse_version_output("nats-server: version unknown"), None);
    }

    #[test]
    fn env_bin_pointing_nowhere_is_a_clear_error() {
        let Err(error) = resolve_server_binary(
            Some(OsStr::new("/nonexistent/nats-server")),
            Some(OsStr::new("/usr/bin:/bin")),
            Path::new("/nonexistent/fallback"),
        ) else {
            panic!("a missing NATS_SERVER_BIN must be an error");
        };
        let text = error.to_string();
        assert!(
            text.contains("NATS_SERVER_BIN=/nonexistent/nats-server"),
            "{text}"
        );
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.contains("apt-get install nats-server"), "{text}");
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let Err(error) = resolve_server_binary(
            None,
            Some(OsStr::new("/nonexistent-dir")),
            Path::new("/nonexistent/fallback"),
        ) else {
            panic!("no binary anywhere must be an error");
        };
        let text = error.to_string();
        assert!(text.contains("sudo apt-get install nats-server"), "{text}");
        assert!(text.contains("NATS_SERVER_BIN"), "{text}");
        assert!(text.contains("scripts/install-deps"), "{text}");
    }

    #[test]
    fn finds_on_path_then_fallback() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let bin = dir.path().join("nats-server");
        fs::write(&bin, "#!/bin/sh\n")?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        let found = resolve_server_binary(
            None,
            Some(dir.path().as_os_str()),
            Path::new("/nonexistent"),
        )?;
        assert_eq!(found, bin);
        let found = resolve_server_binary(None, Some(OsStr::new("/nonexistent")), &bin)?;
        assert_eq!(found, bin);
        // Not executable: skipped.
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o644))?;
        assert!(resolve_server_binary(Some(bin.as_os_str()), None, Path::new("/x")).is_err());
        Ok(())
    }
}
