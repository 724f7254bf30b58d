//! The control socket: how `fusevol volume ...` reaches a store that another process
//! owns (RocksDB allows one process per database). The owning process listens on
//! `DIR/control.sock` (mode 0600); a request is one JSON line, the answer one JSON line.
//! The same [`dispatch`] runs the request when the CLI owns the store itself, so both
//! paths behave identically.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::store::{self, Store, VolumeInfo, CONTROL_SOCKET};

/// A volume-management request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    List,
    Inspect {
        name: String,
    },
    Create {
        name: String,
        quota: Option<u64>,
        inodes: Option<u64>,
        /// Absent from older clients: none.
        #[serde(default, skip_serializing_if = "store::Compression::is_none")]
        compression: store::Compression,
        /// Absent from older clients: none.
        #[serde(default, skip_serializing_if = "store::Encryption::is_none")]
        encryption: store::Encryption,
        /// The master key of an encrypted volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<SecretHex>,
    },
    Resize {
        name: String,
        /// `Some(None)` removes the quota.
        quota: Option<Option<u64>>,
        inodes: Option<Option<u64>>,
    },
    Delete {
        name: String,
    },
    /// Compare and repair the copies of a replicated volume the owner serves.
    Scrub {
        name: String,
    },
    Metrics,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Volumes(Vec<VolumeInfo>),
    Volume(VolumeInfo),
    Scrub(store::ScrubReport),
    Done,
    Text(String),
    /// An error, as servers before the error kinds sent it (still understood).
    Error(String),
    /// An error with its stable kind (see [`crate::store::Error::kind`]).
    Failed {
        kind: String,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("store {0} is in use by another process, and its control socket does not answer: {1}")]
    Unreachable(PathBuf, std::io::Error),
    #[error("control socket: {0}")]
    Protocol(String),
}

/// A master key on the wire (hex); never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretHex(String);

impl std::fmt::Debug for SecretHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHex(..)")
    }
}

impl SecretHex {
    pub fn of(key: &store::MasterKey) -> SecretHex {
        SecretHex(key.to_hex().to_string())
    }
}

fn create(
    store: &Store,
    name: &str,
    quota: Option<u64>,
    inodes: Option<u64>,
    compression: store::Compression,
    encryption: store::Encryption,
    key: Option<SecretHex>,
) -> Result<Response, store::Error> {
    let key = key
        .map(|k| store::MasterKey::from_bytes(k.0.as_bytes()))
        .transpose()?;
    let encryption = match (encryption, key) {
        (store::Encryption::None, None) => None,
        (store::Encryption::Aes256Gcm, Some(key)) => Some(key),
        _ => {
            return Err(store::Error::Unsupported(
                "encryption aes-256-gcm and a key go together".into(),
            ))
        }
    };
    let new = store::NewVolume {
        quota,
        inode_limit: inodes,
        compression,
        encryption,
    };
    store.create_volume_with(name, &new).map(Response::Volume)
}

/// Runs a request against an open store.
pub fn dispatch(store: &Store, metrics: Option<&Metrics>, req: Request) -> Response {
    let r: Result<Response, store::Error> = match req {
        Request::List => store.list_volumes().map(Response::Volumes),
        Request::Inspect { name } => store.inspect_volume_measured(&name).map(Response::Volume),
        Request::Create {
            name,
            quota,
            inodes,
            compression,
            encryption,
            key,
        } => create(store, &name, quota, inodes, compression, encryption, key),
        Request::Resize {
            name,
            quota,
            inodes,
        } => store
            .resize_volume(&name, quota, inodes)
            .map(Response::Volume),
        Request::Delete { name } => store.delete_volume(&name).map(|_| Response::Done),
        Request::Scrub { name } => scrub(store, &name),
        Request::Metrics => Ok(Response::Text(
            metrics.map(|m| m.render()).unwrap_or_default(),
        )),
    };
    r.unwrap_or_else(|e| Response::Failed {
        kind: e.kind().into(),
        message: e.to_string(),
    })
}

/// A scrub asked through the socket: progress in the owner's log every 10 seconds.
fn scrub(store: &Store, name: &str) -> Result<Response, store::Error> {
    let mut last = std::time::Instant::now();
    let mut progress = |r: &store::ScrubReport| {
        if last.elapsed() >= Duration::from_secs(10) {
            last = std::time::Instant::now();
            tracing::info!(volume = %r.volume, keys = r.keys, bytes = r.bytes, repaired = r.repaired, "scrub under way");
        }
    };
    let report = store::scrub_open(store, name, &mut progress)?;
    tracing::info!(volume = %report.volume, keys = report.keys, bytes = report.bytes,
        repaired = report.repaired, unreadable = report.unreadable, "scrub done");
    Ok(Response::Scrub(report))
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// Serves the control socket of `store` on a background thread for the life of the process.
pub fn serve(store: Store, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let path = socket_path(store.dir());
    // We hold the store lock, so an existing socket file is left over from a dead owner.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = handle(&store, &metrics, c) {
                            tracing::warn!(error = %e, "control request failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(())
}

fn handle(store: &Store, metrics: &Metrics, conn: UnixStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => dispatch(store, Some(metrics), req),
        Err(e) => Response::Failed {
            kind: "bad_request".into(),
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&conn).write_all(&out)
}

/// Sends a request to the process that owns the store in `dir`.
pub fn call(dir: &Path, req: &Request) -> Result<Response, ControlError> {
    // A scrub reads the whole volume: as long as that takes.
    let timeout = match req {
        Request::Scrub { .. } => None,
        _ => Some(Duration::from_secs(120)),
    };
    let path = socket_path(dir);
    let unreachable = |e| ControlError::Unreachable(dir.to_path_buf(), e);
    let conn = UnixStream::connect(&path).map_err(unreachable)?;
    conn.set_read_timeout(timeout).map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&conn).write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(unreachable)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(format!("bad answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn requests_round_trip_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), &StoreOptions::default()).unwrap();
        store.create_volume("v", Some(1 << 20), None).unwrap();
        serve(store.clone(), Arc::new(Metrics::new())).unwrap();
        let r = call(
            dir.path(),
            &Request::Resize {
                name: "v".into(),
                quota: Some(Some(2 << 20)),
                inodes: None,
            },
        )
        .unwrap();
        match r {
            Response::Volume(v) => assert_eq!(v.quota_bytes, Some(2 << 20)),
            other => panic!("unexpected {other:?}"),
        }
        match call(
            dir.path(),
            &Request::Inspect {
                name: "nope".into(),
            },
        )
        .unwrap()
        {
            Response::Failed { kind, message } => {
                assert_eq!(kind, "volume_not_found");
                assert!(message.contains("does not exist"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
