//! The order a current-state table's files are sorted and cut in.
//!
//! A sync rewrites every file whose key range holds a changed key. Sorted
//! by a primary key whose first column is spread over its whole range
//! (`likes (user_id, tweet_id)`: any user likes at any time), a batch of
//! 1,000 new likes lands in every file, so a batch costs in proportion to
//! the table. Sorted by the key column that grows with time (`tweet_id`:
//! likes go to recent tweets), new rows go to the last files, and a batch
//! rewrites a few files whatever the table's size.
//!
//! The columns of a key in any order are still a key, so no index is
//! needed: a change names its file by its key alone, as before. The order
//! is chosen from the rows a table is created (or rebuilt) from, and kept
//! in its [`ORDER_PROPERTY`], so that every writer and every later sync
//! sorts the same way. A column goes first when its values' ranks follow
//! the rows' order within their Kafka partitions (Spearman's correlation)
//! closely, and more closely than the key's own first column.
//!
//! A new table's first changes may be too few to tell (a table captured
//! empty): its choice stays open ([`PENDING_PROPERTY`]), and while its
//! changelog is small each sync rebuilds it, choosing again from every
//! change so far, until the choice is made from enough rows.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::Int32Type;
use arrow::error::ArrowError;
use arrow::row::{RowConverter, SortField};

use crate::config::Clustering;
use crate::decode::schema::meta;

/// The mirror table's property naming the order of its files (a JSON
/// array of the primary key's columns).
pub const ORDER_PROPERTY: &str = "cdc.clusterBy";

/// Set while the order was chosen from too few rows to tell.
pub const PENDING_PROPERTY: &str = "cdc.clusterByPending";

/// How closely a column's values must follow time to go first: below it
/// the key's own order is as good as any.
const FOLLOWS_TIME: f64 = 0.5;

/// Rows a choice needs, at least: Spearman's correlation of 100 unrelated
/// values is about 0 ± 0.1, so [`FOLLOWS_TIME`] is not reached by chance.
/// A choice from fewer stays pending (see the module's overview).
const ENOUGH_ROWS: usize = 100;

/// Rows looked at per partition, at most (evenly spaced): ranks of a
/// sample say as much as ranks of all, and cost a sort of the sample.
const SAMPLE: usize = 1 << 16;

/// The order of a mirror's files, as chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The primary key's columns, in the order the files are sorted by.
    pub columns: Vec<String>,
    /// Chosen from too few rows to tell: choose again while that is cheap.
    pub pending: bool,
}

impl Order {
    /// The order an existing mirror's properties record ([`of`],
    /// [`pending`]).
    pub fn stored(configuration: &HashMap<String, String>, key: &[String]) -> Order {
        Order {
            columns: of(configuration, key),
            pending: pending(configuration),
        }
    }

    /// The table properties that record this order.
    pub fn properties(&self) -> Vec<(String, String)> {
        let mut p = vec![(
            ORDER_PROPERTY.to_string(),
            serde_json::to_string(&self.columns).expect("names serialise"),
        )];
        if self.pending {
            p.push((PENDING_PROPERTY.to_string(), "true".to_string()));
        }
        p
    }
}

/// The order of a mirror created or rebuilt from `rows` (changelog rows
/// in Kafka order): `key` with its column that best follows time first,
/// if one does (see the module's overview).
pub fn chosen(
    rows: &RecordBatch,
    key: &[String],
    clustering: Clustering,
) -> Result<Order, ArrowError> {
    let mut order = Order {
        columns: key.to_vec(),
        pending: false,
    };
    if clustering == Clustering::Key || key.len() < 2 {
        return Ok(order);
    }
    if rows.num_rows() < ENOUGH_ROWS {
        order.pending = true;
        return Ok(order);
    }
    let samples = partition_samples(rows);
    let mut best = (0, time_correlation(rows, &samples, &key[0])?);
    for (i, column) in key.iter().enumerate().skip(1) {
        let r = time_correlation(rows, &samples, column)?;
        if r > best.1 {
            best = (i, r);
        }
    }
    if best.1 >= FOLLOWS_TIME {
        let first = order.columns.remove(best.0);
        order.columns.insert(0, first);
    }
    Ok(order)
}

/// Whether a mirror's order was chosen from too few rows to tell.
pub fn pending(configuration: &HashMap<String, String>) -> bool {
    configuration.contains_key(PENDING_PROPERTY)
}

/// The order of an existing mirror: its property, if that is an order of
/// `key`'s columns, else `key` (a mirror created before the property, or
/// a key that has changed since).
pub fn of(configuration: &HashMap<String, String>, key: &[String]) -> Vec<String> {
    configuration
        .get(ORDER_PROPERTY)
        .and_then(|json| serde_json::from_str::<Vec<String>>(json).ok())
        .filter(|order| {
            let mut a = order.clone();
            let mut b = key.to_vec();
            a.sort();
            b.sort();
            a == b
        })
        .unwrap_or_else(|| key.to_vec())
}

/// For each Kafka partition of `rows`, in partition order, the indices of
/// at most [`SAMPLE`] of its rows, evenly spaced, in the order they come.
fn partition_samples(rows: &RecordBatch) -> Vec<Vec<u32>> {
    let partitions = rows
        .column_by_name(meta::KAFKA_PARTITION)
        .and_then(|p| p.as_primitive_opt::<Int32Type>());
    let mut by_partition: BTreeMap<Option<i32>, Vec<u32>> = BTreeMap::new();
    for i in 0..rows.num_rows() {
        let p = partitions.and_then(|p| p.is_valid(i).then(|| p.value(i)));
        by_partition.entry(p).or_default().push(i as u32);
    }
    by_partition
        .into_values()
        .map(|indices| {
            let step = indices.len().div_ceil(SAMPLE).max(1);
            indices.into_iter().step_by(step).collect()
        })
        .collect()
}

/// How closely the ranks of `column`'s values follow the rows' order in
/// their partitions: Spearman's correlation per partition, weighted by its
/// rows sampled (1: they only grow; 0: no relation, a constant column, or
/// values that fall with time).
fn time_correlation(
    rows: &RecordBatch,
    samples: &[Vec<u32>],
    column: &str,
) -> Result<f64, ArrowError> {
    // A key column the rows lack fails the reduction that needs it, which
    // names it; here it follows nothing.
    let Some(values) = rows.column_by_name(column) else {
        return Ok(0.0);
    };
    let converter = RowConverter::new(vec![SortField::new(values.data_type().clone())])?;
    let (mut weighted, mut weight) = (0.0, 0.0);
    for sample in samples.iter().filter(|s| s.len() >= 3) {
        let taken = arrow::compute::take(
            values.as_ref(),
            &arrow::array::UInt32Array::from(sample.clone()),
            None,
        )?;
        let n = taken.len() as f64;
        weighted += spearman(&converter, &taken)? * n;
        weight += n;
    }
    Ok(if weight > 0.0 { weighted / weight } else { 0.0 })
}

/// Spearman's correlation between `values`' ranks (equal values share the
/// lowest rank) and their positions.
fn spearman(converter: &RowConverter, values: &ArrayRef) -> Result<f64, ArrowError> {
    let encoded = converter.convert_columns(std::slice::from_ref(values))?;
    let n = encoded.num_rows();
    let mut sorted: Vec<usize> = (0..n).collect();
    sorted.sort_by(|&a, &b| encoded.row(a).cmp(&encoded.row(b)));
    let mut rank = vec![0.0; n];
    for (at, &i) in sorted.iter().enumerate() {
        rank[i] = if at > 0 && encoded.row(sorted[at - 1]) == encoded.row(i) {
            rank[sorted[at - 1]]
        } else {
            at as f64
        };
    }
    let mean_position = (n as f64 - 1.0) / 2.0;
    let mean_rank = rank.iter().sum::<f64>() / n as f64;
    let (mut cov, mut var_position, mut var_rank) = (0.0, 0.0, 0.0);
    for (position, r) in rank.iter().enumerate() {
        let dp = position as f64 - mean_position;
        let dr = r - mean_rank;
        cov += dp * dr;
        var_position += dp * dp;
        var_rank += dr * dr;
    }
    Ok(if var_rank > 0.0 {
        cov / (var_position * var_rank).sqrt()
    } else {
        0.0
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int32Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// `likes` rows in Kafka order over two partitions: tweet ids that grow
    /// with time (each like of one of the 20 newest tweets), user ids
    /// spread over the id space, and a constant tenant.
    fn likes(n: i64) -> RecordBatch {
        let users = (0..n).map(|i| (i * 7_919) % 1_000);
        let tweets = (0..n).map(|i| i / 10 + (i * 13) % 20);
        let schema = Schema::new(vec![
            Field::new("tenant", DataType::Int64, false),
            Field::new("user_id", DataType::Int64, false),
            Field::new("tweet_id", DataType::Int64, false),
            Field::new(meta::KAFKA_PARTITION, DataType::Int32, true),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(vec![1; n as usize])),
                Arc::new(Int64Array::from_iter_values(users)),
                Arc::new(Int64Array::from_iter_values(tweets)),
                Arc::new(Int32Array::from_iter_values((0..n).map(|i| (i % 2) as i32))),
            ],
        )
        .expect("a valid batch")
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_column_that_grows_with_time_goes_first() {
        let rows = likes(10_000);
        let key = names(&["tenant", "user_id", "tweet_id"]);
        let time = chosen(&rows, &key, Clustering::Time).expect("chosen");
        assert_eq!(time.columns, names(&["tweet_id", "tenant", "user_id"]));
        assert!(!time.pending);
        assert_eq!(
            chosen(&rows, &key, Clustering::Key)
                .expect("chosen")
                .columns,
            key,
            "clustering by key keeps the key's order"
        );
        let samples = partition_samples(&rows);
        assert_eq!(samples.len(), 2, "two partitions");
        assert!(time_correlation(&rows, &samples, "tweet_id").expect("r") > 0.99);
        assert!(
            time_correlation(&rows, &samples, "user_id")
                .expect("r")
                .abs()
                < 0.1
        );
        assert_eq!(time_correlation(&rows, &samples, "tenant").expect("r"), 0.0);
    }

    #[test]
    fn no_column_that_follows_time_keeps_the_key_order() {
        let rows = likes(10_000);
        let key = names(&["user_id", "tenant"]);
        let kept = chosen(&rows, &key, Clustering::Time).expect("chosen");
        assert_eq!((kept.columns, kept.pending), (key, false));
        let key = names(&["user_id", "tweet_id"]);
        let few = chosen(&likes(99), &key, Clustering::Time).expect("chosen");
        assert_eq!(
            (few.columns, few.pending),
            (key.clone(), true),
            "too few rows to tell"
        );
        let enough = chosen(&likes(1_000), &key, Clustering::Time).expect("chosen");
        assert_eq!(
            (enough.columns, enough.pending),
            (names(&["tweet_id", "user_id"]), false)
        );
    }

    #[test]
    fn a_stored_order_holds_only_while_it_orders_the_key() {
        let key = names(&["user_id", "tweet_id"]);
        let stored = HashMap::from([(
            ORDER_PROPERTY.to_string(),
            r#"["tweet_id","user_id"]"#.to_string(),
        )]);
        assert_eq!(of(&stored, &key), names(&["tweet_id", "user_id"]));
        assert_eq!(of(&HashMap::new(), &key), key, "a mirror from before");
        let other = names(&["user_id", "tweet_id", "at"]);
        assert_eq!(of(&stored, &other), other, "a key that changed");
    }
}
