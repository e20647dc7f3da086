//! An object store that counts its requests, so a test can assert what an
//! operation costs in requests and a benchmark can report it (feature
//! `lake`).
//!
//! [`counted_scheme`] registers `counted-<tag>-<scheme>://` with delta-rs:
//! a table URL under it resolves to `<scheme>://`'s store (the sink's S3
//! store, or the local file system), wrapped in [`Counted`], and to the
//! same log store.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use deltalake::DeltaResult;
use deltalake::logstore::{
    ObjectStoreFactory, ObjectStoreRef, StorageConfig, logstore_factories, object_store_factories,
};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use url::Url;

/// Registers `counted-<tag>-<inner>://`, whose stores count into
/// `counters`, and returns that scheme. `inner`'s factories must be
/// registered already (the sink's `storage::register` for `s3`; delta-rs'
/// own for `file`). Delta-rs keeps its factories for the whole process, so
/// tests that run at once each use their own `tag` (letters, digits, `-`).
pub fn counted_scheme(inner: &str, tag: &str, counters: Arc<Counters>) -> Result<String, String> {
    let from = Url::parse(&format!("{inner}://")).map_err(|e| e.to_string())?;
    let scheme = format!("counted-{tag}-{inner}");
    let to = Url::parse(&format!("{scheme}://")).map_err(|e| e.to_string())?;
    let store = object_store_factories()
        .get(&from)
        .map(|f| f.value().clone())
        .ok_or_else(|| format!("no {inner} store factory"))?;
    let log = logstore_factories()
        .get(&from)
        .map(|f| f.value().clone())
        .ok_or_else(|| format!("no {inner} log store factory"))?;
    object_store_factories().insert(
        to.clone(),
        Arc::new(CountedFactory {
            inner: store,
            scheme: scheme.clone(),
            inner_scheme: inner.to_string(),
            counters,
        }),
    );
    logstore_factories().insert(to, log);
    Ok(scheme)
}

struct CountedFactory {
    inner: Arc<dyn ObjectStoreFactory>,
    scheme: String,
    inner_scheme: String,
    counters: Arc<Counters>,
}

impl ObjectStoreFactory for CountedFactory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, Path)> {
        // By text: `Url::set_scheme` refuses to turn a custom scheme into
        // a special one such as `file`.
        let inner = url.as_str().replacen(&self.scheme, &self.inner_scheme, 1);
        let inner = Url::parse(&inner)
            .map_err(|e| deltalake::DeltaTableError::InvalidTableLocation(e.to_string()))?;
        let (store, path) = self.inner.parse_url_opts(&inner, config)?;
        Ok((
            Arc::new(Counted {
                inner: store,
                counters: self.counters.clone(),
            }),
            path,
        ))
    }
}

/// Requests made, and bytes moved, since the last [`Counters::reset`].
#[derive(Default)]
pub struct Counters {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub lists: AtomicU64,
    /// Objects the lists returned.
    pub listed: AtomicU64,
}

impl Counters {
    pub fn reset(&self) {
        for c in [
            &self.gets,
            &self.get_bytes,
            &self.puts,
            &self.put_bytes,
            &self.lists,
            &self.listed,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// A store that counts the requests made of it into its counters.
#[derive(Debug)]
pub struct Counted {
    inner: ObjectStoreRef,
    counters: Arc<Counters>,
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Counters")
    }
}

impl fmt::Display for Counted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counted({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .put_bytes
            .fetch_add(payload.content_length() as u64, Ordering::Relaxed);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // Initiating and completing are requests of their own.
        self.counters.puts.fetch_add(2, Ordering::Relaxed);
        Ok(Box::new(CountedUpload {
            inner: self.inner.put_multipart_opts(location, opts).await?,
            counters: self.counters.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let mut result = self.inner.get_opts(location, options).await?;
        if let GetResultPayload::Stream(stream) = result.payload {
            let counters = self.counters.clone();
            result.payload = GetResultPayload::Stream(
                stream
                    .inspect(move |chunk| {
                        if let Ok(b) = chunk {
                            counters
                                .get_bytes
                                .fetch_add(b.len() as u64, Ordering::Relaxed);
                        }
                    })
                    .boxed(),
            );
        }
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        // Counted one request per range (the S3 client coalesces nearby
        // ranges; this overcounts requests a little, never bytes).
        let out = self.inner.get_ranges(location, ranges).await?;
        self.counters
            .gets
            .fetch_add(ranges.len() as u64, Ordering::Relaxed);
        let bytes: usize = out.iter().map(Bytes::len).sum();
        self.counters
            .get_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        in_key_order(self.inner.list(prefix), self.counters.clone())
    }

    /// Counted by what it returns: S3 sends only the keys after `offset`
    /// (the local file system filters a full listing itself).
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        in_key_order(
            self.inner.list_with_offset(prefix, offset),
            self.counters.clone(),
        )
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let listed = self.inner.list_with_delimiter(prefix).await?;
        let n = listed.objects.len() + listed.common_prefixes.len();
        self.counters.listed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(listed)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.copy_opts(from, to, options).await
    }
}

/// A listing in key order, as S3 gives it and delta-kernel expects of any
/// scheme but `file` (whose listings it sorts itself, and the local file
/// system's come in directory order), counted.
fn in_key_order(
    listing: BoxStream<'static, object_store::Result<ObjectMeta>>,
    counters: Arc<Counters>,
) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
    futures::stream::once(async move {
        let mut all: Vec<ObjectMeta> = listing.try_collect().await?;
        all.sort_by(|a, b| a.location.cmp(&b.location));
        counters
            .listed
            .fetch_add(all.len() as u64, Ordering::Relaxed);
        Ok::<_, object_store::Error>(futures::stream::iter(all.into_iter().map(Ok)))
    })
    .try_flatten()
    .boxed()
}

#[derive(Debug)]
struct CountedUpload {
    inner: Box<dyn MultipartUpload>,
    counters: Arc<Counters>,
}

#[async_trait]
impl MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .put_bytes
            .fetch_add(data.content_length() as u64, Ordering::Relaxed);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}
