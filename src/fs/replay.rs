//! Answering a request that the kernel sends again after a server restart, without
//! carrying it out twice.
//!
//! A server that dies (or hands its connection over) may have committed an operation
//! without answering it. The next server has the kernel send every unanswered request
//! again (`FUSE_NOTIFY_RESEND`, see [`crate::mount`]), marked by bit 63 of its `unique`.
//! Carried out a second time, a committed mkdir would fail with EEXIST, an unlink with
//! ENOENT, and an exchange would swap back. So every operation that is not idempotent
//! puts, into the `WriteBatch` that commits it, a [`ReplayRecord`] of the request's
//! `unique` and what it answered, in one slot of a small per-volume ring
//! ([`RING_SLOTS`] slots, [`crate::store::codec::replay_key`]; its bytes are part of the volume's
//! fixed overhead, not charged to the quota). A resent request whose record is found
//! is answered from it: the same success, nothing done again (an entry's attributes are
//! read again from its inode). Only resent requests look the ring up; every other
//! recorded request pays one small put in its own batch.
//!
//! Connections: unique numbers start again on every new FUSE connection. Each fresh
//! mount takes the volume's next mount generation ([`crate::store::codec::mount_gen_key`]); the fd
//! holder keeps it with the connection and hands it to the server that takes the
//! connection over ([`Fs::adopt`]). A record answers only a request of its own
//! generation, with the same unique, operation and arguments (a fingerprint of them).
//!
//! Recorded (through [`Answering`]): `create_node` (mknod, mkdir, symlink, and create
//! with or without O_EXCL), `link`, `unlink`, `rmdir`, `rename` (also with
//! RENAME_NOREPLACE and RENAME_EXCHANGE), `setxattr` and `removexattr`.
//!
//! Not covered:
//! - Idempotent operations are not recorded: running them again leaves the same state
//!   and answer. `write` (the same bytes at the same offset), `setattr` (absolute values;
//!   a time set to "now" becomes the second run's now), `fallocate` (only allocation and
//!   hole punching exist), `open`, `release`, `fsync` and everything that only reads.
//!   One caveat: such a request, run again after a later request that the dead server
//!   answered changed the same thing (two unanswered-then-answered writes to one range),
//!   lands after it. The kernel had both in flight at once, so either order is allowed.
//! - Failures are not recorded: an operation that failed committed nothing, and runs
//!   again.
//! - A record that was overwritten: a slot is taken over by the recorded request
//!   `2 * RING_SLOTS` uniques later (the kernel numbers requests 2, 4, 6, ...), so a
//!   request is answered from its record only if the dead server recorded fewer than
//!   about [`RING_SLOTS`] requests after it. It then runs again, as without the ring.
//! - A connection held for a server that recorded no mount generation (an older
//!   version): nothing is recorded or replayed until its next fresh mount.
//! - An entry whose inode is gone by the time of the resend (another request removed
//!   it): the request runs again.

use super::xattr::{XATTR_CREATE, XATTR_REPLACE};
use super::{Attr, Caller, Change, Fs, Place, Result};
use crate::fnv::fnv1a64;
use crate::store::codec::{Ino, ReplayRecord};
use crate::store::OpenVolume;

/// Slots of a volume's ring of recent answers. Each holds one [`ReplayRecord`] (a 7-byte
/// key, a 34-byte value, an 8-byte trailer), so a volume's ring is at most ~6 KiB, a
/// fixed overhead that the quota does not charge ([`super::charge::VOLUME_OVERHEAD_MAX`]).
/// A request is lost to replay only if `2 * RING_SLOTS` later uniques (every request
/// counts) recorded an answer between its commit and the server's death: the window is
/// the few microseconds between a commit and its reply.
pub const RING_SLOTS: u64 = 128;
/// The bit the kernel sets in the `unique` of a request it sends again.
pub const RESENT: u64 = 1 << 63;

/// A FUSE request's unique id, as the kernel sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unique(pub u64);

impl Unique {
    /// Sent again after `FUSE_NOTIFY_RESEND`: the previous server may have done it.
    pub fn is_resent(self) -> bool {
        self.0 & RESENT != 0
    }

    /// The id without the resent mark: the same for the first and every later sending.
    fn id(self) -> u64 {
        self.0 & !RESENT
    }

    /// The ring slot of this request. The kernel's uniques are even (odd ones are
    /// interrupts), so the slot counts by twos.
    fn slot(self) -> u16 {
        ((self.id() >> 1) % RING_SLOTS) as u16
    }
}

/// The operations that are recorded (stored as one byte: never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum OpKind {
    CreateNode = 1,
    Link = 2,
    Unlink = 3,
    Rmdir = 4,
    Rename = 5,
    SetXattr = 6,
    RemoveXattr = 7,
}

/// An operation with a fingerprint of its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    kind: OpKind,
    fingerprint: u64,
}

impl Op {
    fn new(kind: OpKind, inos: &[Ino], names: &[&[u8]], flags: u64) -> Op {
        let mut bytes = Vec::with_capacity(64);
        for ino in inos {
            bytes.extend_from_slice(&ino.to_be_bytes());
        }
        for name in names {
            // Length first: ("ab", "c") and ("a", "bc") differ.
            bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
            bytes.extend_from_slice(name);
        }
        bytes.extend_from_slice(&flags.to_be_bytes());
        Op {
            kind,
            fingerprint: fnv1a64(bytes),
        }
    }
}

/// A request that records its answer: its unique id and operation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Req {
    unique: Unique,
    op: Op,
}

/// The namespace operations of an [`Fs`] as answers to one FUSE request: a resent request
/// is answered from its record, any other is carried out and its answer recorded in the
/// same batch (see the module doc). The plain [`Fs`] methods are the same operations for
/// callers that are no FUSE request (tools, tests): nothing recorded.
pub struct Answering<'a> {
    fs: &'a Fs,
    unique: Unique,
}

impl Fs {
    /// The operations of [`Answering`] as answers to request `unique`.
    pub fn answering(&self, unique: Unique) -> Answering<'_> {
        Answering { fs: self, unique }
    }

    /// The mount generation of the connection this filesystem serves (to hand to the fd
    /// holder with it); `None` if unknown (nothing is recorded).
    pub fn mount_generation(&self) -> Option<u64> {
        self.generation
    }

    /// The record of resent request `req`, if this connection recorded it.
    fn recorded(&self, req: Req) -> Result<Option<ReplayRecord>> {
        let Some(generation) = self.generation else {
            return Ok(None);
        };
        if !req.unique.is_resent() {
            return Ok(None);
        }
        let Some(r) = self.view().replay(req.unique.slot())? else {
            return Ok(None);
        };
        let r = match r {
            Ok(r) => r,
            Err(error) => {
                // Only a replay is lost: run the request again, as without the ring.
                tracing::warn!(volume = %self.vol.name, %error, "unreadable replay record");
                return Ok(None);
            }
        };
        let hit = r.generation == generation
            && r.unique == req.unique.id()
            && r.op == req.op.kind as u8
            && r.fingerprint == req.op.fingerprint;
        if hit {
            tracing::info!(volume = %self.vol.name, unique = req.unique.0, op = ?req.op.kind, "answered a resent request from its record");
        }
        Ok(hit.then_some(r))
    }

    /// Stages the record of `req`'s answer (`ino`: the inode of a new entry, else 0) into
    /// the operation's own batch.
    pub(super) fn stage_answer(&self, c: &mut Change, req: Option<Req>, ino: Ino) {
        let (Some(req), Some(generation)) = (req, self.generation) else {
            return;
        };
        let record = ReplayRecord {
            generation,
            unique: req.unique.id(),
            op: req.op.kind as u8,
            fingerprint: req.op.fingerprint,
            ino,
        };
        c.txn.put_replay(req.unique.slot(), &record);
    }
}

/// Takes the next mount generation of volume `vol` for a fresh mount (a new connection).
/// Not synced: a record of this generation is written after it, so none outlives it.
pub(super) fn next_mount_generation(vol: &OpenVolume) -> Result<u64> {
    let last = vol.view().mount_generation()?.transpose()?.unwrap_or(0);
    let generation = last + 1;
    let mut txn = vol.txn();
    txn.set_mount_generation(generation);
    txn.commit()?;
    Ok(generation)
}

impl Answering<'_> {
    fn req(&self, op: Op) -> Req {
        let fingerprint = self.fs.volume().keyed_fingerprint(op.fingerprint);
        Req {
            unique: self.unique,
            op: Op { fingerprint, ..op },
        }
    }

    /// The answer recorded for this request if it was resent and had made an entry whose
    /// inode is still there.
    fn replayed_entry(&self, req: Req) -> Result<Option<Attr>> {
        match self.fs.recorded(req)? {
            Some(r) => Ok(self
                .fs
                .load_opt(r.ino)?
                .map(|rec| Attr::from_record(r.ino, &rec))),
            None => Ok(None),
        }
    }

    fn replayed(&self, req: Req) -> Result<bool> {
        Ok(self.fs.recorded(req)?.is_some())
    }

    /// [`Fs::create_node`].
    pub fn create_node(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        let req = self.req(Op::new(
            OpKind::CreateNode,
            &[parent],
            &[name],
            u64::from(mode),
        ));
        if let Some(attr) = self.replayed_entry(req)? {
            return Ok(attr);
        }
        self.fs
            .create_node_as(Some(req), caller, parent, name, mode, rdev, target)
    }

    /// [`Fs::link`].
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        let req = self.req(Op::new(OpKind::Link, &[ino, parent], &[name], 0));
        if let Some(attr) = self.replayed_entry(req)? {
            return Ok(attr);
        }
        self.fs.link_as(Some(req), ino, parent, name)
    }

    /// [`Fs::unlink`].
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let req = self.req(Op::new(OpKind::Unlink, &[parent], &[name], 0));
        if self.replayed(req)? {
            return Ok(());
        }
        self.fs.unlink_as(Some(req), parent, name)
    }

    /// [`Fs::rmdir`].
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let req = self.req(Op::new(OpKind::Rmdir, &[parent], &[name], 0));
        if self.replayed(req)? {
            return Ok(());
        }
        self.fs.rmdir_as(Some(req), parent, name)
    }

    /// [`Fs::rename`].
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        let op = Op::new(
            OpKind::Rename,
            &[parent, new_parent],
            &[name, new_name],
            u64::from(flags),
        );
        let req = self.req(op);
        if self.replayed(req)? {
            return Ok(());
        }
        let from = Place { dir: parent, name };
        let to = Place {
            dir: new_parent,
            name: new_name,
        };
        self.fs.rename_as(Some(req), from, to, flags)
    }

    /// [`Fs::setxattr`]. Recorded only with XATTR_CREATE or XATTR_REPLACE: without,
    /// setting the same value again is the same answer.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        if flags & (XATTR_CREATE | XATTR_REPLACE) == 0 {
            return self.fs.setxattr(ino, name, value, flags);
        }
        // The value is not in the fingerprint: a resent request carries the same one.
        let op = Op::new(OpKind::SetXattr, &[ino], &[name], u64::from(flags as u32));
        let req = self.req(op);
        if self.replayed(req)? {
            return Ok(());
        }
        self.fs.setxattr_as(Some(req), ino, name, value, flags)
    }

    /// [`Fs::removexattr`].
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        let req = self.req(Op::new(OpKind::RemoveXattr, &[ino], &[name], 0));
        if self.replayed(req)? {
            return Ok(());
        }
        self.fs.removexattr_as(Some(req), ino, name)
    }
}

#[cfg(test)]
mod tests;
