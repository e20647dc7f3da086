//! S3 (or MinIO): the one place the sink configures object_store's S3
//! client, for the Delta tables (through delta-rs) and for the quarantine.
//!
//! delta-rs finds the store of an `s3://` table through factories it keeps
//! per URL scheme; [`register`] installs this module's. deltalake's own `s3`
//! feature would install deltalake-aws's instead, which bring the AWS SDK
//! (48 crates, 20 of them `aws-*`: credential chains, STS, DynamoDB
//! locking) for nothing this sink uses. Commits do not need it:
//! delta-rs's default log store writes each `_delta_log/<version>.json` with
//! `PutMode::Create`, which object_store's `AmazonS3` sends as
//! `If-None-Match: *`, so of two writers of one version exactly one
//! succeeds and the other gets `VersionAlreadyExists` (S3 and MinIO both
//! honour it; the fencing and create-race stack tests depend on it).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Once};
use std::time::Duration;

use deltalake::logstore::object_store::aws::{
    AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut,
};
use deltalake::logstore::object_store::path::Path;
use deltalake::logstore::{
    DeltaIOStorageBackend, LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef,
    StorageConfig, default_logstore, logstore_factories, object_store_factories,
};
use deltalake::{DeltaResult, DeltaTableError};
use object_store::ObjectStore;
use secrecy::ExposeSecret;
use url::Url;

use crate::config::{ConfigError, S3Config};

/// The storage options of the lake's tables: what [`S3Factory`] builds the
/// store from. They hold the secret key, so they are never logged. Without
/// an access key, object_store finds credentials itself: web identity
/// (EKS), the container's (ECS) or the instance's (EC2 metadata).
pub fn options(s3: &S3Config) -> Result<HashMap<String, String>, ConfigError> {
    let mut o = HashMap::from([("AWS_REGION".to_string(), s3.region.clone())]);
    if !s3.access_key_id.is_empty() {
        o.insert("AWS_ACCESS_KEY_ID".into(), s3.access_key_id.clone());
    }
    if let Some(secret) = s3.resolve_secret()? {
        o.insert(
            "AWS_SECRET_ACCESS_KEY".into(),
            secret.expose_secret().to_string(),
        );
    }
    if !s3.endpoint.is_empty() {
        o.insert("AWS_ENDPOINT_URL".into(), s3.endpoint.clone());
        o.insert(
            "AWS_ALLOW_HTTP".into(),
            s3.endpoint.starts_with("http://").to_string(),
        );
        o.insert("AWS_VIRTUAL_HOSTED_STYLE_REQUEST".into(), "false".into());
    }
    Ok(o)
}

/// How one S3 request is retried, for every client the sink builds (tables,
/// quarantine, upkeep): a few quick attempts against a blip. Longer outages
/// are the caller's to wait out, with the give-up time of [`crate::retry`];
/// an unbounded retry here would hide them from it.
fn request_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(15),
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
    }
}

/// An S3 client from storage options (object_store's `aws_*` keys, any
/// case). Conditional put is set explicitly: commits rely on it.
fn builder(options: &HashMap<String, String>) -> object_store::Result<AmazonS3Builder> {
    let mut b = AmazonS3Builder::new()
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(request_retry());
    for (key, value) in options {
        b = b.with_config(
            AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase())?,
            value,
        );
    }
    Ok(b)
}

/// The bucket itself (the quarantine's store), built as the tables' are.
pub fn s3_store(cfg: &S3Config) -> Result<Arc<dyn ObjectStore>, ConfigError> {
    let invalid = |e: object_store::Error| ConfigError::Invalid {
        key: "s3",
        reason: e.to_string(),
    };
    let store = builder(&options(cfg)?)
        .map_err(invalid)?
        .with_bucket_name(&cfg.bucket)
        .build()
        .map_err(invalid)?;
    Ok(Arc::new(store))
}

/// Makes `s3://` (and `s3a://`) table URLs resolve to this module's store
/// and delta-rs's default log store. Idempotent.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for scheme in ["s3://", "s3a://"] {
            let url = Url::parse(scheme).expect("a scheme is a URL");
            object_store_factories().insert(url.clone(), Arc::new(S3Factory));
            logstore_factories().insert(url, Arc::new(DefaultLog));
        }
    });
}

/// Builds the bucket's store for a table URL; delta-rs adds the table's
/// prefix itself.
struct S3Factory;

impl ObjectStoreFactory for S3Factory {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, Path)> {
        let mut store: ObjectStoreRef =
            Arc::new(builder(&config.raw)?.with_url(url.as_str()).build()?);
        if let Some(runtime) = &config.runtime {
            store = Arc::new(DeltaIOStorageBackend::new(store, runtime.clone()));
        }
        let path = Path::from_url_path(url.path())
            .map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
        Ok((store, path))
    }
}

/// delta-rs's default log store: commits by conditional put.
struct DefaultLog;

impl LogStoreFactory for DefaultLog {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_a_known_s3_key() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:9000".into(),
            access_key_id: "cdclake".into(),
            secret_access_key: Some("not-a-real-secret".to_string().into()),
            ..S3Config::default()
        };
        let o = options(&cfg).unwrap();
        assert_eq!(o.len(), 6);
        // An unknown key would fail here rather than be ignored.
        builder(&o).unwrap();
        assert!(builder(&HashMap::from([("AWS_NO_SUCH".into(), "x".into())])).is_err());
    }

    #[test]
    fn s3_urls_resolve_through_this_module() {
        register();
        let url = Url::parse("s3://bucket/prefix/table/").unwrap();
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:1".into(),
            access_key_id: "cdclake".into(),
            secret_access_key: Some("not-a-real-secret".to_string().into()),
            ..S3Config::default()
        };
        // Builds the log store without a request: the scheme is known.
        let table = deltalake::DeltaTableBuilder::from_url(url)
            .unwrap()
            .with_storage_options(options(&cfg).unwrap())
            .build_storage();
        assert!(table.is_ok(), "{:?}", table.err());
    }
}
