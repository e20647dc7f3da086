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

/// The port of a `http://host:port` URL.
fn port_of(url: &str) -> String {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

/// `tests/stack.sh capture` against the stack the test environment names,
/// with `list` as the captured-tables list (`None`: the repository's).
/// Its ports and state dir are passed explicitly, derived from the same
/// variables the tests use, so that it can never act on another stack.
pub fn capture(list: Option<&Path>) -> Result<(), String> {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("tests/stack.sh"))
        .arg("capture")
        .env("CDC_LAKE_STATE", env("STACK_STATE"))
        .env("PG_PORT", env("TWEETGEN_DATABASE__PORT"))
        .env("CONNECT_PORT", port_of(&env("STACK_CONNECT_URL")))
        .stdin(Stdio::null());
    match list {
        Some(l) => cmd.env("CDC_LAKE_CAPTURED_TABLES_FILE", l),
        None => cmd.env_remove("CDC_LAKE_CAPTURED_TABLES_FILE"),
    };
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run tests/stack.sh: {e}"))?;
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tests/stack.sh capture (list {}) exited with {}: {}",
            list.map_or("db/captured-tables".into(), |l| l.display().to_string()),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
