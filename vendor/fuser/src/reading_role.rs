//! fusevol patch: one reader at a time; data requests pass the reading on.
//!
//! When every worker reads `/dev/fuse`, the kernel hands each request to the worker that
//! has waited longest: a caller doing one request at a time (`stat`, `unlink`, `create`
//! in a loop) meets a different, cache-cold thread each time, often on the other CPU.
//! Measured on a 2-CPU machine, one worker answered cold `stat`s 65% and `unlink`s 87%
//! faster than four, but made 4 KiB reads ~30% slower and buffered writes a quarter
//! slower: those need several requests in flight.
//!
//! With `Config::split_data`, the workers take turns at reading: the one holding the
//! [`ReadingRole`] reads. A metadata request it answers itself, keeping the role, so a
//! stream of metadata requests stays on one hot thread. On a data request (see
//! [`is_data_request`]: the ones that wait for the disk or move many bytes) it gives the
//! role up before answering, so another worker reads the next request
//! meanwhile; it takes the role again (waiting its turn) when done. Each request is still
//! answered by the thread that read it, from its own buffer, through its own channel: no
//! hand-over between threads on the request's path. (A first version handed data
//! requests to a pool: the extra wake-up per request cost 1-job 4 KiB reads a third.)
//!
//! Precondition: a metadata callback must never wait for another FUSE request to be
//! answered (a POSIX lock wait, a notification the kernel answers only after a request of
//! ours): no other worker reads while it holds the role. fusevol grants no POSIX locks and
//! sends no notification from a callback. Heavy metadata work (an unlink of a large file
//! whose chunks are deleted on the spot) holds the reading for its duration.
//!
//! Draining is unchanged: a worker waiting for the role is not reading; the one reading is
//! signalled, leaves, and gives the role to the next, which sees the drain and leaves too.

use parking_lot::{Mutex, MutexGuard};

use crate::ll::fuse_abi::fuse_opcode;

/// The right to read the next request, shared by a session's workers.
#[derive(Debug, Default)]
pub(crate) struct ReadingRole(Mutex<()>);

/// Held by the worker that reads; dropping it passes the role on.
pub(crate) type Role<'a> = MutexGuard<'a, ()>;

impl ReadingRole {
    /// Waits for the role.
    pub(crate) fn take(&self) -> Role<'_> {
        self.0.lock()
    }
}

/// Is the request in `bytes` one during which another worker should read? The ones that
/// wait for the disk or move many bytes: READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, LSEEK,
/// COPY_FILE_RANGE, and a SETATTR that changes the size (a truncation deletes every chunk
/// past the new end). Reads the opcode of the request's header (and a SETATTR's `valid`
/// bits); a request too short to have them is not.
pub(crate) fn is_data_request(bytes: &[u8]) -> bool {
    let word = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let Some(op) = word(4) else {
        return false;
    };
    match fuse_opcode::try_from(op) {
        Ok(
            fuse_opcode::FUSE_READ
            | fuse_opcode::FUSE_WRITE
            | fuse_opcode::FUSE_FSYNC
            | fuse_opcode::FUSE_FSYNCDIR
            | fuse_opcode::FUSE_FALLOCATE
            | fuse_opcode::FUSE_LSEEK
            | fuse_opcode::FUSE_COPY_FILE_RANGE,
        ) => true,
        // `fuse_setattr_in.valid` follows the 40-byte `fuse_in_header`.
        Ok(fuse_opcode::FUSE_SETATTR) => word(IN_HEADER).is_some_and(|valid| valid & FATTR_SIZE != 0),
        _ => false,
    }
}

/// Size of `fuse_in_header`.
const IN_HEADER: usize = 40;
/// `FATTR_SIZE` of `fuse_setattr_in.valid`.
const FATTR_SIZE: u32 = 1 << 3;

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: u32) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        b[4..8].copy_from_slice(&op.to_ne_bytes());
        b
    }

    #[test]
    fn data_requests_are_told_from_metadata() {
        for op in [15u32, 16, 20, 30, 43, 46, 47] {
            assert!(is_data_request(&header(op)), "opcode {op}");
        }
        // LOOKUP, GETATTR, SETATTR (times only), UNLINK, RELEASE, FLUSH, CREATE, DESTROY,
        // READDIRPLUS
        for op in [1u32, 3, 4, 10, 18, 25, 35, 38, 44] {
            assert!(!is_data_request(&header(op)), "opcode {op}");
        }
        let mut truncate = header(4);
        truncate.extend_from_slice(&(FATTR_SIZE | 1).to_ne_bytes());
        assert!(is_data_request(&truncate));
        assert!(!is_data_request(&[0u8; 6]));
    }
}
