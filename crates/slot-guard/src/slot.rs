//! The replication slot as PostgreSQL reports it, and the statements of a
//! recovery. All of them run as the connector's role.

use tokio_postgres::Client;

/// One look at the slot (`pg_replication_slots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// `reserved`, `extended`, `unreserved` or `lost`; `None` while a
    /// slot being created has no `restart_lsn` yet.
    pub wal_status: Option<String>,
    pub active: bool,
    /// The walsender using it, if any.
    pub active_pid: Option<i32>,
    /// Bytes of WAL that can still be written before the slot is in danger
    /// of `lost`; NULL when `max_slot_wal_keep_size` is -1 or it is lost.
    pub safe_wal_size: Option<i64>,
    /// Bytes of WAL the slot holds back (NULL once lost).
    pub retained_bytes: Option<i64>,
}

impl SlotStatus {
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// The slot's status; `None` when there is no slot of that name.
pub async fn status(pg: &Client, slot: &str) -> Result<Option<SlotStatus>, tokio_postgres::Error> {
    let row = pg
        .query_opt(
            "SELECT wal_status, active, active_pid, safe_wal_size,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotStatus {
        wal_status: r.get(0),
        active: r.get(1),
        active_pid: r.get(2),
        safe_wal_size: r.get(3),
        retained_bytes: r.get(4),
    }))
}

/// What [`drop_slot`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    Dropped,
    /// There was no such slot (an earlier attempt dropped it).
    Absent,
    /// A walsender still holds it: it was asked to end; try again.
    StillActive,
}

/// Drops the slot if no walsender holds it. A walsender that lingers after
/// the connector stopped is ended (the role may end its own backends).
pub async fn drop_slot(pg: &Client, slot: &str) -> Result<Dropped, tokio_postgres::Error> {
    let Some(s) = status(pg, slot).await? else {
        return Ok(Dropped::Absent);
    };
    if let Some(pid) = s.active_pid.filter(|_| s.active) {
        pg.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await?;
        return Ok(Dropped::StillActive);
    }
    let n = pg
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
              WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await?;
    Ok(if n == 1 {
        Dropped::Dropped
    } else {
        Dropped::StillActive
    })
}

/// The server's WAL write position and clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// As a number: what Debezium's offsets and `_cdc_lsn` hold.
    pub lsn: i64,
    /// Unix ms.
    pub at_ms: i64,
}

pub async fn position(pg: &Client) -> Result<Position, tokio_postgres::Error> {
    let row = pg
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
                    (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )
        .await?;
    Ok(Position {
        lsn: row.get(0),
        at_ms: row.get(1),
    })
}

/// Asks the connector for an incremental snapshot of `tables`
/// (schema-qualified) through its signal table: the row reaches it through
/// the change stream. Returns a WAL position after the signal's commit.
pub async fn signal_snapshot(
    pg: &Client,
    signal_table: &str,
    tables: &[String],
) -> Result<i64, tokio_postgres::Error> {
    // The table name comes from the connector's config, not from a user
    // of this service; it is quoted per part all the same.
    let qualified = signal_table
        .split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".");
    pg.execute(
        &format!(
            "INSERT INTO {qualified} (id, type, data)
             SELECT gen_random_uuid()::text, 'execute-snapshot',
                    json_build_object('data-collections', $1::text[], 'type', 'incremental')::text"
        ),
        &[&tables],
    )
    .await?;
    Ok(position(pg).await?.lsn)
}
