//! Mirrors of changelogs written through the sink's own commit path, in a
//! temporary directory, read back through the Delta log and the Parquet
//! files.

use std::collections::BTreeMap;

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, ListBuilder, StringArray, StringBuilder,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Int64Type};
use chrono::NaiveDate;
use deltalake::DeltaTableBuilder;

use super::*;
use crate::config::{LakeConfig, OutputConfig};
use crate::decode::marker::{MarkerRow, RecoveryMarker};
use crate::decode::schema::utc_micros;
use crate::lake::changelog::{Changelog, DataFile, PartitionWrite};
use crate::lake::files::writer_properties;
use crate::source::position::{Claim, Tp};

pub(crate) const TABLE: &str = "items";

/// One change: `(partition, id, op, note, unchanged note?)`.
pub(crate) type Change<'a> = (i32, i64, &'a str, &'a str, bool);

/// A change with its LSN and `_cdc_key_update`.
struct Row<'a> {
    change: Change<'a>,
    lsn: i64,
    key_update: Option<&'a str>,
}

pub(crate) struct Lake {
    _dir: Arc<tempfile::TempDir>,
    /// The table this writes and reads: [`TABLE`] but for [`Lake::other`].
    table: &'static str,
    config: LakeConfig,
    pub(crate) root: LakeRoot,
    changelog: Changelog,
    /// The last offset committed per partition.
    last: BTreeMap<i32, i64>,
    lsn: i64,
    /// The type of `id` in the rows committed: Int64 unless a test
    /// changes it (a key column's type change).
    id_type: DataType,
}

impl Lake {
    fn new() -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let url = url::Url::from_directory_path(dir.path()).unwrap();
        Lake::at(dir, url, LakeConfig::default())
    }

    /// A lake whose store counts its requests into `counters`.
    fn counted(counters: Arc<test_support::counted::Counters>) -> Lake {
        let dir = tempfile::tempdir().unwrap();
        let scheme = test_support::counted::counted_scheme("file", "mirror", counters).unwrap();
        let url = url::Url::parse(&format!("{scheme}://{}/", dir.path().display())).unwrap();
        // Checkpoints often: a table's load lists the log only from its
        // last checkpoint.
        let config = LakeConfig {
            checkpoint_interval: 5,
            ..LakeConfig::default()
        };
        Lake::at(dir, url, config)
    }

    pub(crate) fn at(dir: tempfile::TempDir, url: url::Url, config: LakeConfig) -> Lake {
        let root = LakeRoot::at(url, Default::default());
        let changelog = Changelog::new(
            root.clone(),
            "g",
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &config,
        );
        Lake {
            _dir: Arc::new(dir),
            table: TABLE,
            config,
            root,
            changelog,
            last: BTreeMap::new(),
            lsn: 1000,
            id_type: DataType::Int64,
        }
    }

    /// 20,000 notes in this table, a build of which goes by ranges under
    /// [`Lake::gated_mirror`]'s budget, and two rows in another table,
    /// whose writer and reader this returns.
    pub(crate) async fn with_another_table(&mut self) -> Lake {
        self.commit_notes(0..20_000).await;
        let mut other = self.other("others");
        let rows = [(0, 1, "c", "one", false), (1, 2, "c", "two", false)];
        other.commit(&rows, true).await;
        other
    }

    /// A mirror whose builds go by ranges of 256 KiB, each waiting at the
    /// gate before its commit.
    pub(crate) fn gated_mirror(&self) -> (Mirror, Arc<crate::lake::Gate>) {
        let gate = Arc::new(crate::lake::Gate::default());
        let mirror = self
            .mirror(256 << 10)
            .with_build_bytes(256 << 10)
            .with_build_gate(gate.clone());
        (mirror, gate)
    }

    /// A writer and reader of another table of the same lake (the
    /// [`Lake::commit`] and [`Lake::rows`] helpers).
    pub(crate) fn other(&self, table: &'static str) -> Lake {
        Lake {
            _dir: self._dir.clone(),
            table,
            config: self.config.clone(),
            root: self.root.clone(),
            changelog: Changelog::new(
                self.root.clone(),
                "g",
                FileWriter::new(writer_properties(&OutputConfig::default())),
                &self.config,
            ),
            last: BTreeMap::new(),
            lsn: 1000,
            id_type: DataType::Int64,
        }
    }

    pub(crate) fn mirror(&self, target_bytes: usize) -> Mirror {
        Mirror::new(
            self.root.clone(),
            FileWriter::new(writer_properties(&OutputConfig::default())),
            self.config.table_properties(),
            target_bytes,
        )
    }

    /// Commits `changes` to the changelog as one flush (one file per
    /// partition), keyed by `id` unless `keyed` is false. Each change gets
    /// the next LSN in the order given, but a create with an unchanged
    /// note, which is a primary-key update's: it shares the LSN of the
    /// delete given before it, as PostgreSQL's one WAL record makes them.
    pub(crate) async fn commit(&mut self, changes: &[Change<'_>], keyed: bool) {
        let mut last_delete = None;
        let mut rows = Vec::new();
        for c in changes {
            let lsn = match (c.2, c.4, last_delete) {
                ("c", true, Some(lsn)) => lsn,
                _ => {
                    self.lsn += 1;
                    self.lsn
                }
            };
            if c.2 == "d" {
                last_delete = Some(lsn);
            }
            rows.push(Row {
                change: *c,
                lsn,
                key_update: None,
            });
        }
        self.commit_rows(&rows, keyed).await;
    }

    /// Commits `rows` as [`Lake::commit`] does, with their own LSNs and,
    /// if any row has one, the `_cdc_key_update` column.
    async fn commit_rows(&mut self, rows: &[Row<'_>], keyed: bool) {
        let mut by_partition: BTreeMap<i32, Vec<&Row>> = BTreeMap::new();
        for r in rows {
            by_partition.entry(r.change.0).or_default().push(r);
        }
        let marked = rows.iter().any(|r| r.key_update.is_some());
        let mut writes = Vec::new();
        for (p, cs) in by_partition {
            let first = self.last.get(&p).map_or(0, |l| l + 1);
            let mut unchanged = ListBuilder::new(StringBuilder::new());
            let lsns: Vec<i64> = cs.iter().map(|r| r.lsn).collect();
            let marks: Vec<Option<&str>> = cs.iter().map(|r| r.key_update).collect();
            let cs: Vec<&Change> = cs.iter().map(|r| &r.change).collect();
            for c in &cs {
                if c.4 {
                    unchanged.values().append_value("note");
                }
                unchanged.append(true);
            }
            let n = cs.len();
            let offsets: Vec<i64> = (first..first + n as i64).collect();
            let mut fields = vec![
                Field::new("id", self.id_type.clone(), true),
                Field::new("note", DataType::Utf8, true),
                Field::new(meta::OP, DataType::Utf8, true),
                Field::new(meta::COMMIT_TS, utc_micros(), true),
                Field::new(meta::LSN, DataType::Int64, true),
                Field::new(meta::TX_ID, DataType::Int64, true),
                Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
                Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
                Field::new(
                    meta::UNCHANGED,
                    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                    true,
                ),
            ];
            let ids = Int64Array::from_iter_values(cs.iter().map(|c| c.1));
            let mut columns: Vec<ArrayRef> = vec![
                arrow::compute::cast(&ids, &self.id_type).unwrap(),
                Arc::new(StringArray::from_iter_values(cs.iter().map(|c| c.3))),
                Arc::new(StringArray::from_iter_values(cs.iter().map(|c| c.2))),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        lsns.iter().map(|l| 1_700_000_000_000_000 + l),
                    )
                    .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from(lsns.clone())),
                Arc::new(Int64Array::from(vec![7; n])),
                Arc::new(Int32Array::from(vec![p; n])),
                Arc::new(Int64Array::from(offsets.clone())),
                Arc::new(unchanged.finish()),
            ];
            if marked {
                fields.push(Field::new(meta::KEY_UPDATE, DataType::Utf8, true));
                columns.push(Arc::new(StringArray::from(marks)));
            }
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
            writes.push(PartitionWrite {
                tp: Tp::new(format!("db.{}", self.table), p),
                claim: Claim {
                    expected: self.last.get(&p).copied(),
                    last: *offsets.last().unwrap(),
                },
                files: vec![DataFile {
                    date: NaiveDate::from_ymd_opt(2026, 12, 4).unwrap(),
                    batch,
                    key: keyed.then(|| Arc::from(vec!["id".to_string()])),
                }],
            });
            self.last.insert(p, *offsets.last().unwrap());
        }
        let outcome = self.changelog.write(self.table, &writes).await.unwrap();
        assert!(outcome.fenced.is_empty());
    }

    /// Deletes the changelog and starts a new one in its place, as a user
    /// who captures the table afresh does.
    fn recreate_changelog(&mut self) {
        let dir = self.root.table_url(TABLE).to_file_path().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        self.changelog = Changelog::new(
            self.root.clone(),
            "g",
            FileWriter::new(writer_properties(&OutputConfig::default())),
            &self.config,
        );
        self.last.clear();
    }

    /// The mirror's batches, read through its Delta log (its own, not the
    /// writer's) and Parquet files.
    async fn mirror_batches(&self) -> Vec<RecordBatch> {
        let mut t =
            DeltaTableBuilder::from_url(self.root.table_url(&LakeRoot::mirror_of(self.table)))
                .unwrap()
                .build()
                .unwrap();
        t.load().await.unwrap();
        let store = t.log_store().object_store(None);
        let mut out = Vec::new();
        for f in t.snapshot().unwrap().log_data().iter() {
            let bytes = store
                .get(&f.object_store_path())
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            out.extend(ReadFile::read(f.path().to_string(), bytes).unwrap().batches);
        }
        out
    }

    /// [`Lake::rows`], or none while there is no mirror yet.
    pub(crate) async fn rows_if_any(&self) -> BTreeMap<i64, String> {
        if !table_exists(&self.root, &LakeRoot::mirror_of(self.table)).await {
            return BTreeMap::new();
        }
        self.rows().await
    }

    /// The mirror's rows as `id -> note`; panics on a key held twice.
    pub(crate) async fn rows(&self) -> BTreeMap<i64, String> {
        let mut out = BTreeMap::new();
        for b in self.mirror_batches().await {
            let ids = b.column_by_name("id").unwrap();
            let ids = arrow::compute::cast(ids, &DataType::Int64).unwrap();
            let ids = ids.as_primitive::<Int64Type>();
            let notes = b.column_by_name("note").unwrap();
            let notes = notes.as_string::<i32>();
            assert!(b.column_by_name(meta::OP).is_none(), "no change columns");
            assert!(b.column_by_name(meta::LSN).is_some());
            for i in 0..b.num_rows() {
                let dup = out.insert(ids.value(i), notes.value(i).to_string());
                assert!(dup.is_none(), "key {} twice", ids.value(i));
            }
        }
        out
    }

    /// Commits a recovery marker at the end of each of `partitions`, as
    /// the sink writes the guard's.
    async fn commit_markers(&mut self, marker: &RecoveryMarker, partitions: &[i32]) {
        let mut writes = Vec::new();
        for &p in partitions {
            let offset = self.last.get(&p).map_or(0, |l| l + 1);
            let row = MarkerRow {
                marker: marker.clone(),
                partition: p,
                offset,
            };
            writes.push(PartitionWrite {
                tp: Tp::new(format!("db.{TABLE}"), p),
                claim: Claim {
                    expected: self.last.get(&p).copied(),
                    last: offset,
                },
                files: vec![DataFile {
                    date: crate::decode::marker::date(marker),
                    batch: crate::decode::marker::batch(&[row]).unwrap(),
                    key: None,
                }],
            });
            self.last.insert(p, offset);
        }
        let outcome = self.changelog.write(TABLE, &writes).await.unwrap();
        assert!(outcome.fenced.is_empty());
    }

    /// Commits `likes` (`(user_id, tweet_id, op)`, keyed by both, in that
    /// order) as one flush of partition 0.
    async fn commit_likes(&mut self, likes: &[(i64, i64, &str)]) {
        self.commit_marked_likes(likes, None).await;
    }

    /// [`Lake::commit_likes`], every row marked as half of a primary-key
    /// update (`_cdc_key_update`) if `key_update` is given.
    async fn commit_marked_likes(&mut self, likes: &[(i64, i64, &str)], key_update: Option<&str>) {
        let first = self.last.get(&0).map_or(0, |l| l + 1);
        let n = likes.len() as i64;
        let offsets: Vec<i64> = (first..first + n).collect();
        let lsns: Vec<i64> = offsets.iter().map(|o| 1000 + o).collect();
        let mut fields = vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("tweet_id", DataType::Int64, true),
            Field::new(meta::OP, DataType::Utf8, true),
            Field::new(meta::LSN, DataType::Int64, true),
            Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
            Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(likes.iter().map(|l| l.0))),
            Arc::new(Int64Array::from_iter_values(likes.iter().map(|l| l.1))),
            Arc::new(StringArray::from_iter_values(likes.iter().map(|l| l.2))),
            Arc::new(Int64Array::from(lsns)),
            Arc::new(Int32Array::from(vec![0; likes.len()])),
            Arc::new(Int64Array::from(offsets.clone())),
        ];
        if let Some(mark) = key_update {
            fields.push(Field::new(meta::KEY_UPDATE, DataType::Utf8, true));
            columns.push(Arc::new(StringArray::from(vec![mark; likes.len()])));
        }
        let schema = Schema::new(fields);
        let write = PartitionWrite {
            tp: Tp::new(format!("db.{TABLE}"), 0),
            claim: Claim {
                expected: self.last.get(&0).copied(),
                last: *offsets.last().unwrap(),
            },
            files: vec![DataFile {
                date: NaiveDate::from_ymd_opt(2026, 12, 4).unwrap(),
                batch: RecordBatch::try_new(Arc::new(schema), columns).unwrap(),
                key: Some(Arc::from(vec![
                    "user_id".to_string(),
                    "tweet_id".to_string(),
                ])),
            }],
        };
        self.last.insert(0, *offsets.last().unwrap());
        let outcome = self.changelog.write(TABLE, &[write]).await.unwrap();
        assert!(outcome.fenced.is_empty());
    }

    /// The mirror's `(user_id, tweet_id)` keys; panics on a key held twice.
    async fn like_rows(&self) -> std::collections::BTreeSet<(i64, i64)> {
        let mut out = std::collections::BTreeSet::new();
        for b in self.mirror_batches().await {
            let users = b.column_by_name("user_id").unwrap();
            let tweets = b.column_by_name("tweet_id").unwrap();
            let (users, tweets) = (
                users.as_primitive::<Int64Type>(),
                tweets.as_primitive::<Int64Type>(),
            );
            for i in 0..b.num_rows() {
                let key = (users.value(i), tweets.value(i));
                assert!(out.insert(key), "key {key:?} twice");
            }
        }
        out
    }

    /// Commits `cdc.clusterBy` = `order` to the mirror's properties, as a
    /// writer that does not sort by it would leave them.
    async fn set_mirror_order(&self, order: &str) {
        let mut t = self.root.handle(&LakeRoot::mirror_of(TABLE)).unwrap();
        t.load().await.unwrap();
        let state = t.snapshot().unwrap().clone();
        let metadata = state
            .metadata()
            .clone()
            .add_config_key(order::ORDER_PROPERTY.to_string(), order.to_string())
            .unwrap();
        CommitBuilder::default()
            .with_actions(vec![Action::Metadata(metadata)])
            .build(
                Some(state.snapshot()),
                t.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )
            .await
            .unwrap();
    }

    async fn live_files(&self) -> usize {
        let mut t = self.root.handle(&LakeRoot::mirror_of(TABLE)).unwrap();
        t.load().await.unwrap();
        t.snapshot().unwrap().log_data().num_files()
    }
}

/// The `i`-th like of the `likes`-shaped tests: one of the 20 newest
/// tweets (`i / 10` is the newest), by a user spread over 5,000 (no pair
/// twice: a user's likes are 5,000 apart, 500 tweets).
fn like(i: i64) -> (i64, i64) {
    ((i * 7_919) % 5_000, i / 10 + (i * 13) % 20)
}

/// Likes `from..to`, as creates.
fn likes(from: i64, to: i64) -> Vec<(i64, i64, &'static str)> {
    (from..to).map(|i| (like(i).0, like(i).1, "c")).collect()
}

pub(crate) fn expect(rows: &[(i64, &str)]) -> BTreeMap<i64, String> {
    rows.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

const UNAVAILABLE: &str = crate::decode::UNAVAILABLE;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_holds_the_last_image_of_every_key_and_no_deleted_one() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(32 << 20);
    lake.commit(
        &[
            (0, 1, "c", "one", false),
            (0, 2, "c", "two", false),
            (1, 3, "c", "three", false),
            (0, 1, "u", "one'", false),
        ],
        true,
    )
    .await;
    // A new mirror applies the changelog's commits from version 0.
    let first = mirror.sync(TABLE, false).await.unwrap();
    assert!(!first.full && first.version.is_some(), "{first:?}");
    assert_eq!(
        lake.rows().await,
        expect(&[(1, "one'"), (2, "two"), (3, "three")])
    );

    // Two more flushes before the next sync: both applied, in order. An
    // unchanged TOASTed note is carried from the mirror's row; key 3
    // moves to key 4 (a primary-key update: a delete and a create, here
    // in different partitions).
    lake.commit(
        &[
            (0, 2, "u", UNAVAILABLE, true),
            (1, 3, "d", "three", false),
            (0, 4, "c", "four", false),
        ],
        true,
    )
    .await;
    lake.commit(
        &[
            (0, 1, "d", "one'", false),
            (0, 5, "c", "five", false),
            (0, 5, "u", UNAVAILABLE, true),
        ],
        true,
    )
    .await;
    let second = mirror.sync(TABLE, false).await.unwrap();
    assert!(!second.full, "{second:?}");
    assert_eq!(second.through, Some(3));
    let want = expect(&[(2, "two"), (4, "four"), (5, "five")]);
    assert_eq!(lake.rows().await, want);

    // Nothing new: nothing committed.
    let again = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(again.version, None);
    assert_eq!(again.through, Some(3));

    // A rebuild from the whole changelog ends the same.
    let rebuilt = mirror.sync(TABLE, true).await.unwrap();
    assert!(rebuilt.full);
    assert_eq!(lake.rows().await, want);
}

/// `ALTER TABLE items ALTER COLUMN id TYPE bigint`: the changelog keeps
/// the new changes' keys in `id__long` (files written since have no `id`).
/// The first sync after it builds the mirror anew with `id` as Int64
/// and no `id__long`; an update of a key written as Int32 replaces its
/// row, also from a partition before the create's (the key's bytes
/// changed with its type); later syncs go on incrementally; a build by
/// ranges ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_widened_by_its_table_keeps_its_rows_and_takes_the_new_type() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(32 << 20);
    lake.id_type = DataType::Int32;
    lake.commit(
        &[
            (0, 1, "c", "one", false),
            (0, 2, "c", "two", false),
            (1, 3, "c", "three", false),
        ],
        true,
    )
    .await;
    mirror.sync(TABLE, false).await.unwrap();
    let id_type = async |lake: &Lake| {
        let batches = lake.mirror_batches().await;
        assert!(
            batches
                .iter()
                .all(|b| b.column_by_name("id__long").is_none())
        );
        batches[0].column_by_name("id").unwrap().data_type().clone()
    };
    assert_eq!(id_type(&lake).await, DataType::Int32);

    lake.id_type = DataType::Int64;
    lake.commit(
        &[
            (0, 2, "u", "two'", false),
            (1, 3_000_000_000, "c", "big", false),
            (0, 1, "d", "one", false),
            // The key's new bytes chose another partition than its create's,
            // one Kafka order puts first.
            (0, 3, "u", "three*", false),
        ],
        true,
    )
    .await;
    let mut changelog = lake.root.handle(TABLE).unwrap();
    changelog.load().await.unwrap();
    let columns: Vec<String> = changelog
        .snapshot()
        .unwrap()
        .schema()
        .fields()
        .map(|f| f.name().clone())
        .collect();
    assert!(columns.contains(&"id__long".to_string()), "{columns:?}");

    let retyped = mirror.sync(TABLE, false).await.unwrap();
    assert!(retyped.full, "{retyped:?}");
    let want = expect(&[(2, "two'"), (3, "three*"), (3_000_000_000, "big")]);
    assert_eq!(lake.rows().await, want);
    assert_eq!(id_type(&lake).await, DataType::Int64);

    lake.commit(
        &[(1, 3, "u", "three'", false), (0, 2, "d", "two'", false)],
        true,
    )
    .await;
    let next = mirror.sync(TABLE, false).await.unwrap();
    assert!(!next.full, "{next:?}");
    let want = expect(&[(3, "three'"), (3_000_000_000, "big")]);
    assert_eq!(lake.rows().await, want);

    let ranged = lake.mirror(32 << 20).with_build_bytes(1);
    let rebuilt = ranged.sync(TABLE, true).await.unwrap();
    assert!(rebuilt.ranges > 1, "{rebuilt:?}");
    assert_eq!(lake.rows().await, want);
    assert_eq!(id_type(&lake).await, DataType::Int64);
}

/// A sync's requests do not grow with the mirror's history: its commit
/// does not list the whole `_delta_log` to clean up expired entries (as
/// delta-rs' commit does after every commit), only when it writes a
/// checkpoint, which is the only time an entry can expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_sync_lists_no_more_as_the_log_grows() {
    let counters = Arc::new(test_support::counted::Counters::default());
    let mut lake = Lake::counted(counters.clone());
    let mirror = lake.mirror(32 << 20);
    let mut listed = Vec::new();
    for id in 0..30 {
        counters.reset();
        lake.commit(&[(0, id, "c", "n", false)], true).await;
        mirror.sync(TABLE, false).await.unwrap();
        listed.push(counters.listed.load(std::sync::atomic::Ordering::Relaxed));
    }
    // Every fifth commit of each table checkpoints, and lists its whole
    // log to clean up; the others list what follows the last checkpoint.
    let median = |window: &[u64]| {
        let mut w = window.to_vec();
        w.sort();
        w[w.len() / 2]
    };
    let (early, late) = (median(&listed[10..15]), median(&listed[25..30]));
    assert!(
        late <= early + 3,
        "objects listed by each commit and sync: {listed:?}"
    );
}

/// A mirror far behind catches up a bounded batch of changelog commits at
/// a time (here one: a tiny budget), each sync saying whether more remain,
/// and ends where one sync of everything would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_far_behind_catches_up_in_bounded_batches() {
    let mut lake = Lake::new();
    lake.commit(
        &[(0, 1, "c", "one", false), (0, 2, "c", "two", false)],
        true,
    )
    .await;
    lake.commit(&[(0, 1, "u", "one'", false)], true).await;
    lake.commit(
        &[(0, 2, "d", "two", false), (0, 3, "c", "three", false)],
        true,
    )
    .await;
    let mirror = lake.mirror(1);
    let mut syncs = Vec::new();
    loop {
        let s = mirror.sync(TABLE, false).await.unwrap();
        syncs.push(s.through);
        if !s.behind {
            break;
        }
    }
    assert_eq!(syncs, [Some(1), Some(2), Some(3)], "one commit per sync");
    assert_eq!(lake.rows().await, expect(&[(1, "one'"), (3, "three")]));
}

/// `mirror.sync_max_bytes` sets how much one sync takes: the three
/// commits that files of one byte would take one at a time go in one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_far_behind_takes_up_to_sync_max_bytes_in_one_sync() {
    let mut lake = Lake::new();
    lake.commit(&[(0, 1, "c", "one", false)], true).await;
    lake.commit(&[(0, 1, "u", "one'", false)], true).await;
    lake.commit(&[(0, 2, "c", "two", false)], true).await;
    let mut cfg = crate::config::SinkConfig::default();
    cfg.mirror.target_file_bytes = 1;
    cfg.mirror.sync_max_bytes = Some(1 << 20);
    let mirror = Mirror::configured(lake.root.clone(), &cfg);
    let s = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(s.through, Some(3), "{s:?}");
    assert!(!s.behind, "{s:?}");
    assert_eq!(lake.rows().await, expect(&[(1, "one'"), (2, "two")]));
}

/// A changelog deleted and created again (to capture a table afresh, say)
/// is a new table whose versions start over: a mirror synced to the old
/// one is rebuilt from the new one, not taken for being at the new one's
/// version, whether the new one is short of the old one's version or past
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_deleted_and_created_again_is_mirrored_anew() {
    let mut lake = Lake::new();
    lake.commit(
        &[(0, 1, "c", "one", false), (0, 2, "c", "two", false)],
        true,
    )
    .await;
    lake.mirror(32 << 20).sync(TABLE, false).await.unwrap();
    assert_eq!(lake.rows().await, expect(&[(1, "one"), (2, "two")]));

    // Past the old one's version before the mirror looks (a sink
    // restarted on a lake whose changelog was replaced meanwhile).
    lake.recreate_changelog();
    lake.commit(&[(0, 7, "c", "seven", false)], true).await;
    lake.commit(&[(1, 8, "c", "eight", false)], true).await;
    lake.commit(&[(0, 7, "u", "seven'", false)], true).await;
    let s = lake.mirror(32 << 20).sync(TABLE, false).await.unwrap();
    assert!(s.full, "{s:?}");
    assert_eq!(s.through, Some(3));
    assert_eq!(lake.rows().await, expect(&[(7, "seven'"), (8, "eight")]));

    // Short of it, and seen by the same mirror that synced the old one.
    let mirror = lake.mirror(32 << 20);
    mirror.sync(TABLE, false).await.unwrap();
    lake.recreate_changelog();
    lake.commit(&[(2, 9, "c", "nine", false)], true).await;
    let s = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(s.through, Some(1), "{s:?}");
    assert_eq!(lake.rows().await, expect(&[(9, "nine")]));
    // How current it is: by the new changelog's partition alone, not
    // held back by the old one's partitions 0 and 1.
    assert_eq!(s.through_commit_us, Some(1_700_000_000_000_000 + lake.lsn));
    // And from there on, incrementally.
    lake.commit(&[(2, 10, "c", "ten", false)], true).await;
    let s = mirror.sync(TABLE, false).await.unwrap();
    assert!(!s.full, "{s:?}");
    assert_eq!(lake.rows().await, expect(&[(9, "nine"), (10, "ten")]));

    // Captured afresh in another shape: other columns, another key. The
    // mirror takes both; none of the old ones stay.
    lake.recreate_changelog();
    let rows = [(1, 1, "c", "x", false, 5001), (1, 2, "c", "y", false, 5002)];
    lake.commit_ab(&rows, Some(&["a", "b"])).await;
    let s = lake.mirror(32 << 20).sync(TABLE, false).await.unwrap();
    assert!(s.full, "{s:?}");
    let want = BTreeMap::from([((1, 1), "x".to_string()), ((1, 2), "y".to_string())]);
    assert_eq!(lake.ab_rows().await, want);
    let mut t = lake.root.handle(&LakeRoot::mirror_of(TABLE)).unwrap();
    t.load().await.unwrap();
    let state = t.snapshot().unwrap();
    assert_eq!(
        state.metadata().configuration()[KEY_PROPERTY],
        r#"["a","b"]"#
    );
    assert!(state.schema().field("id").is_none(), "{:?}", state.schema());
}

/// A sync rewrites only the files whose key range holds a changed key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_rewrite_only_the_files_that_hold_their_keys() {
    let mut lake = Lake::new();
    // Small files: a few thousand rows each. Notes that do not compress,
    // so that files are as large as their rows.
    let mirror = lake.mirror(256 << 10);
    let mut seed: u64 = 7;
    let notes: Vec<String> = (0..20_000)
        .map(|_| {
            (0..4)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    format!("{seed:016x}")
                })
                .collect()
        })
        .collect();
    let creates: Vec<Change> = (0..20_000)
        .map(|i| (0, i as i64, "c", notes[i].as_str(), false))
        .collect();
    lake.commit(&creates, true).await;
    mirror.sync(TABLE, false).await.unwrap();
    let files = lake.live_files().await;
    assert!(files > 4, "{files} files");

    lake.commit(
        &[(0, 17, "u", "changed", false), (0, 5, "d", "", false)],
        true,
    )
    .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(synced.files_removed, 1, "{synced:?}");
    let rows = lake.rows().await;
    assert_eq!(rows.len(), 19_999);
    assert_eq!(rows[&17], "changed");
    assert!(!rows.contains_key(&5));

    // A new key past the end goes to the last file (while it is small)
    // or a new one: one file written, at most the last one rewritten.
    lake.commit(&[(0, 50_000, "c", "new", false)], true).await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(
        synced.files_removed <= 1 && synced.files_added == 1,
        "{synced:?}"
    );
    assert_eq!(lake.rows().await.len(), 20_000);
}

/// `likes (user_id, tweet_id)`: likes of recent tweets by users from all
/// over. Clustered by time, the mirror sorts by `tweet_id` first, so a
/// batch of new likes and unlikes of recent ones rewrites only the last
/// files; in the key's own order the same batch rewrites every file, until
/// a rebuild clusters it by time.
#[tokio::test]
async fn a_composite_key_is_clustered_by_its_column_that_grows_with_time() {
    for clustering in [Clustering::Time, Clustering::Key] {
        let mut lake = Lake::new();
        let mirror = lake.mirror(256 << 10).with_clustering(clustering);
        lake.commit_likes(&likes(0, 80_000)).await;
        while mirror.sync(TABLE, false).await.unwrap().behind {}
        let files = lake.live_files().await;
        assert!(files >= 4, "{clustering:?}: {files} files");

        // 500 new likes, and unlikes of 20 of the last 1,000.
        let mut batch = likes(80_000, 80_500);
        batch.extend((0..20).map(|n| (like(79_000 + n * 50).0, like(79_000 + n * 50).1, "d")));
        lake.commit_likes(&batch).await;
        let synced = mirror.sync(TABLE, false).await.unwrap();
        match clustering {
            Clustering::Time => assert!(synced.files_removed <= 2, "{synced:?}"),
            Clustering::Key => assert_eq!(synced.files_removed, files, "{synced:?}"),
        }

        let want: std::collections::BTreeSet<(i64, i64)> = (0..80_500)
            .filter(|i| !(79_000..80_000).contains(i) || (i - 79_000) % 50 != 0)
            .map(like)
            .collect();
        assert_eq!(lake.like_rows().await, want, "{clustering:?}");
        if clustering == Clustering::Time {
            continue;
        }

        // A rebuild clusters a mirror of the key's order by time; later
        // syncs keep to it.
        let retimed = lake.mirror(256 << 10);
        assert!(retimed.sync(TABLE, true).await.unwrap().full);
        let more: Vec<(i64, i64, &str)> = (80_500..81_000)
            .map(|i| (like(i).0, like(i).1, "c"))
            .collect();
        lake.commit_likes(&more).await;
        let synced = retimed.sync(TABLE, false).await.unwrap();
        assert!(synced.files_removed <= 2, "{synced:?}");
        let want: std::collections::BTreeSet<(i64, i64)> =
            want.into_iter().chain((80_500..81_000).map(like)).collect();
        assert_eq!(lake.like_rows().await, want, "after the rebuild");
    }
}

/// A mirror whose order stays pending over a changelog too big to
/// rebuild it from (its first rows were few, and a big batch followed)
/// is not rebuilt, and its syncs do not bring the changelog's full
/// snapshot to the head to tell so, sync after sync (a load that parses
/// every live file's statistics): the snapshot as last loaded is too big
/// already, and a changelog only grows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_order_over_a_big_changelog_costs_a_sync_no_full_load() {
    let mut lake = Lake::new();
    // Syncs take a quarter of this: 2 KiB of changelog Parquet.
    let mirror = lake.mirror(8 << 10);
    lake.commit_likes(&likes(0, 10)).await;
    assert!(!mirror.sync(TABLE, false).await.unwrap().rechosen);
    lake.commit_likes(&likes(10, 400)).await;
    while mirror.sync(TABLE, false).await.unwrap().behind {}
    let mut t = lake.root.handle(&LakeRoot::mirror_of(TABLE)).unwrap();
    t.load().await.unwrap();
    assert!(order::pending(
        t.snapshot().unwrap().metadata().configuration()
    ));

    let loaded = async || {
        let slot = mirror.open.lock().unwrap()[TABLE].clone();
        let open = slot.lock().await;
        let head = open.as_ref().unwrap().changelog.as_ref().unwrap();
        (
            head.table_as_loaded().version().unwrap() as i64,
            head.version(),
        )
    };
    let (before, head_before) = loaded().await;
    for i in 400..410 {
        lake.commit_likes(&likes(i, i + 1)).await;
        let s = mirror.sync(TABLE, false).await.unwrap();
        assert!(!s.full && !s.rechosen, "{s:?}");
    }
    let (after, head) = loaded().await;
    assert_eq!(head, head_before + 10);
    assert_eq!(
        after, before,
        "the changelog's full snapshot was brought to the head"
    );
}

/// A mirror created from too few rows to tell its order (a table captured
/// empty, its first likes) keeps the key's order pending: while the
/// changelog is small each sync rebuilds it, and once there are enough
/// rows the order is chosen for good; syncs are incremental again.
#[tokio::test]
async fn a_mirror_created_from_few_rows_chooses_its_order_once_there_are_enough() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(256 << 10);
    let configuration = async |lake: &Lake| {
        let mut t = lake.root.handle(&LakeRoot::mirror_of(TABLE)).unwrap();
        t.load().await.unwrap();
        t.snapshot().unwrap().metadata().configuration().clone()
    };

    lake.commit_likes(&likes(0, 10)).await;
    let first = mirror.sync(TABLE, false).await.unwrap();
    assert!(!first.rechosen, "{first:?}");
    let c = configuration(&lake).await;
    assert_eq!(c[order::ORDER_PROPERTY], r#"["user_id","tweet_id"]"#);
    assert!(order::pending(&c), "{c:?}");

    lake.commit_likes(&likes(10, 50)).await;
    let second = mirror.sync(TABLE, false).await.unwrap();
    assert!(second.full && second.rechosen, "{second:?}");
    assert!(
        order::pending(&configuration(&lake).await),
        "50 rows: still too few"
    );

    lake.commit_likes(&likes(50, 2_000)).await;
    let third = mirror.sync(TABLE, false).await.unwrap();
    assert!(third.full && third.rechosen, "{third:?}");
    let c = configuration(&lake).await;
    assert_eq!(c[order::ORDER_PROPERTY], r#"["tweet_id","user_id"]"#);
    assert!(!order::pending(&c), "{c:?}");

    let (user, tweet) = like(1_500);
    lake.commit_likes(&[(user, tweet, "d"), (4_999, 500, "c")])
        .await;
    let fourth = mirror.sync(TABLE, false).await.unwrap();
    assert!(!fourth.full && !fourth.rechosen, "{fourth:?}");
    let want: std::collections::BTreeSet<(i64, i64)> = (0..2_000)
        .map(like)
        .filter(|k| *k != (user, tweet))
        .chain([(4_999, 500)])
        .collect();
    assert_eq!(lake.like_rows().await, want);
}

/// A mirror file sorted in another order than its table says (written by
/// a sink that does not know `cdc.clusterBy`) is not routed by: the sync
/// stops with an error that names the rebuild, and the rebuild mends it.
#[tokio::test]
async fn a_file_in_another_order_than_its_table_stops_the_sync() {
    let mut lake = Lake::new();
    lake.commit_likes(&likes(0, 2_000)).await;
    lake.mirror(256 << 10).sync(TABLE, false).await.unwrap();

    // The table now says key order; its file is sorted by time.
    lake.set_mirror_order(r#"["user_id","tweet_id"]"#).await;

    lake.commit_likes(&[(4_999, 500, "c")]).await;
    let mirror = lake.mirror(256 << 10);
    let e = mirror.sync(TABLE, false).await.unwrap_err();
    let message = format!("{:#}", anyhow::Error::from(e));
    assert!(message.contains("--rebuild"), "{message}");

    assert!(mirror.sync(TABLE, true).await.unwrap().full);
    let want: std::collections::BTreeSet<(i64, i64)> =
        (0..2_000).map(like).chain([(4_999, 500)]).collect();
    assert_eq!(lake.like_rows().await, want);
}

/// A pending mirror is rebuilt to choose its order again only while no
/// recovery or TRUNCATE is in it: a rebuild would take a recovery it has
/// reconciled as due again, and reconcile it at every sync.
#[tokio::test]
async fn a_pending_order_is_not_chosen_again_over_a_reconciled_recovery() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(256 << 10);
    lake.commit_likes(&likes(0, 10)).await;
    mirror.sync(TABLE, false).await.unwrap();
    let marker = RecoveryMarker {
        id: "slot@1".into(),
        slot: "slot".into(),
        slot_start_lsn: 0,
        slot_start_ms: 1_764_979_100_000,
        partitions: 1,
        completed_at_ms: 1_764_979_200_000,
    };
    lake.commit_markers(&marker, &[0]).await;
    let recovered = mirror.sync(TABLE, false).await.unwrap();
    assert!(recovered.reconciled.is_some(), "{recovered:?}");

    lake.commit_likes(&likes(10, 20)).await;
    let next = mirror.sync(TABLE, false).await.unwrap();
    assert!(!next.rechosen && next.reconciled.is_none(), "{next:?}");
    let want: std::collections::BTreeSet<(i64, i64)> = (0..20).map(like).collect();
    assert_eq!(lake.like_rows().await, want);
}

/// A pending mirror is not rebuilt while its changelog ends in half of a
/// primary-key update: a rebuild would apply it alone, where a sync waits
/// for the other half.
#[tokio::test]
async fn a_pending_order_is_not_chosen_again_over_half_a_key_update() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(256 << 10);
    lake.commit_likes(&likes(0, 10)).await;
    mirror.sync(TABLE, false).await.unwrap();
    let (user, tweet) = like(3);
    lake.commit_marked_likes(&[(user, tweet, "d")], Some(r#"{"user_id":1,"tweet_id":1}"#))
        .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(synced.waiting && !synced.rechosen, "{synced:?}");
    assert!(
        lake.like_rows().await.contains(&(user, tweet)),
        "not applied alone"
    );
}

/// A rebuild writes the order it chose over whatever the table said, even
/// a list that is not an order of the key's columns.
#[tokio::test]
async fn a_rebuild_writes_its_order_over_any_other() {
    let mut lake = Lake::new();
    lake.commit_likes(&likes(0, 2_000)).await;
    lake.mirror(256 << 10).sync(TABLE, false).await.unwrap();
    lake.set_mirror_order(r#"["tweet_id"]"#).await;

    assert!(lake.mirror(256 << 10).sync(TABLE, true).await.unwrap().full);
    lake.commit_likes(&[(4_999, 500, "c")]).await;
    let fresh = lake.mirror(256 << 10).sync(TABLE, false).await.unwrap();
    assert!(!fresh.full, "{fresh:?}");
    let want: std::collections::BTreeSet<(i64, i64)> =
        (0..2_000).map(like).chain([(4_999, 500)]).collect();
    assert_eq!(lake.like_rows().await, want);
}

/// A primary-key update (a delete of the old key and a create of the new
/// one, sharing an LSN) carries its unchanged TOASTed value from the old
/// key's image: its current-state row, in another file; a change of it in
/// the same sync; through a chain of key updates and a later update of the
/// new key; with the two halves in either partition order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_update_carries_unchanged_values_from_the_old_key() {
    let mut lake = Lake::new();
    // A row or so per file: the old and new keys' rows are in different
    // files.
    let mirror = lake.mirror(1);
    lake.commit(
        &[
            (0, 1, "c", "one", false),
            (1, 2, "c", "two", false),
            (0, 3, "c", "three", false),
            (1, 4, "c", "four", false),
            (0, 5, "c", "five", false),
        ],
        true,
    )
    .await;
    mirror.sync(TABLE, false).await.unwrap();
    const T: &str = "__debezium_unavailable_value";
    lake.commit(
        &[
            // The delete in the first partition, the create in the second.
            (0, 1, "d", "", false),
            (1, 100, "c", T, true),
            // The create in the first partition, read before its delete.
            (1, 2, "d", "", false),
            (0, 200, "c", T, true),
            // 3 to 300 to 3000, then 3000 updated with the note unchanged.
            (0, 3, "d", "", false),
            (0, 300, "c", T, true),
            (0, 300, "d", "", false),
            (1, 3000, "c", T, true),
            (1, 3000, "u", T, true),
            // Updated, then its key: the update's value.
            (0, 4, "u", "four'", false),
            (0, 4, "d", "", false),
            (1, 400, "c", T, true),
        ],
        true,
    )
    .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(synced.unavailable, 0, "{synced:?}");
    assert_eq!(
        lake.rows().await,
        expect(&[
            (5, "five"),
            (100, "one"),
            (200, "two"),
            (400, "four'"),
            (3000, "three")
        ])
    );

    // The old key's delete applied by an earlier sync: no image left, the
    // change's own value stays and the sync says so.
    lake.commit(&[(0, 5, "d", "", false)], true).await;
    mirror.sync(TABLE, false).await.unwrap();
    lake.commit(&[(1, 500, "c", T, true)], true).await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(synced.unavailable, 1, "{synced:?}");
    assert_eq!(lake.rows().await[&500], T);
}

/// The halves of a primary-key update committed to the changelog apart
/// (two partitions, cut by a flush): a sync applies neither until both are
/// in, so the create still finds the old key's row; the versions before
/// the first half go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_holds_back_half_of_a_key_update_until_the_other_half_is_committed() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(1);
    lake.commit(
        &[(0, 1, "c", "one", false), (1, 2, "c", "two", false)],
        true,
    )
    .await;
    mirror.sync(TABLE, false).await.unwrap();
    const T: &str = "__debezium_unavailable_value";
    let half = |change, lsn, key| Row {
        change,
        lsn,
        key_update: Some(key),
    };
    // The delete first, alone; an ordinary update before it goes ahead.
    lake.commit(&[(1, 2, "u", "two'", false)], true).await;
    lake.commit_rows(&[half((0, 1, "d", "", false), 500, r#"{"id":100}"#)], true)
        .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(!synced.waiting && synced.behind, "{synced:?}");
    assert_eq!(lake.rows().await, expect(&[(1, "one"), (2, "two'")]));
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(synced.waiting, "{synced:?}");
    assert_eq!(lake.rows().await, expect(&[(1, "one"), (2, "two'")]));
    // Then its create, another key's delete and their create.
    lake.commit_rows(
        &[
            half((1, 100, "c", T, true), 500, r#"{"id":1}"#),
            half((1, 2, "d", "", false), 501, r#"{"id":200}"#),
        ],
        true,
    )
    .await;
    lake.commit_rows(&[half((0, 200, "c", T, true), 501, r#"{"id":2}"#)], true)
        .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(!synced.waiting && !synced.behind, "{synced:?}");
    assert_eq!(synced.unavailable, 0);
    assert_eq!(lake.rows().await, expect(&[(100, "one"), (200, "two'")]));
}

/// A TRUNCATE empties the mirror of every row last changed before it,
/// keeps what came after, and skips an older change that reaches the
/// changelog later (from another partition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_removes_every_row_before_it_and_only_those() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(1);
    lake.commit(
        &[
            (0, 1, "c", "one", false),
            (1, 2, "c", "two", false),
            (0, 3, "c", "three", false),
        ],
        true,
    )
    .await;
    mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(lake.rows().await.len(), 3);
    lake.commit(
        &[
            (1, 4, "c", "four", false),
            (0, 0, "t", "", false),
            (0, 5, "c", "five", false),
            (0, 3, "c", "three again", false),
        ],
        true,
    )
    .await;
    let truncate_lsn = lake.lsn - 2;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(synced.reconciled.is_some(), "{synced:?}");
    assert_eq!(
        lake.rows().await,
        expect(&[(3, "three again"), (5, "five")])
    );
    // A change made before the TRUNCATE, committed by another partition's
    // flush only now: it stays gone.
    lake.commit_rows(
        &[Row {
            change: (1, 6, "c", "six", false),
            lsn: truncate_lsn - 1,
            key_update: None,
        }],
        true,
    )
    .await;
    lake.commit(&[(1, 5, "u", "five'", false)], true).await;
    while mirror.sync(TABLE, false).await.unwrap().behind {}
    assert_eq!(
        lake.rows().await,
        expect(&[(3, "three again"), (5, "five'")])
    );
    // Built again from the whole changelog: the same.
    mirror.sync(TABLE, true).await.unwrap();
    assert_eq!(
        lake.rows().await,
        expect(&[(3, "three again"), (5, "five'")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key_gets_no_mirror() {
    let mut lake = Lake::new();
    lake.commit(&[(0, 1, "c", "one", false)], false).await;
    let synced = lake.mirror(32 << 20).sync(TABLE, false).await.unwrap();
    assert!(synced.no_key);
    assert!(
        lake.root.mirror_tables().await.unwrap().is_empty(),
        "nothing created"
    );
}

/// Two writers of one mirror (two sinks of a group) sync it at once, from
/// before it exists: whichever loses the create or a commit says so and
/// syncs again; neither fails, and the mirror ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_mirror_end_exact() {
    let mut lake = Lake::new();
    let a = lake.mirror(32 << 20);
    let b = lake.mirror(32 << 20);
    for round in 0..5i64 {
        let base = round * 10;
        let changes: Vec<Change> = (0..10)
            .map(|i| (0, base + i, "c", "x", false))
            .chain([(0, base, "d", "x", false)])
            .collect();
        lake.commit(&changes, true).await;
        let (ra, rb) = tokio::join!(a.sync(TABLE, false), b.sync(TABLE, false));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        // At most one of them lost; the loser catches up on its next sync.
        assert!(!(ra.conflict && rb.conflict), "{ra:?} {rb:?}");
        for m in [&a, &b] {
            let again = m.sync(TABLE, false).await.unwrap();
            assert!(!again.conflict && !again.behind, "{again:?}");
        }
    }
    let want: BTreeMap<i64, String> = (0..50)
        .filter(|i| i % 10 != 0)
        .map(|i| (i, "x".to_string()))
        .collect();
    assert_eq!(lake.rows().await, want);
}

/// A sync that finds the changelog created but holding no data file yet
/// (its first flush not committed: a sink killed before it) learns nothing
/// about the key; once the data lands, one sync makes the mirror.
#[tokio::test]
async fn a_changelog_with_no_data_yet_is_not_taken_for_one_without_a_key() {
    let mut lake = Lake::new();
    let changelog = lake.root.handle(TABLE).unwrap();
    let schema: StructType = (&Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new(meta::DATE, DataType::Date32, true),
    ]))
        .try_into_kernel()
        .unwrap();
    create_table(
        &changelog,
        TABLE,
        &schema,
        &[meta::DATE],
        std::iter::empty(),
    )
    .await
    .unwrap();
    let mirror = lake.mirror(32 << 20);
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(!synced.no_key, "{synced:?}");
    lake.commit(
        &[(0, 1, "c", "one", false), (1, 2, "c", "two", false)],
        true,
    )
    .await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    assert!(!synced.no_key && !synced.behind, "{synced:?}");
    assert_eq!(
        lake.rows().await,
        BTreeMap::from([(1, "one".to_string()), (2, "two".to_string())])
    );
}

/// After a lost slot: keys deleted while it was lost (2 and 4) are still
/// in the mirror until the recovery's markers from every partition are
/// applied; then they go, in one commit of their own, once. The
/// snapshot's rows and a key re-created in the gap stay; a rebuild from
/// the changelog ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_removes_the_rows_deleted_while_the_slot_was_lost() {
    let mut lake = Lake::new();
    let mirror = lake.mirror(32 << 20);
    let before: Vec<Change> = (1..=6)
        .map(|id| ((id % 2) as i32, id, "c", "old", false))
        .collect();
    lake.commit(&before, true).await;
    mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(lake.rows().await.len(), 6);

    // The slot is lost; 2 and 4 are deleted and 5 deleted and re-created
    // in the gap. The new slot starts past every change delivered.
    lake.lsn += 100;
    let marker = RecoveryMarker {
        id: "slot@1".into(),
        slot: "slot".into(),
        slot_start_lsn: lake.lsn,
        slot_start_ms: 1_764_979_100_000,
        partitions: 2,
        completed_at_ms: 1_764_979_200_000,
    };
    // The snapshot (`r`, past the slot's start) and a change streamed
    // after it.
    lake.commit(
        &[
            (1, 1, "r", "old", false),
            (1, 3, "r", "old", false),
            (1, 5, "r", "new", false),
            (0, 6, "r", "old", false),
            (0, 6, "u", "six", false),
        ],
        true,
    )
    .await;
    lake.commit_markers(&marker, &[0]).await;
    let partial = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!(partial.reconciled, None, "one partition's marker: not yet");
    assert!(lake.rows().await.contains_key(&2));

    lake.commit_markers(&marker, &[1]).await;
    let synced = mirror.sync(TABLE, false).await.unwrap();
    let reconciled = synced
        .reconciled
        .clone()
        .unwrap_or_else(|| panic!("not reconciled: {synced:?} {partial:?}"));
    assert_eq!(
        (reconciled.id.as_str(), reconciled.rows_removed),
        ("slot@1", 2)
    );
    let want = expect(&[(1, "old"), (3, "old"), (5, "new"), (6, "six")]);
    assert_eq!(lake.rows().await, want);

    // Once: the next sync finds it done.
    let again = mirror.sync(TABLE, false).await.unwrap();
    assert_eq!((again.version, again.reconciled), (None, None));
    // A new writer (another process) reads the state from the log.
    let other = lake.mirror(32 << 20);
    assert_eq!(other.sync(TABLE, false).await.unwrap().reconciled, None);
    // From the whole changelog: the markers are in it, so is the result.
    let rebuilt = mirror.sync(TABLE, true).await.unwrap();
    assert!(rebuilt.full && rebuilt.reconciled.is_some(), "{rebuilt:?}");
    assert_eq!(lake.rows().await, want);
}

/// A rebuild whose changelog outgrows `build_bytes` builds by ranges of
/// the key, and ends with the rows a build at once ends with: updates
/// that carry an unchanged note, deletes, a TRUNCATE, and primary-key
/// updates that move a row, with its carried note, into another range,
/// one of them with its delete unmarked (a lake from before
/// `_cdc_key_update`) and another chained on it. Its files keep disjoint
/// key ranges, so later changes route to them as to any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_by_ranges_ends_with_the_rows_of_a_build_at_once() {
    let mut lake = Lake::new();
    // Gone with the TRUNCATE after them.
    lake.commit_notes(20_000..25_000).await;
    lake.commit(&[(0, 0, "t", "", false)], true).await;
    lake.commit_notes(0..20_000).await;
    let mut changes: Vec<Change> = vec![
        (1, 3, "u", "three", false),
        (1, 7, "u", "", true),
        (0, 10_500, "d", "", false),
    ];
    changes.extend((100..200).map(|i| (i % 2, i as i64, "d", "", false)));
    lake.commit(&changes, true).await;
    // 3 becomes 30,000 (last range), unmarked: its create carries "three".
    lake.commit(&[(1, 3, "d", "", false), (0, 30_000, "c", "", true)], true)
        .await;
    // 30,000 becomes 10,500 (a middle range), marked.
    lake.lsn += 1;
    let lsn = lake.lsn;
    lake.commit_rows(
        &[
            Row {
                change: (0, 10_500, "c", "", true),
                lsn,
                key_update: Some(r#"{"id":30000}"#),
            },
            Row {
                change: (1, 30_000, "d", "", false),
                lsn,
                key_update: Some(r#"{"id":10500}"#),
            },
        ],
        true,
    )
    .await;

    let once = lake.mirror(256 << 10);
    let synced = once.sync(TABLE, true).await.unwrap();
    assert_eq!((synced.full, synced.ranges), (true, 0), "{synced:?}");
    let want = lake.rows().await;
    assert_eq!(want.len(), 20_000 - 101, "3 moved to 10,500, 101 deleted");
    assert_eq!(want[&10_500], "three", "carried through two key updates");
    assert_eq!(want[&7], "note 7");
    assert!(!want.contains_key(&3) && !want.contains_key(&30_000));

    let ranged = lake.mirror(256 << 10).with_build_bytes(256 << 10);
    let synced = ranged.sync(TABLE, true).await.unwrap();
    assert!(synced.full && synced.ranges >= 4, "{synced:?}");
    assert_eq!(synced.unavailable, 0, "{synced:?}");
    assert_eq!(lake.rows().await, want);

    lake.commit(
        &[
            (1, 11_001, "u", "changed", false),
            (0, 50_000, "c", "new", false),
            (1, 5_001, "d", "", false),
        ],
        true,
    )
    .await;
    let synced = ranged.sync(TABLE, false).await.unwrap();
    assert!(!synced.full && synced.files_removed <= 3, "{synced:?}");
    let mut want = want;
    want.insert(11_001, "changed".into());
    want.insert(50_000, "new".into());
    want.remove(&5_001);
    assert_eq!(lake.rows().await, want);
}

/// A row of the `(a, b, note)` tests: `(a, b, op, note, unchanged note?,
/// lsn)`.
type Ab<'a> = (i64, i64, &'a str, &'a str, bool, i64);

impl Lake {
    /// Commits `rows` of a table `(a, b, note)` to partition 0, the footer
    /// naming `key` as the primary key (none: a file from before footers).
    async fn commit_ab(&mut self, rows: &[Ab<'_>], key: Option<&[&str]>) {
        let first = self.last.get(&0).map_or(0, |l| l + 1);
        let offsets: Vec<i64> = (first..first + rows.len() as i64).collect();
        let mut unchanged = ListBuilder::new(StringBuilder::new());
        for r in rows {
            if r.4 {
                unchanged.values().append_value("note");
            }
            unchanged.append(true);
        }
        let fields = vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Int64, true),
            Field::new("note", DataType::Utf8, true),
            Field::new(meta::OP, DataType::Utf8, true),
            Field::new(meta::LSN, DataType::Int64, true),
            Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
            Field::new(meta::KAFKA_OFFSET, DataType::Int64, true),
            Field::new(
                meta::UNCHANGED,
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ];
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.5))),
            Arc::new(Int32Array::from(vec![0; rows.len()])),
            Arc::new(Int64Array::from(offsets.clone())),
            Arc::new(unchanged.finish()),
        ];
        let write = PartitionWrite {
            tp: Tp::new(format!("db.{TABLE}"), 0),
            claim: Claim {
                expected: self.last.get(&0).copied(),
                last: *offsets.last().unwrap(),
            },
            files: vec![DataFile {
                date: NaiveDate::from_ymd_opt(2026, 12, 4).unwrap(),
                batch: RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap(),
                key: key.map(|k| Arc::from(k.iter().map(|s| s.to_string()).collect::<Vec<_>>())),
            }],
        };
        self.last.insert(0, *offsets.last().unwrap());
        let outcome = self.changelog.write(TABLE, &[write]).await.unwrap();
        assert!(outcome.fenced.is_empty());
    }

    /// Creates of `ids` noted `note <id>`, over two partitions (odd ids
    /// in 1), 2,500 to a commit.
    pub(crate) async fn commit_notes(&mut self, ids: std::ops::Range<i64>) {
        let notes: Vec<(i64, String)> = ids.map(|i| (i, format!("note {i}"))).collect();
        for chunk in notes.chunks(2_500) {
            let creates: Vec<Change> = chunk
                .iter()
                .map(|(i, note)| ((i % 2) as i32, *i, "c", note.as_str(), false))
                .collect();
            self.commit(&creates, true).await;
        }
    }

    /// The mirror's rows of the `(a, b, note)` tests; panics on a key held
    /// twice.
    async fn ab_rows(&self) -> BTreeMap<(i64, i64), String> {
        let mut out = BTreeMap::new();
        for batch in self.mirror_batches().await {
            let a = batch.column_by_name("a").unwrap();
            let b = batch.column_by_name("b").unwrap();
            let note = batch.column_by_name("note").unwrap();
            let (a, b, note) = (
                a.as_primitive::<Int64Type>(),
                b.as_primitive::<Int64Type>(),
                note.as_string::<i32>(),
            );
            for i in 0..batch.num_rows() {
                let value = if note.is_valid(i) {
                    note.value(i)
                } else {
                    "NULL"
                };
                let dup = out.insert((a.value(i), b.value(i)), value.to_string());
                assert!(dup.is_none(), "({}, {}) twice", a.value(i), b.value(i));
            }
        }
        out
    }
}

/// The Delta log lists live files newest first, and a compaction rewrites
/// old rows into a new file: a build from the whole changelog takes the
/// key named by the file that holds the newest change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_build_takes_the_key_of_the_file_with_the_newest_change() {
    let mut lake = Lake::new();
    lake.commit_ab(&[(10, 0, "c", "old", false, 1001)], Some(&["a"]))
        .await;
    lake.commit_ab(&[(10, 1, "c", "new", false, 1002)], Some(&["a", "b"]))
        .await;
    lake.mirror(256 << 10).sync(TABLE, true).await.unwrap();
    assert_eq!(
        lake.ab_rows().await.into_keys().collect::<Vec<_>>(),
        [(10, 0), (10, 1)],
        "keyed by (a, b)"
    );
}

/// A key that gained a column (`a` to `a, b`), and a primary-key update
/// in files of the old key (or of none, from before footers): built by
/// ranges of the new key, its halves are paired by the new key's columns,
/// and the moved row keeps its note, as in a build at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_under_an_older_key_keeps_its_note_by_ranges() {
    for old_key in [Some(&["a"][..]), None] {
        let mut lake = Lake::new();
        let notes: Vec<String> = (0..5_000).map(|i| format!("note {i}")).collect();
        let mut lsn = 1000;
        for chunk in (0..5_000).step_by(500) {
            let rows: Vec<Ab> = (chunk..chunk + 500)
                .map(|i| {
                    lsn += 1;
                    (i as i64, 0, "c", notes[i].as_str(), false, lsn)
                })
                .collect();
            lake.commit_ab(&rows, Some(&["a", "b"])).await;
        }
        lake.commit_ab(
            &[
                (3, 0, "d", "", false, lsn + 1),
                (1_004_000, 0, "c", "", true, lsn + 1),
            ],
            old_key,
        )
        .await;
        lake.commit_ab(&[(10, 1, "c", "new", false, lsn + 2)], old_key)
            .await;

        let once = lake.mirror(256 << 10).with_clustering(Clustering::Key);
        assert_eq!(once.sync(TABLE, true).await.unwrap().ranges, 0);
        let want = lake.ab_rows().await;
        assert_eq!(want[&(1_004_000, 0)], "note 3", "{old_key:?}: at once");
        let ranged = lake
            .mirror(256 << 10)
            .with_clustering(Clustering::Key)
            .with_build_bytes(128 << 10);
        let synced = ranged.sync(TABLE, true).await.unwrap();
        assert!(synced.ranges > 1, "{synced:?}");
        assert_eq!(synced.unavailable, 0, "{old_key:?}: {synced:?}");
        assert_eq!(lake.ab_rows().await, want, "{old_key:?}: by ranges");
    }
}

/// A create whose unchanged note has no image (its delete never reached
/// the changelog) is counted once by ranges, though the range its key
/// moves to next reads its history too; and a key update a TRUNCATE
/// removed is not counted at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_values_are_counted_once_by_ranges_and_not_past_a_truncate() {
    let mut lake = Lake::new();
    lake.commit(&[(0, 20_002, "c", "two", false)], true).await;
    lake.commit(
        &[(0, 20_002, "d", "", false), (0, 20_004, "c", "", true)],
        true,
    )
    .await;
    lake.commit(&[(0, 0, "t", "", false)], true).await;
    lake.commit_notes(0..20_000).await;
    // 30,000 appears by a key update without its delete, then moves to 5.
    lake.commit(&[(0, 30_000, "c", "", true)], true).await;
    lake.commit(&[(0, 30_000, "d", "", false), (1, 5, "c", "", true)], true)
        .await;
    let once = lake.mirror(256 << 10).sync(TABLE, true).await.unwrap();
    assert_eq!(once.unavailable, 1, "{once:?}");
    let want = lake.rows().await;
    let ranged = lake.mirror(256 << 10).with_build_bytes(256 << 10);
    let synced = ranged.sync(TABLE, true).await.unwrap();
    assert!(synced.ranges > 1, "{synced:?}");
    assert_eq!(synced.unavailable, 1, "{synced:?}");
    assert_eq!(lake.rows().await, want);
}

/// A build by ranges takes minutes on a big table: a commit to the mirror
/// meanwhile that changes none of its files and not its `txn` (upkeep's
/// vacuum; here a property) does not cost it the build, which commits on
/// top of it. A new table is created only once every file is put: no
/// reader sees it empty meanwhile. And a build that took longer than half
/// the vacuum retention is not committed: a vacuum could have deleted the
/// files it put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_by_ranges_commits_over_a_commit_that_changed_nothing_it_replaces() {
    let mut lake = Lake::new();
    lake.commit_notes(0..20_000).await;
    let (ranged, gate) = lake.gated_mirror();
    let ranged = Arc::new(ranged);
    let build = tokio::spawn({
        let ranged = ranged.clone();
        async move { ranged.sync(TABLE, true).await }
    });
    gate.reached.notified().await;
    assert!(
        !table_exists(&lake.root, &LakeRoot::mirror_of(TABLE)).await,
        "a new table waits for its files"
    );
    gate.proceed.notify_one();
    let synced = build.await.unwrap().unwrap();
    assert!(synced.ranges > 1 && !synced.conflict, "{synced:?}");
    let want = lake.rows().await;
    assert_eq!(want.len(), 20_000);

    let build = tokio::spawn({
        let ranged = ranged.clone();
        async move { ranged.sync(TABLE, true).await }
    });
    gate.reached.notified().await;
    lake.set_mirror_order(r#"["id"]"#).await;
    gate.proceed.notify_one();
    let synced = build.await.unwrap().unwrap();
    assert!(synced.ranges > 1 && !synced.conflict, "{synced:?}");
    assert_eq!(lake.rows().await, want);

    let slow = lake
        .mirror(256 << 10)
        .with_build_bytes(256 << 10)
        .with_vacuum_retention(std::time::Duration::ZERO);
    let err = slow.sync(TABLE, true).await.unwrap_err();
    assert!(matches!(err, MirrorError::BuildTooLong { .. }), "{err}");
    assert_eq!(lake.rows().await, want, "not committed");
}

/// A table's build from its whole changelog (minutes on a big table)
/// holds only its own table: another table's mirror syncs meanwhile. It
/// holds the one turn to build, so builds take turns (each may take
/// `build_bytes` of memory): another build meanwhile waits for its turn
/// without holding its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_holds_no_other_tables_sync_and_builds_take_turns() {
    let mut lake = Lake::new();
    let other = lake.with_another_table().await;
    let (mirror, gate) = lake.gated_mirror();
    let mirror = Arc::new(mirror);
    let build = tokio::spawn({
        let mirror = mirror.clone();
        async move { mirror.sync(TABLE, true).await }
    });
    gate.reached.notified().await;
    // The build of `items` waits at its gate: `others` syncs, incrementally.
    let wait = std::time::Duration::from_secs(60);
    let synced = tokio::time::timeout(wait, mirror.sync("others", false))
        .await
        .expect("the other table's sync waited for the build")
        .unwrap();
    assert!(!synced.full, "{synced:?}");
    assert_eq!(other.rows().await, expect(&[(1, "one"), (2, "two")]));
    // It holds the one turn to build: a build of `others` meanwhile
    // applies nothing and says so (its caller tries again shortly).
    let second = mirror.sync("others", true).await.unwrap();
    assert!(
        second.awaits_build && second.version.is_none(),
        "{second:?}"
    );
    gate.proceed.notify_one();
    assert!(build.await.unwrap().unwrap().ranges > 1);
    let second = mirror.sync("others", true).await.unwrap();
    assert!(second.full && !second.awaits_build, "{second:?}");
    assert_eq!(lake.rows().await.len(), 20_000);
    assert_eq!(other.rows().await, expect(&[(1, "one"), (2, "two")]));
}

/// Whether a Delta table is at `table` under `root`.
async fn table_exists(root: &LakeRoot, table: &str) -> bool {
    root.handle(table).unwrap().load().await.is_ok()
}

/// A sync takes the changelog files it applies, and the mirror file it
/// rewrites, from memory when this process just put them
/// ([`crate::lake::files::Recent`]): fewer GETs than the same sync with them
/// forgotten, and the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_just_put_are_taken_from_memory_not_read_again() {
    let mut gets = Vec::new();
    for keeping in [false, true] {
        let counters = Arc::new(test_support::counted::Counters::default());
        let lake = Lake::counted(counters.clone());
        let mirror = lake.mirror(32 << 20);
        let mut lake = Lake {
            changelog: lake.changelog.keeping_files_in(mirror.recent()),
            ..lake
        };
        lake.commit(
            &[(0, 1, "c", "one", false), (0, 2, "c", "two", false)],
            true,
        )
        .await;
        mirror.sync(TABLE, false).await.unwrap();
        lake.commit(
            &[(0, 2, "u", "TWO", false), (0, 3, "c", "three", false)],
            true,
        )
        .await;
        if !keeping {
            mirror.forget_kept();
        }
        counters.reset();
        mirror.sync(TABLE, false).await.unwrap();
        gets.push(counters.gets.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(
            lake.rows().await,
            expect(&[(1, "one"), (2, "TWO"), (3, "three")])
        );
    }
    // Two objects fewer: the changelog file and the mirror file.
    assert!(
        gets[1] + 2 <= gets[0],
        "GETs forgotten, then kept: {gets:?}"
    );
}
