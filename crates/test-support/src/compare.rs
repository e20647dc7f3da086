//! The lake compared with PostgreSQL, value by value. PostgreSQL computes
//! each column's canonical text (the form `tests/lake_read.py` prints the
//! lake's values in), and a current-state table must hold exactly
//! PostgreSQL's keys with every column equal, through every reader.

use std::collections::BTreeMap;

use crate::lake::{mirror_rows, primary_key};

/// A reader's view of a row: a `<column>__string` sibling (the text of a
/// value the column's type cannot hold, such as numeric NaN) stands for
/// the column where it is set, and is not a column of its own.
pub fn fold_text_siblings(
    values: &BTreeMap<String, Option<String>>,
) -> BTreeMap<String, Option<String>> {
    let mut out = values.clone();
    for (name, v) in values {
        if let Some(base) = name
            .strip_suffix("__string")
            .filter(|b| values.contains_key(*b))
        {
            if v.is_some() {
                assert_eq!(values[base], None, "{base} and {name} both set: {values:?}");
                out.insert(base.to_string(), v.clone());
            }
            out.remove(name);
        }
    }
    out
}

/// Asserts the current-state table of `table` holds exactly PostgreSQL's
/// rows, through every reader: the same keys (no ghost rows, none
/// missing), and every column equal.
pub async fn assert_mirror_equals_pg(pg: &tokio_postgres::Client, prefix: &str, table: &str) {
    for reader in ["deltalake", "duckdb", "polars"] {
        if let Err(diff) = mirror_diff(pg, reader, prefix, table).await {
            panic!("{diff}");
        }
    }
}

/// How the current-state table of `table`, read by `reader`, differs from
/// PostgreSQL's rows (the first difference found), if it does.
pub async fn mirror_diff(
    pg: &tokio_postgres::Client,
    reader: &str,
    prefix: &str,
    table: &str,
) -> Result<(), String> {
    let key = primary_key(table).join(", ");
    let pg_keys: Vec<String> = pg
        .query(&format!("SELECT concat_ws(',', {key}) FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let refs: Vec<&String> = pg_keys.iter().collect();
    let pg_rows = pg_state(pg, table, &refs).await;
    let rows = mirror_rows(reader, prefix, table);
    let mut mirror = BTreeMap::new();
    for r in &rows {
        if mirror
            .insert(r.key(), fold_text_siblings(&r.values))
            .is_some()
        {
            return Err(format!(
                "{reader}: {table} key {} twice in the current-state table",
                r.key()
            ));
        }
    }
    if !mirror.keys().eq(pg_rows.keys()) {
        let extra: Vec<_> = mirror
            .keys()
            .filter(|k| !pg_rows.contains_key(*k))
            .collect();
        let missing: Vec<_> = pg_rows
            .keys()
            .filter(|k| !mirror.contains_key(*k))
            .collect();
        return Err(format!(
            "{reader}: {table}: the current-state table's keys differ from PostgreSQL's: \
             {} not in PostgreSQL (first {:?}), {} missing (first {:?})",
            extra.len(),
            extra.first(),
            missing.len(),
            missing.first()
        ));
    }
    for (k, row) in &mirror {
        for (col, v) in row {
            if Some(v) != pg_rows[k].get(col) {
                return Err(format!(
                    "{reader}: {table} key {k} column {col} in the current-state table: \
                     {v:?}, PostgreSQL {:?}",
                    pg_rows[k].get(col)
                ));
            }
        }
        if row.len() != pg_rows[k].len() {
            return Err(format!(
                "{reader}: {table} key {k}: columns {:?} vs {:?}",
                row.keys().collect::<Vec<_>>(),
                pg_rows[k].keys().collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// The same canonical text, computed by PostgreSQL, for the rows whose
/// key is in `keys` (keys as the lake writes them: "1" or "3,17").
pub async fn pg_state(
    pg: &tokio_postgres::Client,
    table: &str,
    keys: &[&String],
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let cols = pg
        .query(
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap();
    let mut exprs = Vec::new();
    let mut names = Vec::new();
    for c in &cols {
        let (name, ty): (String, String) = (c.get(0), c.get(1));
        // The lake's documented forms: timestamps as epoch µs with
        // ±infinity at 9999-12-31T23:59:59.999999 / 0001-01-01, arrays as
        // [a, b] with NULL spelled out.
        exprs.push(match ty.as_str() {
            "timestamp with time zone" | "timestamp without time zone" => format!(
                "CASE WHEN {name} = 'infinity' THEN '253402300799999999' \
                 WHEN {name} = '-infinity' THEN '-62135596800000000' \
                 ELSE (extract(epoch from {name}) * 1000000)::bigint::text END"
            ),
            "ARRAY" => format!("'[' || array_to_string({name}, ', ', 'NULL') || ']'"),
            // Debezium keeps the instant of a timetz, not its offset
            // (docs/design.md, Types): the UTC time, ISO-8601.
            "time with time zone" => {
                format!("((({name}) AT TIME ZONE 'UTC')::time)::text || 'Z'")
            }
            "money" => format!("{name}::numeric::text"),
            _ => format!("{name}::text"),
        });
        names.push(name);
    }
    let key_cols = primary_key(table);
    let parts: Vec<Vec<i64>> = (0..key_cols.len())
        .map(|i| {
            keys.iter()
                .map(|k| k.split(',').nth(i).unwrap().parse().unwrap())
                .collect()
        })
        .collect();
    let sql = format!(
        "SELECT {} FROM {table} WHERE ({}) IN (SELECT * FROM unnest({}))",
        exprs.join(", "),
        key_cols.join(", "),
        (1..=key_cols.len())
            .map(|i| format!("${i}::bigint[]"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parts
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let mut out = BTreeMap::new();
    for row in pg.query(&sql, &params).await.unwrap() {
        let values: BTreeMap<String, Option<String>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), row.get::<_, Option<String>>(i)))
            .collect();
        let key = key_cols
            .iter()
            .map(|k| values[*k].clone().unwrap())
            .collect::<Vec<_>>()
            .join(",");
        out.insert(key, values);
    }
    out
}
