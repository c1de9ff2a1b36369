//! `NATS_SERVER_BIN` handling of the test helper. This file holds a single test: it sets
//! a process-wide environment variable, so it must not share a process with other tests.

use jetworker::testing::server::{server_binary, NatsServer, TestServerErrorKind};

#[test]
fn nats_server_bin_pointing_to_a_missing_file_is_a_clear_error() {
    let missing = std::env::temp_dir().join("jetworker-no-such-dir/nats-server");
    std::env::set_var("NATS_SERVER_BIN", &missing);

    let error = match server_binary() {
        Ok(path) => panic!("resolved {} from a missing NATS_SERVER_BIN", path.display()),
        Err(error) => error,
    };
    assert!(
        error.kind() == TestServerErrorKind::BinaryNotFound,
        "{error:?}"
    );
    let text = error.to_string();
    assert!(text.contains(&missing.display().to_string()), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("sudo apt-get install nats-server"), "{text}");
    assert!(text.contains("scripts/install-deps"), "{text}");

    // Starting a server reports the same problem instead of falling back silently.
    let error = match NatsServer::start() {
        Ok(server) => panic!("started {} from a missing NATS_SERVER_BIN", server.url()),
        Err(error) => error,
    };
    assert!(error.to_string().contains("does not exist"), "{error}");

    // Set but empty counts as unset: the usual search applies.
    std::env::set_var("NATS_SERVER_BIN", "");
    if let Ok(path) = server_binary() {
        assert!(path.is_file(), "{}", path.display());
    }
}
