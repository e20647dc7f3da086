//! The stack's PostgreSQL.

use crate::stack::{env, repo_root};

async fn connect(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL of the local stack is not reachable (tests/stack.sh up): {e}")
        });
    tokio::spawn(connection);
    client
}

/// The superuser in database `dbname`, over the stack's private unix socket
/// (`STACK_PG_SUPERUSER_SOCKET`).
pub async fn superuser(dbname: &str) -> tokio_postgres::Client {
    connect(&format!(
        "host={} port={} dbname={dbname} user=postgres connect_timeout=5",
        env("STACK_PG_SUPERUSER_SOCKET"),
        env("TWEETGEN_DATABASE__PORT")
    ))
    .await
}

/// The workload's role `tweetgen` in the demo database, over TCP with its
/// password, as the generator connects.
pub async fn tweetgen() -> tokio_postgres::Client {
    connect(&format!(
        "host={} port={} dbname=twitter user=tweetgen password={} connect_timeout=5",
        env("TWEETGEN_DATABASE__HOST"),
        env("TWEETGEN_DATABASE__PORT"),
        env("TWEETGEN_DATABASE__PASSWORD")
    ))
    .await
}

/// A brand-new database of a test's own with the project's schema and
/// grants (`db/001_schema.sql`, `db/002_grants.sql`), so the test knows
/// every row in it.
pub struct TestDb {
    /// `tweetgen_test_<name>`.
    pub name: String,
    /// Superuser connection to it.
    pub su: tokio_postgres::Client,
}

/// Drops and creates `tweetgen_test_<name>` and applies the schema.
pub async fn fresh_db(name: &str) -> TestDb {
    let db = format!("tweetgen_test_{name}");
    let su = superuser("twitter").await;
    // Two statements: a multi-statement string runs as one transaction.
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    su.batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let client = superuser(&db).await;
    for f in ["001_schema.sql", "002_grants.sql"] {
        let path = repo_root().join("db").join(f);
        client
            .batch_execute(&std::fs::read_to_string(&path).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    TestDb {
        name: db,
        su: client,
    }
}

/// The one number `sql` selects.
pub async fn count(c: &impl tokio_postgres::GenericClient, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}
