"""Checks, after a benchmark whose sink started mid-stream, that every row
the run created is in the lake exactly as PostgreSQL has it.

A sink that starts at the topics' end holds only the run's changes, so
its current-state tables are not whole tables, and a row created before
the run lacks, in the lake, what it had then (an unchanged TOASTed value
is carried from a previous image the lake never saw). A row created
during the run has all of its history in the lake, so for each table:

    created  = the distinct keys of the run's changelog with an insert;
    expected = PostgreSQL's rows whose key is in `created`
               (a row deleted again during the run is in neither);
    got      = the current-state table's rows whose key is in `created`.

`expected` and `got` are compared by row count and by an order-independent
hash of every column (the sum of each row's MD5, its first 15 hex digits
as an integer), each side computed by its own database: DuckDB over the
Delta tables (the delta extension, read through the Delta log, no sink
code) and PostgreSQL over the table. The keys go from one to the other as
a CSV file. On a difference it lists up to five keys that differ. It
also prints how many keys the run changed in all.

    touched_equal.py --prefix P [--tables users,tweets,likes,follows]

PostgreSQL is reached with psql and the PG* environment variables;
MinIO as tests/lake_read.py does.
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lake_read import duckdb_connect, uri  # noqa: E402

KEYS = {
    "users": ["id"],
    "tweets": ["id"],
    "likes": ["user_id", "tweet_id"],
    "follows": ["follower_id", "followee_id"],
}

# One canonical text per PostgreSQL type, written once for each side.
PG_EXPR = {
    "bigint": "{c}::text",
    "integer": "{c}::text",
    "smallint": "{c}::text",
    "text": "{c}",
    "character varying": "{c}",
    "boolean": "{c}::int::text",
    "numeric": "{c}::text",
    "timestamp with time zone": "(extract(epoch FROM {c}) * 1000000)::bigint::text",
    "ARRAY": "array_to_string({c}, chr(30), '\\N')",
}
DUCK_EXPR = {
    "bigint": "CAST({c} AS VARCHAR)",
    "integer": "CAST({c} AS VARCHAR)",
    "smallint": "CAST({c} AS VARCHAR)",
    "text": "{c}",
    "character varying": "{c}",
    "boolean": "CAST(CAST({c} AS INTEGER) AS VARCHAR)",
    "numeric": "CAST({c} AS VARCHAR)",
    "timestamp with time zone": "CAST(epoch_us({c}) AS VARCHAR)",
    # DuckDB's array_to_string gives NULL for an empty list.
    "ARRAY": "CASE WHEN {c} IS NOT NULL THEN "
    "coalesce(array_to_string(list_transform({c}, x -> coalesce(x, '\\N')), chr(30)), '') END",
}


def psql(sql):
    out = subprocess.run(
        ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-F", "\t", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
    )
    return [line.split("\t") for line in out.stdout.splitlines() if line]


def psql_script(script):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1", "-F", "\t", "-f", f.name],
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)
    return [line.split("\t") for line in out.stdout.splitlines() if line]


def row_text(columns, types, expr, ref=None):
    ref = ref or quote
    parts = [f"coalesce({expr[types[c]].format(c=ref(c))}, '\\N')" for c in columns]
    return f"concat_ws(chr(31), {', '.join(parts)})"


def quote(c):
    return '"' + c.replace('"', '""') + '"'


def check(con, prefix, table):
    keys = KEYS[table]
    cols = psql(
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = 'public' AND table_name = '{table}' ORDER BY ordinal_position"
    )
    types = {name: kind for name, kind in cols}
    unknown = sorted(set(types.values()) - set(PG_EXPR))
    if unknown:
        sys.exit(f"{table}: no canonical text for {unknown}")
    columns = list(types)
    changelog, mirror = uri(prefix, table), uri(prefix, f"_current/{table}")
    key_list = ", ".join(quote(k) for k in keys)
    md5_int = "CAST(('0x' || substr(md5({t}), 1, 15)) AS BIGINT)"

    with tempfile.TemporaryDirectory() as d:
        keys_csv = os.path.join(d, "keys.csv")
        con.execute(
            f"COPY (SELECT DISTINCT {key_list} FROM delta_scan('{changelog}') "
            f"WHERE _cdc_op IN ('c', 'r')) TO '{keys_csv}' (HEADER false)"
        )
        changed = con.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT {key_list} FROM delta_scan('{changelog}') "
            "WHERE _cdc_op <> 'recovery')"
        ).fetchone()[0]
        touched = con.execute(f"SELECT count(*) FROM read_csv('{keys_csv}', header = false)").fetchone()[0]
        # The mirror's rows of those keys (an older row the run changed
        # is there too, but without what it had before the run).
        mirror_rows = (
            f"(SELECT m.* FROM delta_scan('{mirror}') m "
            f"SEMI JOIN read_csv('{keys_csv}', header = false, names = [{', '.join(repr(k) for k in keys)}]) k "
            f"USING ({key_list}))"
        )
        got = con.execute(
            f"SELECT count(*), coalesce(sum({md5_int.format(t=row_text(columns, types, DUCK_EXPR))}), 0) "
            f"FROM {mirror_rows}"
        ).fetchone()
        key_types = ", ".join(f"{quote(k)} {types[k]}" for k in keys)
        in_t = lambda c: "t." + quote(c)  # noqa: E731
        pg_row = row_text(columns, types, PG_EXPR, in_t)
        # PostgreSQL reads the hex with a bit-string cast: the same 60 bits.
        pg_int = f"('x' || substr(md5({pg_row}), 1, 15))::bit(60)::bigint"
        expected = psql_script(
            f"CREATE TEMP TABLE touched ({key_types});\n"
            f"\\copy touched FROM '{keys_csv}' CSV\n"
            f"SELECT count(*), coalesce(sum({pg_int}), 0) FROM {quote(table)} t "
            f"JOIN touched USING ({key_list});\n"
        )[-1]
        expected = (int(expected[0]), int(expected[1]))
        got = (int(got[0]), int(got[1]))
        line = (
            f"{table}: {changed} keys changed, {touched} of them created in the run; "
            f"PostgreSQL {expected[0]} rows of those, lake {got[0]}"
        )
        if expected == got:
            print(f"{line}; hashes equal")
            return True
        print(f"{line}; DIFFERENT (hash {expected[1]} vs {got[1]})")
        # Which keys: each side's (key, row hash), compared here.
        key_text = row_text(keys, types, DUCK_EXPR)
        lake = collections.Counter(
            con.execute(
                f"SELECT {key_text}, md5({row_text(columns, types, DUCK_EXPR)}) FROM {mirror_rows}"
            ).fetchall()
        )
        pg_key_text = row_text(keys, types, PG_EXPR, in_t)
        pg = collections.Counter(
            tuple(r)
            for r in psql_script(
                f"CREATE TEMP TABLE touched ({key_types});\n"
                f"\\copy touched FROM '{keys_csv}' CSV\n"
                f"SELECT {pg_key_text}, md5({pg_row}) FROM {quote(table)} t JOIN touched USING ({key_list});\n"
            )
        )
        for k, h in list((pg - lake).keys())[:5]:
            print(f"  PostgreSQL has key {k!r} with row hash {h}; the lake does not")
        for k, h in list((lake - pg).keys())[:5]:
            print(f"  the lake has key {k!r} with row hash {h}; PostgreSQL does not")
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", required=True)
    p.add_argument("--tables", default="users,tweets,likes,follows")
    args = p.parse_args()
    con = duckdb_connect()
    con.execute("SET TimeZone = 'UTC'")
    ok = all([check(con, args.prefix, t) for t in args.tables.split(",")])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
