//! One Delta table as the sink knows it: where it lives, opening and
//! creating it, the schema its files must fit, and the `txn` versions that
//! record how far each Kafka partition has landed in it.
//!
//! Every writer of the lake (the changelog today, the current-state tables
//! next) and upkeep open tables through [`LakeRoot`]. [`Tables`] is a
//! writer's cache of open tables: one slot per table, whose lock is held
//! across a commit, so two commits of one process to one table never race
//! each other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, MetadataExt, Protocol, StructField, StructType};
use deltalake::logstore::{LogStore, ObjectStoreRef};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::config::TablePropertiesExt;
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use url::Url;

use crate::config::S3Config;
use crate::decode::schema::meta;
use crate::lake::LakeError;
use crate::lake::head::LogHead;

/// Not a table: where the sink keeps messages it could not read.
pub const QUARANTINE_DIR: &str = "_quarantine";

/// Where the current-state tables live: `<root>/_current/<table>/`, beside
/// the changelogs at `<root>/<table>/`.
pub const MIRROR_DIR: &str = "_current";

/// Where the lake's tables live (one directory each under `root`) and the
/// delta-rs storage options to reach them.
#[derive(Clone)]
pub struct LakeRoot {
    root: Url,
    /// They hold the S3 secret: never logged, never in `Debug`.
    storage: HashMap<String, String>,
}

impl std::fmt::Debug for LakeRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeRoot")
            .field("root", &self.root.as_str())
            .finish_non_exhaustive()
    }
}

impl LakeRoot {
    /// The configured bucket and prefix.
    pub fn new(s3: &S3Config, prefix: &str) -> Result<LakeRoot, LakeError> {
        let prefix = prefix.trim_matches('/');
        let root = if prefix.is_empty() {
            format!("s3://{}/", s3.bucket)
        } else {
            format!("s3://{}/{prefix}/", s3.bucket)
        };
        let root = Url::parse(&root).map_err(|_| LakeError::Location(root.clone()))?;
        let storage =
            crate::lake::storage::options(s3).map_err(|e| LakeError::Location(e.to_string()))?;
        Ok(LakeRoot::at(root, storage))
    }

    /// Any location delta-rs can store to (`s3://`, or `file://` in tests).
    pub fn at(root: Url, storage: HashMap<String, String>) -> LakeRoot {
        // s3:// table URLs resolve through the sink's own S3 store.
        crate::lake::storage::register();
        LakeRoot { root, storage }
    }

    pub fn url(&self) -> &Url {
        &self.root
    }

    pub fn table_url(&self, table: &str) -> Url {
        self.root
            .join(&format!("{table}/"))
            .expect("a table name is a valid URL path segment")
    }

    /// A handle on `table`, not yet loaded.
    pub fn handle(&self, table: &str) -> Result<DeltaTable, DeltaTableError> {
        DeltaTableBuilder::from_url(self.table_url(table))?
            .with_storage_options(self.storage.clone())
            .build()
    }

    /// The store of the root itself, for listing its tables.
    pub fn store(&self) -> Result<ObjectStoreRef, DeltaTableError> {
        Ok(DeltaTableBuilder::from_url(self.root.clone())?
            .with_storage_options(self.storage.clone())
            .build_storage()?
            .object_store(None))
    }

    /// The changelog tables: the top-level directories that hold a Delta
    /// table (`_quarantine` and `_current` are not changelogs).
    pub async fn tables(&self) -> Result<Vec<String>, LakeError> {
        self.tables_under(None).await
    }

    /// The current-state tables, by the name of the table they mirror.
    pub async fn mirror_tables(&self) -> Result<Vec<String>, LakeError> {
        self.tables_under(Some(MIRROR_DIR)).await
    }

    /// The table directory of the mirror of `table`, relative to the root.
    pub fn mirror_of(table: &str) -> String {
        format!("{MIRROR_DIR}/{table}")
    }

    async fn tables_under(&self, dir: Option<&str>) -> Result<Vec<String>, LakeError> {
        let store = self.store().map_err(delta_err("(root)"))?;
        let under = dir.map(object_store::path::Path::from);
        let list_err = |source| LakeError::List {
            root: match dir {
                Some(d) => format!("{}{d}/", self.root),
                None => self.root.to_string(),
            },
            source,
        };
        let listing = store
            .list_with_delimiter(under.as_ref())
            .await
            .map_err(list_err)?;
        let mut tables = Vec::new();
        for dir in listing.common_prefixes {
            let Some(name) = dir.filename().map(str::to_string) else {
                continue;
            };
            if under.is_none() && (name == QUARANTINE_DIR || name == MIRROR_DIR) {
                continue;
            }
            let log = store
                .list_with_delimiter(Some(&dir.clone().join("_delta_log")))
                .await
                .map_err(list_err)?;
            if !log.objects.is_empty() {
                tables.push(name);
            }
        }
        tables.sort();
        Ok(tables)
    }
}

pub fn delta_err(table: &str) -> impl Fn(DeltaTableError) -> LakeError + '_ {
    move |source| LakeError::Delta {
        table: table.to_string(),
        source,
    }
}

/// A writer's open tables.
pub struct Tables {
    root: LakeRoot,
    /// Properties of tables this writer creates (checkpoint interval, log
    /// retention).
    properties: BTreeMap<String, String>,
    /// One slot per table opened. A std mutex: held only to find a slot.
    slots: std::sync::Mutex<HashMap<String, Arc<TableSlot>>>,
}

/// One table, as this process knows it.
#[derive(Default)]
pub struct TableSlot {
    /// The table's log as this writer follows it. A tokio mutex held
    /// across one commit, which also keeps two commits of this process to
    /// one table from racing each other.
    pub open: tokio::sync::Mutex<Option<LogHead>>,
    /// What staging files needs, kept apart from `open` so that encoding
    /// and putting the next files never waits for a commit in progress.
    /// A std mutex: held only to clone or replace it.
    view: std::sync::Mutex<Option<TableView>>,
}

impl TableSlot {
    pub fn view(&self) -> Option<TableView> {
        self.view.lock().expect("not poisoned").clone()
    }

    pub fn set_view(&self, head: &LogHead) {
        let view = TableView {
            schema: head.schema().clone(),
            store: head.store(),
        };
        *self.view.lock().expect("not poisoned") = Some(view);
    }
}

/// A table's schema and store, as of its last refresh.
#[derive(Clone)]
pub struct TableView {
    pub schema: Arc<StructType>,
    pub store: ObjectStoreRef,
}

impl Tables {
    pub fn new(root: LakeRoot, properties: BTreeMap<String, String>) -> Tables {
        Tables {
            root,
            properties,
            slots: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &LakeRoot {
        &self.root
    }

    pub fn slot(&self, table: &str) -> Arc<TableSlot> {
        self.slots
            .lock()
            .expect("not poisoned")
            .entry(table.to_string())
            .or_default()
            .clone()
    }

    /// Brings `open` to the table's latest version, opening it first (and
    /// creating it with `create_with`, if given and the table is missing).
    /// Leaves `None` for a missing table.
    pub async fn refresh(
        &self,
        table: &str,
        slot: &TableSlot,
        open: &mut Option<LogHead>,
        create_with: Option<&Schema>,
    ) -> Result<(), LakeError> {
        let err = delta_err(table);
        match open {
            Some(head) => head.catch_up().await.map_err(&err)?,
            None => {
                let mut t = self.root.handle(table).map_err(&err)?;
                if !t.verify_deltatable_existence().await.map_err(&err)? {
                    match create_with {
                        Some(schema) => self.create(table, &t, schema).await?,
                        None => return Ok(()),
                    }
                }
                t.load().await.map_err(&err)?;
                *open = Some(LogHead::open(t).map_err(&err)?);
            }
        }
        slot.set_view(open.as_ref().expect("opened above"));
        Ok(())
    }

    /// The table's schema and store for staging files, opening (and, with
    /// `create_with`, creating) it the first time.
    pub async fn view(&self, table: &str, create_with: &Schema) -> Result<TableView, LakeError> {
        let slot = self.slot(table);
        if let Some(view) = slot.view() {
            return Ok(view);
        }
        let mut open = slot.open.lock().await;
        self.refresh(table, &slot, &mut open, Some(create_with))
            .await?;
        slot.view()
            .ok_or_else(|| LakeError::Location(self.root.table_url(table).to_string()))
    }

    /// The `txn` version of each app id in `table` (`None` for a missing
    /// table or an app id it does not know).
    pub async fn txn_versions(
        &self,
        table: &str,
        app_ids: Vec<String>,
    ) -> Result<Vec<Option<i64>>, LakeError> {
        let err = delta_err(table);
        let slot = self.slot(table);
        let mut open = slot.open.lock().await;
        self.refresh(table, &slot, &mut open, None).await?;
        let Some(head) = open.as_mut() else {
            return Ok(vec![None; app_ids.len()]);
        };
        let mut out = Vec::with_capacity(app_ids.len());
        for id in app_ids {
            out.push(head.txn(&id).await.map_err(&err)?);
        }
        Ok(out)
    }

    /// Creates a changelog table (partitioned by `date`) if no writer has
    /// yet.
    async fn create(
        &self,
        table: &str,
        t: &DeltaTable,
        file_schema: &Schema,
    ) -> Result<(), LakeError> {
        let schema = table_schema(file_schema).map_err(delta_err(table))?;
        create_table(t, table, &schema, &[meta::DATE], self.properties.iter()).await
    }
}

/// Creates table `name` at `t`'s location with `schema`, unless another
/// writer did first (then it is left as that writer made it).
///
/// Version 0 is committed directly rather than through delta-rs'
/// `CreateBuilder`, which would list every legacy writer feature of writer
/// version 7 (invariants among them, which delta-rs only writes with
/// DataFusion); the protocol here lists exactly what the sink uses.
pub async fn create_table<'a>(
    t: &DeltaTable,
    name: &str,
    schema: &StructType,
    partition_columns: &[&str],
    properties: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LakeError> {
    let err = delta_err(name);
    let metadata = deltalake::kernel::new_metadata(schema, partition_columns, properties)
        .map_err(|e| err(e.into()))?
        .with_name(name.to_string())
        .map_err(|e| err(e.into()))?;
    let protocol = protocol();
    let operation = DeltaOperation::Create {
        mode: SaveMode::ErrorIfExists,
        location: t.table_url().clone(),
        protocol: protocol.clone(),
        metadata: metadata.clone(),
    };
    // No retries: a create that loses the race for version 0 must not be
    // committed again as version 1 (delta-rs would retry it), which would
    // give the table a second identity and fail every writer whose snapshot
    // predates it with "metadata changed".
    let created = CommitBuilder::default()
        .with_max_retries(0)
        .with_actions(vec![Action::Protocol(protocol), Action::Metadata(metadata)])
        .build(None, t.log_store(), operation)
        .await;
    match created {
        Ok(_) => tracing::info!(table = name, "created Delta table"),
        // Another writer created it first: that is fine, it is opened next.
        Err(_) if t.verify_deltatable_existence().await.map_err(&err)? => {
            tracing::info!(table = name, "another writer created the Delta table first");
        }
        Err(e) => return Err(err(e)),
    }
    Ok(())
}

/// The commit properties of a delta-rs commit on top of `state`:
/// delta-rs' default cleans up expired log entries after every commit, by
/// listing the table's whole `_delta_log` (a week of commits, at the
/// default retention). An entry can only expire at a checkpoint, so only
/// the commit that writes one cleans up; the changelog's
/// [`LogHead`] does the same.
pub fn commit_properties(state: &DeltaTableState) -> CommitProperties {
    let next = state.version() + 1;
    let checkpoints = (next + 1).is_multiple_of(state.table_config().checkpoint_interval().get());
    CommitProperties::default().with_cleanup_expired_logs(Some(
        checkpoints && state.table_config().enable_expired_log_cleanup(),
    ))
}

/// Reader 3 / writer 7 with `timestampNtz`, so that `timestamp` columns
/// (wall-clock times, no zone) can be added at any time. kernel keeps its
/// constructor private; the JSON form is the protocol's own definition.
fn protocol() -> Protocol {
    serde_json::from_value(serde_json::json!({
        "minReaderVersion": 3,
        "minWriterVersion": 7,
        "readerFeatures": ["timestampNtz"],
        "writerFeatures": ["timestampNtz"],
    }))
    .expect("a valid protocol action")
}

/// The Delta schema of a new table: the file's columns plus `date`.
pub fn table_schema(file_schema: &Schema) -> Result<StructType, DeltaTableError> {
    let mut fields: Vec<Field> = file_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(meta::DATE, DataType::Date32, true));
    let s: StructType = (&Schema::new(fields)).try_into_kernel()?;
    Ok(s)
}

/// Makes `batch` fit the table schema, growing `table` where it must:
/// - a column the table lacks is added (nullable);
/// - a column whose type the table holds wider is cast up, losslessly;
/// - a column whose type cannot be held losslessly in the table's (a
///   narrowed or changed type) goes to a new column `<name>__<type>`, so
///   no value is ever rounded or dropped.
pub fn conform(batch: RecordBatch, table: &mut StructType) -> Result<RecordBatch, DeltaTableError> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut added: Vec<StructField> = Vec::new();
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let incoming: StructField = field.as_ref().try_into_kernel()?;
        let incoming = StructField::nullable(incoming.name(), incoming.data_type().clone());
        match table.field(field.name()) {
            None => {
                added.push(incoming);
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
            Some(existing) if existing.data_type() == incoming.data_type() => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
            Some(existing) => {
                let target = to_arrow(existing)?;
                if widens(field.data_type(), target.data_type()) {
                    columns.push(arrow::compute::cast(column, target.data_type())?);
                    fields.push(target.with_nullable(true));
                } else {
                    let name = format!("{}__{}", field.name(), type_suffix(&incoming));
                    let renamed = field.as_ref().clone().with_name(&name);
                    if table.field(&name).is_none() && !added.iter().any(|f| f.name() == &name) {
                        added.push(StructField::nullable(&name, incoming.data_type().clone()));
                    }
                    fields.push(renamed);
                    columns.push(column.clone());
                }
            }
        }
    }
    if !added.is_empty() {
        *table = StructType::try_new(table.fields().cloned().chain(added))?;
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)) as SchemaRef,
        columns,
    )?)
}

/// Whether `field` is where [`conform`] put `column`'s values of a type
/// the column cannot hold: `<column>__<its own type>`.
pub fn is_sibling(column: &str, field: &StructField) -> bool {
    field
        .name()
        .strip_prefix(column)
        .and_then(|rest| rest.strip_prefix("__"))
        .is_some_and(|suffix| suffix == type_suffix(field))
}

/// Whether every value of `from` is exactly representable in `to`.
pub fn widens(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    match (from, to) {
        (Int8, Int16 | Int32 | Int64) | (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (Float32, Float64) => true,
        (Int8 | Int16 | Int32, Float64) => true,
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            s2 >= s1 && (*p2 as i16 - *s2 as i16) >= (*p1 as i16 - *s1 as i16)
        }
        (Date32, Timestamp(_, None)) => true,
        _ => false,
    }
}

fn type_suffix(field: &StructField) -> String {
    field
        .data_type()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

pub fn to_arrow(field: &StructField) -> Result<Field, DeltaTableError> {
    Ok(TryIntoArrow::<Field>::try_into_arrow(field)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringArray};

    fn batch(fields: Vec<Field>, cols: Vec<arrow::array::ArrayRef>) -> RecordBatch {
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    }

    /// Spark's Delta reader refuses a table with a NOT NULL column unless
    /// the protocol lists `invariants`, which this writer cannot: every
    /// column of a table the sink creates is nullable.
    #[test]
    fn tables_have_only_nullable_columns() {
        let envelope: crate::decode::schema::ConnectSchema = serde_json::from_str(
            r#"{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
                {"type":"int64","optional":false,"field":"id"}]}]}"#,
        )
        .unwrap();
        let t = crate::decode::schema::TableSchema::from_envelope(&envelope).unwrap();
        let delta = table_schema(&t.arrow).unwrap();
        let not_null: Vec<&String> = delta
            .fields()
            .filter(|f| !f.is_nullable())
            .map(|f| f.name())
            .collect();
        assert!(not_null.is_empty(), "NOT NULL columns: {not_null:?}");
        assert!(delta.field(meta::KAFKA_OFFSET).is_some());
    }

    #[test]
    fn schema_grows_and_never_narrows() {
        let base = batch(
            vec![Field::new("id", DataType::Int64, true)],
            vec![Arc::new(Int64Array::from(vec![1]))],
        );
        let mut table = table_schema(&base.schema()).unwrap();

        // An added column is added.
        let more = batch(
            vec![
                Field::new("id", DataType::Int64, true),
                Field::new("note", DataType::Utf8, true),
            ],
            vec![
                Arc::new(Int64Array::from(vec![2])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        );
        conform(more, &mut table).unwrap();
        assert!(table.field("note").is_some());

        // A narrower type is cast up to the table's.
        let narrow = batch(
            vec![Field::new("id", DataType::Int32, true)],
            vec![Arc::new(Int32Array::from(vec![3]))],
        );
        let out = conform(narrow, &mut table).unwrap();
        assert_eq!(out.schema().field(0).data_type(), &DataType::Int64);

        // A type the table cannot hold goes to its own column.
        let changed = batch(
            vec![Field::new("id", DataType::Utf8, true)],
            vec![Arc::new(StringArray::from(vec!["4a"]))],
        );
        let out = conform(changed, &mut table).unwrap();
        assert_eq!(out.schema().field(0).name(), "id__string");
        assert!(table.field("id__string").is_some());
        assert!(table.field(meta::DATE).is_some());
    }
}
