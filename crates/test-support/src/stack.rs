//! The local stack as the tests find it: the variables `tests/stack.sh env`
//! prints (and `tests/run.sh` exports).

use std::path::{Path, PathBuf};

/// The stack's variable `name`. Panics, saying how to get the stack, when
/// it is not set: these tests never fall back to a default server.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. These tests need the local stack: run `tests/run.sh`, \
             or `tests/stack.sh up && eval \"$(tests/stack.sh env)\"` first"
        )
    })
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository's root")
}

/// A name part no earlier run used: the clock in milliseconds. Tests give
/// their topics, groups, prefixes and databases names of their own with it.
pub fn unique() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}
