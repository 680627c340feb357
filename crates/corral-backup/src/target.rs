//! Backup targets: where backups are kept, through `object_store`.
//!
//! - `file:///DIR`: a local or NFS-mounted directory (it must exist).
//! - `s3://BUCKET[/PREFIX]`: any S3-compatible store; the endpoint from
//!   [`S3Settings::endpoint`] (MinIO, Ceph RGW, s3s-fs; plain HTTP allowed
//!   for an `http://` endpoint), the region from `AWS_REGION` (default
//!   `us-east-1`), the keys from `AWS_ACCESS_KEY_ID` and
//!   `AWS_SECRET_ACCESS_KEY` or a credentials file — never a command-line
//!   argument. Conditional PUTs (`If-None-Match`) make create-if-absent
//!   safe between writers.
//!
//! Objects are named relative to the target's prefix ([`crate::layout`]).
//! Nothing is ever overwritten: every object is put with
//! [`Target::put_new`].

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

/// What went wrong with a target, with the object it concerned.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup target {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("backup target credentials: {0}")]
    Credentials(String),
    #[error("{object}: not found on the backup target")]
    NotFound { object: String },
    #[error("{object}: {source}")]
    Store {
        object: String,
        #[source]
        source: object_store::Error,
    },
}

/// How to reach an S3-compatible store, beside its URL.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    /// `http(s)://HOST:PORT`; None: AWS itself.
    pub endpoint: Option<String>,
    /// A file of `KEY=VALUE` lines (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optionally `AWS_REGION`); None: the
    /// environment.
    pub credentials_file: Option<PathBuf>,
}

/// Did [`Target::put_new`] create the object, or was it there already?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    Created,
    Existed,
}

/// A backup target.
#[derive(Clone)]
pub struct Target {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

fn key_values(file: &FsPath) -> Result<Vec<(String, String)>, TargetError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| TargetError::Credentials(format!("{}: {e}", file.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

impl Target {
    /// The target at `url` (see the module documentation).
    pub fn open(url: &str, s3: &S3Settings) -> Result<Self, TargetError> {
        let bad = |why: &str| TargetError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("a file target is file:///ABSOLUTE/DIR"));
            }
            let fs = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| bad(&format!("the directory cannot be used: {e}")))?;
            return Ok(Target {
                store: Arc::new(fs),
                prefix: String::new(),
                url: url.to_string(),
            });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(bad("expected file:///DIR or s3://BUCKET/PREFIX"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let vars: Vec<(String, String)> = match &s3.credentials_file {
            Some(f) => key_values(f)?,
            None => std::env::vars()
                .filter(|(k, _)| k.starts_with("AWS_"))
                .collect(),
        };
        let var = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (Some(key), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(TargetError::Credentials(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are needed (environment or credentials file)"
                    .into(),
            ));
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()))
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(token) = var("AWS_SESSION_TOKEN") {
            b = b.with_token(token);
        }
        if let Some(endpoint) = &s3.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = b.build().map_err(|e| bad(&e.to_string()))?;
        Ok(Target {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }

    fn err(&self, name: &str, e: object_store::Error) -> TargetError {
        match e {
            object_store::Error::NotFound { .. } => TargetError::NotFound {
                object: format!("{}/{name}", self.url.trim_end_matches('/')),
            },
            source => TargetError::Store {
                object: format!("{}/{name}", self.url.trim_end_matches('/')),
                source,
            },
        }
    }

    /// Puts `name` unless it exists (create-if-absent).
    pub async fn put_new(&self, name: &str, bytes: Bytes) -> Result<Put, TargetError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(name), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::Existed),
            Err(e) => Err(self.err(name, e)),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, TargetError> {
        let got = self
            .store
            .get(&self.path(name))
            .await
            .map_err(|e| self.err(name, e))?;
        got.bytes().await.map_err(|e| self.err(name, e))
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, TargetError> {
        self.store
            .get_range(&self.path(name), range)
            .await
            .map_err(|e| self.err(name, e))
    }

    /// The object's size in bytes.
    pub async fn size(&self, name: &str) -> Result<u64, TargetError> {
        let meta = self
            .store
            .head(&self.path(name))
            .await
            .map_err(|e| self.err(name, e))?;
        Ok(meta.size)
    }

    /// The names of the objects under `dir` (which ends with `/`).
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, TargetError> {
        let base = self.path(dir.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let metas: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.err(dir, e))?;
        Ok(metas
            .into_iter()
            .map(|m| {
                let full = m.location.to_string();
                full.strip_prefix(&strip).unwrap_or(&full).to_string()
            })
            .collect())
    }

    pub async fn delete(&self, name: &str) -> Result<(), TargetError> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_and_missing_keys_are_refused_with_a_reason() {
        let s3 = S3Settings::default();
        for bad in ["/tmp/x", "file://relative", "s3://", "http://x/y"] {
            assert!(
                matches!(Target::open(bad, &s3), Err(TargetError::BadUrl { .. })),
                "{bad}"
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let creds = tmp.path().join("creds");
        std::fs::write(&creds, "AWS_ACCESS_KEY_ID=only-the-id\n").unwrap();
        let s3 = S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            credentials_file: Some(creds),
        };
        assert!(matches!(
            Target::open("s3://bucket/prefix", &s3),
            Err(TargetError::Credentials(_))
        ));
    }

    #[tokio::test]
    async fn a_directory_target_creates_once_lists_reads_ranges_and_deletes() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("file://{}", tmp.path().display());
        let t = Target::open(&url, &S3Settings::default()).unwrap();
        let name = "volumes/db/backups/b1.manifest";
        assert_eq!(
            t.put_new(name, Bytes::from_static(b"first")).await.unwrap(),
            Put::Created
        );
        assert_eq!(
            t.put_new(name, Bytes::from_static(b"second"))
                .await
                .unwrap(),
            Put::Existed
        );
        assert_eq!(
            &t.get(name).await.unwrap()[..],
            b"first",
            "never overwritten"
        );
        assert_eq!(&t.get_range(name, 1..3).await.unwrap()[..], b"ir");
        assert_eq!(t.size(name).await.unwrap(), 5);
        t.put_new("volumes/db/backups/b2.manifest", Bytes::new())
            .await
            .unwrap();
        t.put_new("volumes/other/backups/x.manifest", Bytes::new())
            .await
            .unwrap();
        let mut listed = t.list("volumes/db/backups/").await.unwrap();
        listed.sort();
        assert_eq!(
            listed,
            [
                "volumes/db/backups/b1.manifest",
                "volumes/db/backups/b2.manifest"
            ]
        );
        t.delete(name).await.unwrap();
        t.delete(name).await.unwrap();
        assert!(matches!(
            t.get(name).await,
            Err(TargetError::NotFound { .. })
        ));
    }
}
