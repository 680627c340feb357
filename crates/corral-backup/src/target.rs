//! Backup targets: where backups are kept, through `object_store`.
//!
//! - `file:///DIR`: a local or NFS-mounted directory (it must exist).
//! - `s3://BUCKET[/PREFIX]`: any S3-compatible store; the endpoint from
//!   [`S3Settings::endpoint`] (MinIO, Ceph RGW, s3s-fs; plain HTTP allowed
//!   for an `http://` endpoint), the region from `AWS_REGION` (default
//!   `us-east-1`), the keys from `AWS_ACCESS_KEY_ID` and
//!   `AWS_SECRET_ACCESS_KEY` or a credentials file — never a command-line
//!   argument. Conditional PUTs (`If-None-Match`) make create-if-absent
//!   safe between writers on a store that makes them atomic, as AWS S3
//!   does (s3s-fs, the tests' server, checks and then writes: two writers
//!   creating one name at the same moment can both succeed there).
//!
//! A request to an S3 store that fails on the way (no connection, a
//! timeout, a 5xx or 429 answer) is retried a few times with exponential
//! backoff, within bounds an operator can set ([`S3Settings::max_retries`],
//! [`S3Settings::retry_timeout`], [`S3Settings::connect_timeout`]): an
//! unreachable store is reported in seconds, not minutes. The failures an
//! operator can fix are told apart from the rest ([`TargetError`]): the
//! store cannot be reached, it refuses the keys, the bucket does not exist.
//! [`Target::check`] asks all three with one request before any work.
//!
//! Objects are named relative to the target's prefix ([`crate::layout`]).
//! Nothing is ever overwritten: every object is put with
//! [`Target::put_new`].

use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig,
};

/// What went wrong with a target, with the object it concerned.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup target {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("backup target credentials: {0}")]
    Credentials(String),
    #[error("{object}: not found on the backup target")]
    NotFound { object: String },
    /// The store refused the keys (S3 403/401: an unknown key ID, a wrong
    /// secret, or keys without the right to the bucket).
    #[error(
        "{object}: access denied by {endpoint}{}: check the keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and their rights on the bucket",
        code_in_parens(code)
    )]
    AccessDenied {
        object: String,
        endpoint: String,
        /// The S3 error code when the store sent one (`SignatureDoesNotMatch`,
        /// `InvalidAccessKeyId`, `AccessDenied`...).
        code: Option<String>,
        #[source]
        source: Box<object_store::Error>,
    },
    /// The store answered that the target's bucket does not exist.
    #[error("{object}: bucket {bucket} does not exist on {endpoint}")]
    NoBucket {
        object: String,
        bucket: String,
        endpoint: String,
        #[source]
        source: Box<object_store::Error>,
    },
    /// No connection to the store (refused, timed out, no route, no such
    /// host), or no answer in time, after the retries of
    /// [`S3Settings`].
    #[error("{object}: cannot reach {endpoint}: {why}")]
    Unreachable {
        object: String,
        endpoint: String,
        /// What the connection attempt met: "connection refused", ...
        why: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("{object}: {source}")]
    Store {
        object: String,
        #[source]
        source: object_store::Error,
    },
}

fn code_in_parens(code: &Option<String>) -> String {
    code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
}

/// Retries of one request to an S3 store, by default (see
/// [`S3Settings::max_retries`]).
pub const DEFAULT_MAX_RETRIES: usize = 8;
/// By default, no request is retried once this long has passed since its
/// first attempt (see [`S3Settings::retry_timeout`]).
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one attempt waits for its connection, by default (see
/// [`S3Settings::connect_timeout`]).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach an S3-compatible store, beside its URL.
///
/// `S3Settings::default()` is AWS with the keys from the environment and
/// the default retries; set the fields wanted and the rest with
/// `..Default::default()`.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// `http(s)://HOST:PORT`; None: AWS itself.
    pub endpoint: Option<String>,
    /// A file of `KEY=VALUE` lines (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, optionally `AWS_REGION`); None: the
    /// environment.
    pub credentials_file: Option<PathBuf>,
    /// How many times one request is retried after a failure on the way
    /// (no connection, a timeout, a 5xx or 429 answer), with exponential
    /// backoff from 100 ms; 0: never. A refusal (wrong keys, no bucket, an
    /// object not found) is never retried. Default [`DEFAULT_MAX_RETRIES`]:
    /// a store restarting for a few seconds is ridden out.
    pub max_retries: usize,
    /// No retry is started once this long has passed since a request's
    /// first attempt. Default [`DEFAULT_RETRY_TIMEOUT`]. With the
    /// attempt running then, a request that cannot succeed fails within
    /// about this plus one attempt (at most [`S3Settings::connect_timeout`]
    /// when nothing answers; `object_store`'s 30 s limit on a request once
    /// connected).
    pub retry_timeout: Duration,
    /// How long one attempt waits for the TCP (and TLS) connection.
    /// Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            credentials_file: None,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_timeout: DEFAULT_RETRY_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// An S3 target's bucket and endpoint, for error messages.
#[derive(Clone, Debug)]
struct S3Place {
    bucket: String,
    endpoint: String,
}

/// An object listed with [`Target::list_objects`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the target's prefix.
    pub name: String,
    pub size: u64,
    pub modified_unix_ms: u64,
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
    /// None: a `file://` target.
    s3: Option<S3Place>,
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
                s3: None,
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
        let region = var("AWS_REGION").unwrap_or_else(|| "us-east-1".into());
        // Client options first: with_allow_http below sets one of them.
        let mut b = AmazonS3Builder::new()
            .with_client_options(ClientOptions::new().with_connect_timeout(s3.connect_timeout))
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: s3.max_retries,
                retry_timeout: s3.retry_timeout,
            })
            .with_bucket_name(bucket)
            .with_region(&region)
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
        let endpoint = match &s3.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        Ok(Target {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: url.to_string(),
            s3: Some(S3Place {
                bucket: bucket.to_string(),
                endpoint,
            }),
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

    /// What `e`, met on `name`, tells an operator: an S3 store's refusal
    /// of the keys, a missing bucket and no connection are told apart from
    /// an object not found and the rest.
    fn err(&self, name: &str, e: object_store::Error) -> TargetError {
        let object = format!("{}/{name}", self.url.trim_end_matches('/'));
        let Some(s3) = &self.s3 else {
            return match e {
                object_store::Error::NotFound { .. } => TargetError::NotFound { object },
                source => TargetError::Store { object, source },
            };
        };
        let endpoint = s3.endpoint.clone();
        // The S3 error code is in the answer's XML body, which object_store
        // keeps in the error's text (a HEAD's answer has none); a listing's
        // error comes as Generic, its status only in the text.
        let text = error_chain_text(&e);
        let code = s3_error_code(&text);
        let status = match &e {
            object_store::Error::NotFound { .. } => Some(404),
            object_store::Error::PermissionDenied { .. } => Some(403),
            object_store::Error::Unauthenticated { .. } => Some(401),
            _ => http_status(&text),
        };
        if code.as_deref() == Some("NoSuchBucket") {
            return TargetError::NoBucket {
                object,
                bucket: s3.bucket.clone(),
                endpoint,
                source: Box::new(e),
            };
        }
        if matches!(status, Some(401 | 403)) {
            return TargetError::AccessDenied {
                object,
                endpoint,
                code,
                source: Box::new(e),
            };
        }
        match e {
            object_store::Error::NotFound { .. } => TargetError::NotFound { object },
            source if status.is_none() => match unreachable_why(&source) {
                Some(why) => TargetError::Unreachable {
                    object,
                    endpoint,
                    why,
                    source: Box::new(source),
                },
                None => TargetError::Store { object, source },
            },
            source => TargetError::Store { object, source },
        }
    }

    /// Can the target be used? One request (a listing of the prefix, its
    /// first page): Ok when the store answers and lets these keys list the
    /// bucket; otherwise [`TargetError::Unreachable`],
    /// [`TargetError::AccessDenied`] or [`TargetError::NoBucket`] (a
    /// `file://` target: its directory's error). Worth asking before work
    /// that is costly to undo, such as taking a snapshot: the first
    /// requests of a backup are reads, which cannot tell a missing bucket
    /// from a missing object.
    pub async fn check(&self) -> Result<(), TargetError> {
        let base = (!self.prefix.is_empty()).then(|| Path::from(self.prefix.as_str()));
        match self.store.list(base.as_ref()).next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(self.err("", e)),
        }
    }

    /// Puts `name` unless it exists (create-if-absent).
    pub async fn put_new(&self, name: &str, bytes: Bytes) -> Result<Put, TargetError> {
        self.put_new_payload(name, PutPayload::from(bytes)).await
    }

    /// [`Self::put_new`] of the object that `parts` make one after the
    /// other, sent from their own buffers (a pack: its blocks' buffers).
    pub async fn put_new_parts(&self, name: &str, parts: Vec<Bytes>) -> Result<Put, TargetError> {
        self.put_new_payload(name, parts.into_iter().collect())
            .await
    }

    async fn put_new_payload(&self, name: &str, payload: PutPayload) -> Result<Put, TargetError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.store.put_opts(&self.path(name), payload, opts).await {
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
        Ok(self.info(name).await?.size)
    }

    /// The object's size and when it was last written, as a listing
    /// would give them.
    pub async fn info(&self, name: &str) -> Result<ObjectInfo, TargetError> {
        let meta = self
            .store
            .head(&self.path(name))
            .await
            .map_err(|e| self.err(name, e))?;
        Ok(ObjectInfo {
            name: name.to_string(),
            size: meta.size,
            modified_unix_ms: meta.last_modified.timestamp_millis().max(0) as u64,
        })
    }

    /// The names of the objects under `dir` (which ends with `/`).
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, TargetError> {
        Ok(self
            .list_objects(dir)
            .await?
            .into_iter()
            .map(|o| o.name)
            .collect())
    }

    /// Puts `name`, replacing it if it exists: only for leases, the one
    /// object of the format that changes (see [`crate::lease`]).
    pub async fn put_overwrite(&self, name: &str, bytes: Bytes) -> Result<(), TargetError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err(name, e))
    }

    /// The objects under `dir` (which ends with `/`) with their sizes and
    /// when they were last written.
    pub async fn list_objects(&self, dir: &str) -> Result<Vec<ObjectInfo>, TargetError> {
        let base = self.path(dir.trim_end_matches('/'));
        let metas: Vec<_> = self
            .store
            .list(Some(&base))
            .try_collect()
            .await
            .map_err(|e| self.err(dir, e))?;
        Ok(metas
            .into_iter()
            .map(|m| ObjectInfo {
                name: self.relative(&m.location),
                size: m.size,
                modified_unix_ms: m.last_modified.timestamp_millis().max(0) as u64,
            })
            .collect())
    }

    /// The names of the "directories" right under `dir` (which ends with
    /// `/`): one delimited LIST, not every object below.
    pub async fn list_dirs(&self, dir: &str) -> Result<Vec<String>, TargetError> {
        let base = self.path(dir.trim_end_matches('/'));
        let listed = self
            .store
            .list_with_delimiter(Some(&base))
            .await
            .map_err(|e| self.err(dir, e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// `location` relative to the target's prefix.
    fn relative(&self, location: &Path) -> String {
        let full = location.to_string();
        if self.prefix.is_empty() {
            return full;
        }
        full.strip_prefix(&format!("{}/", self.prefix))
            .unwrap_or(&full)
            .to_string()
    }

    /// Deletes `name`; an object already gone is no error (a missing
    /// bucket is).
    pub async fn delete(&self, name: &str) -> Result<(), TargetError> {
        match self.store.delete(&self.path(name)).await {
            Ok(()) => Ok(()),
            Err(e) => match self.err(name, e) {
                TargetError::NotFound { .. } => Ok(()),
                e => Err(e),
            },
        }
    }
}

/// `e` and its sources' messages, one after the other.
fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The `<Code>` of an S3 error answer found in `text`.
fn s3_error_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code = text[start..start + len].trim();
    (!code.is_empty() && code.len() <= 64).then(|| code.to_string())
}

/// The HTTP status of a failed answer, from object_store's text of it
/// ("Server returned non-2xx status code: 403 Forbidden: ...").
fn http_status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Why a request that got no answer from the store failed ("connection
/// refused", "connection timed out", ...), or None when it failed
/// otherwise. Only for an error without an HTTP status.
fn unreachable_why(e: &object_store::Error) -> Option<String> {
    use std::io::ErrorKind;
    // Transport errors come as Generic (object_store's RetryError).
    let object_store::Error::Generic { .. } = e else {
        return None;
    };
    let text = error_chain_text(e);
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(match io.kind() {
                ErrorKind::ConnectionRefused => "connection refused".to_string(),
                ErrorKind::TimedOut => "connection timed out".to_string(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
                    "connection reset".to_string()
                }
                _ => io.to_string(),
            });
        }
        source = s.source();
    }
    // Without an I/O error below it: reqwest's limit on a request (the
    // store took the connection but did not answer), or a connection
    // closed before the answer.
    if text.contains("timed out") {
        Some("no answer in time (timed out)".to_string())
    } else if text.contains("error sending request") || text.contains("connection closed") {
        Some("the connection closed before an answer".to_string())
    } else {
        None
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
            ..Default::default()
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
