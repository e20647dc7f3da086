//! Files this process just put, kept as the rows they hold, for a while.
//!
//! With current-state tables on, the mirror writer reads every changelog
//! file a moment after the changelog writer put it, and rewrites its own
//! newest file at its next sync. Reading them back cost a GET and a Parquet
//! decode of rows the process had just held: about a tenth of the sink's
//! CPU in a drain (docs/benchmarks.md). So a [`FileWriter`] given a
//! [`Recent`] keeps each file it puts here, and a reader takes a file from
//! here when it is still kept, else reads it from the store as before.
//!
//! A kept file is exactly the file: data files are never changed and never
//! reuse a name, and what is kept is the batch that was encoded, under the
//! schema read back from the encoded file's own footer (a batch whose
//! columns do not fit it is not kept). Memory is bounded by a budget; the
//! oldest files go first, so a reader that falls far behind reads from the
//! store again.
//!
//! [`FileWriter`]: crate::lake::files::FileWriter

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::lake::files::{ReadFile, sliced_memory};

/// The files kept, by path within their table (names are fresh UUIDs, so
/// two tables never share one).
pub struct Recent {
    budget: usize,
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    files: HashMap<String, (ReadFile, usize)>,
    /// Paths in the order they were kept: the oldest is dropped first.
    order: VecDeque<String>,
    bytes: usize,
}

impl Recent {
    /// Keeps files up to `budget` bytes of Arrow memory in all.
    pub fn new(budget: usize) -> Recent {
        Recent {
            budget,
            kept: Mutex::new(Kept::default()),
        }
    }

    /// Keeps `file`, dropping the oldest files kept until it fits; a file
    /// bigger than the whole budget is not kept.
    pub fn keep(&self, file: ReadFile) {
        let bytes = memory(&file);
        if bytes > self.budget {
            return;
        }
        let mut kept = self.kept.lock().expect("not poisoned");
        while kept.bytes + bytes > self.budget {
            let Some(oldest) = kept.order.pop_front() else {
                break;
            };
            if let Some((_, b)) = kept.files.remove(&oldest) {
                kept.bytes -= b;
            }
        }
        kept.bytes += bytes;
        kept.order.push_back(file.path.clone());
        if let Some((_, replaced)) = kept.files.insert(file.path.clone(), (file, bytes)) {
            kept.bytes -= replaced;
        }
    }

    /// The file at `path`, if it is still kept; taken out, as each is read
    /// once.
    pub fn take(&self, path: &str) -> Option<ReadFile> {
        let mut kept = self.kept.lock().expect("not poisoned");
        let (file, bytes) = kept.files.remove(path)?;
        kept.bytes -= bytes;
        // Files are taken about in the order they were kept: near the front.
        if let Some(at) = kept.order.iter().position(|p| p == path) {
            kept.order.remove(at);
        }
        Some(file)
    }
}

impl Recent {
    /// Tests: drops every file kept.
    #[cfg(test)]
    pub(crate) fn clear(&self) {
        *self.kept.lock().expect("not poisoned") = Kept::default();
    }
}

/// The Arrow memory of a file's rows.
fn memory(file: &ReadFile) -> usize {
    file.batches.iter().map(sliced_memory).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use std::sync::Arc;

    fn file(path: &str, rows: i64) -> ReadFile {
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from_iter_values(0..rows)) as _,
        )])
        .unwrap();
        ReadFile {
            path: path.to_string(),
            schema: batch.schema(),
            batches: vec![batch],
            footer: HashMap::new(),
        }
    }

    #[test]
    fn the_oldest_files_go_first_when_the_budget_is_full() {
        // 100 rows of i64: 800 bytes each; room for two.
        let recent = Recent::new(2000);
        recent.keep(file("a", 100));
        recent.keep(file("b", 100));
        recent.keep(file("c", 100));
        assert!(recent.take("a").is_none());
        assert_eq!(recent.take("b").unwrap().batches[0].num_rows(), 100);
        // Taken once.
        assert!(recent.take("b").is_none());
        // Taking frees its room: `d` fits beside `c`.
        recent.keep(file("d", 100));
        assert!(recent.take("c").is_some());
        assert!(recent.take("d").is_some());
        // Bigger than the budget: not kept.
        recent.keep(file("e", 1000));
        assert!(recent.take("e").is_none());
    }
}
