//! The daemon's unix socket (`--listen-unix PATH`): a second way to reach
//! the same gRPC services, for an engine on the same node (decision 64).
//! This module owns the socket file: binding it (a missing directory is
//! made owner-only; a stale file from an earlier run is removed, a live
//! one or a file that is not a socket is left alone and refused), its mode
//! (0600: only the daemon's user may connect — no TLS on this socket, the
//! file's and its directory's permissions are the authentication), the
//! stream of accepted connections tonic serves, and removing the file when
//! the daemon stops.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::Stream;
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::error::ReplicaError;

/// Mode of the socket file: read and write (connect) for the owner only.
pub const SOCKET_MODE: u32 = 0o600;
/// Mode of a socket directory the daemon makes.
pub const DIR_MODE: u32 = 0o700;
/// The longest path a unix socket may have on Linux (`sun_path` holds 108
/// bytes with the terminating NUL).
pub const MAX_PATH_LEN: usize = 107;
/// Connections waiting to be accepted.
const BACKLOG: u32 = 1024;

/// A bound unix socket and its file, removed when this is dropped (unless
/// another process has put its own socket at the path meanwhile).
pub struct UnixSocket {
    listener: Option<UnixListener>,
    file: SocketFile,
}

struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the file this daemon bound.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn listen_err(path: &Path, source: io::Error) -> ReplicaError {
    ReplicaError::Listen {
        addr: format!("unix socket {}", path.display()),
        source,
    }
}

impl UnixSocket {
    /// Bind `path` (see the module's docs). Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, ReplicaError> {
        let len = path.as_os_str().len();
        if len > MAX_PATH_LEN {
            return Err(listen_err(
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the path is {len} bytes; a unix socket's may have at most {MAX_PATH_LEN}"
                    ),
                ),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)
                .map_err(|e| listen_err(path, e))?;
        }
        remove_stale(path).map_err(|e| listen_err(path, e))?;
        // Bound, made owner-only, and only then listening: a connection
        // attempt before the mode is set is refused, never queued.
        let socket = tokio::net::UnixSocket::new_stream().map_err(|e| listen_err(path, e))?;
        socket.bind(path).map_err(|e| listen_err(path, e))?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| listen_err(path, e))?;
        // From here on a failure removes the file again.
        let file = SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(|e| listen_err(path, e))?;
        let listener = socket.listen(BACKLOG).map_err(|e| listen_err(path, e))?;
        Ok(UnixSocket {
            listener: Some(listener),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The connections accepted on the socket, for
    /// `tonic::transport::Server::serve_with_incoming*` (a failed accept —
    /// out of file descriptors — is logged and retried after a pause, never
    /// in a tight loop). Taken once; the file stays until `self` is dropped.
    pub fn incoming(&mut self) -> Option<impl Stream<Item = io::Result<UnixStream>> + use<>> {
        let listener = self.listener.take()?;
        Some(futures::stream::unfold(listener, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => return Some((Ok::<_, io::Error>(stream), listener)),
                    Err(e) => {
                        warn!(error = %e, "accepting a unix-socket connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }))
    }
}

/// Remove a socket left at `path` by an earlier run. Refuses a socket some
/// process still serves on, and anything that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket: not removing it",
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves on this socket",
        ));
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_owner_only_replaces_a_stale_one_and_goes_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sockets").join("replica.sock");
        // A stale socket of an earlier run: bound, then its listener gone.
        std::fs::create_dir(dir.path().join("sockets")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());

        let socket = UnixSocket::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, SOCKET_MODE);
        // A second daemon on the same path is refused; the first keeps it.
        let err = UnixSocket::bind(&path).err().unwrap().to_string();
        assert!(err.contains("another process serves"), "{err}");
        assert!(path.exists());
        drop(socket);
        assert!(!path.exists(), "removed at the end");
    }

    #[tokio::test]
    async fn a_missing_directory_is_made_owner_only_and_a_plain_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new").join("replica.sock");
        let socket = UnixSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(dir.path().join("new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, DIR_MODE);
        drop(socket);

        let long = dir.path().join("x".repeat(MAX_PATH_LEN));
        let err = UnixSocket::bind(&long).err().unwrap().to_string();
        assert!(err.contains("at most 107"), "{err}");

        let file = dir.path().join("data");
        std::fs::write(&file, b"not a socket").unwrap();
        let err = UnixSocket::bind(&file).err().unwrap().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
    }
}
