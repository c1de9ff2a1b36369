//! The repository's flagship `streams.toml` (the analytics platform's streams and
//! consumers) is a valid config. It lives here, in the repository's own package, because
//! the file is not part of any published crate. No server needed.

use std::path::Path;

use jetworker::Config;

#[test]
fn the_shipped_streams_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("streams.toml");
    let c = Config::load_with_env(&path, std::iter::empty()).expect("streams.toml is valid");
    assert!(!c.consumers.is_empty());
}
