//! Extended attributes: one key per (inode, name), value stored as is.
//!
//! Limits follow Linux: names of at most 255 bytes (ERANGE beyond), values of at most
//! 64 KiB (E2BIG). Namespaces `user.`, `trusted.` and `security.` are stored; `system.`
//! (POSIX ACLs) is not supported. Setting or removing an attribute updates ctime.
//!
//! Space per inode is bounded, as on every Linux filesystem (ext4 without `ea_inode`
//! keeps all of an inode's attributes in one 4 KiB block): names and values together at
//! most [`XATTR_INODE_MAX`] bytes, and the name list at most [`XATTR_LIST_MAX`] bytes, so
//! `listxattr(2)` can always return it. A set that would pass either fails with ENOSPC,
//! like ext4 when the block is full. Each attribute is charged to the volume's usage
//! ([`super::charge::xattr_charge`]), so attributes count toward the quota as well.

use super::charge::xattr_charge;
use super::{Fs, FsError, Req, Result, Timestamp};
use crate::store::codec::Ino;

pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;
/// Largest name list of one inode: the most `listxattr(2)` returns (Linux's
/// `XATTR_LIST_MAX`; each name counts with its terminating NUL).
pub const XATTR_LIST_MAX: usize = 65536;
/// Most name and value bytes of all attributes of one inode: room for one value of the
/// largest size Linux allows ([`XATTR_SIZE_MAX`]) and as much again for all others
/// (ext4 allows 4 KiB per inode, 64 KiB per value with `ea_inode`; XFS is unbounded).
pub const XATTR_INODE_MAX: usize = 2 * XATTR_SIZE_MAX;
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;
pub const SECURITY_CAPABILITY: &[u8] = b"security.capability";

/// Answer to a get/list call: the size when the caller asked for it (size 0), or the bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.is_empty() {
        return Err(FsError::Invalid);
    }
    if name.len() > XATTR_NAME_MAX {
        return Err(FsError::Range);
    }
    let supported = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len());
    if !supported {
        return Err(FsError::NotSupported);
    }
    Ok(())
}

fn sized(bytes: Vec<u8>, size: u32) -> Result<XattrReply> {
    if size == 0 {
        return Ok(XattrReply::Size(bytes.len() as u32));
    }
    if bytes.len() > size as usize {
        return Err(FsError::Range);
    }
    Ok(XattrReply::Data(bytes))
}

/// What the attributes of one inode hold, apart from the one being set.
#[derive(Debug, Default)]
struct InodeXattrs {
    /// Name and value bytes of the other attributes.
    bytes: usize,
    /// Length of the other attributes' name list (names with their NULs).
    list: usize,
    /// Value length of the attribute being set, if it exists.
    existing: Option<usize>,
}

impl Fs {
    /// Sums the attributes of `ino`, telling apart the one named `name`.
    fn inode_xattrs(&self, ino: Ino, name: &[u8]) -> Result<InodeXattrs> {
        let mut x = InodeXattrs::default();
        self.view().xattrs(ino, |n, v| {
            if n == name {
                x.existing = Some(v.len());
            } else {
                x.bytes += n.len() + v.len();
                x.list += n.len() + 1;
            }
        })?;
        Ok(x)
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.setxattr_as(None, ino, name, value, flags)
    }

    /// [`Fs::setxattr`] as the answer to `req` (recorded with it).
    pub(super) fn setxattr_as(
        &self,
        req: Option<Req>,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let _g = self.locks.lock(&[ino]);
        let mut r = self.load(ino)?;
        let others = self.inode_xattrs(ino, name)?;
        if flags & XATTR_CREATE != 0 && others.existing.is_some() {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && others.existing.is_none() {
            return Err(FsError::NoData);
        }
        if others.bytes + name.len() + value.len() > XATTR_INODE_MAX
            || others.list + name.len() + 1 > XATTR_LIST_MAX
        {
            return Err(FsError::NoSpace);
        }
        let mut c = self.change();
        c.txn.usage.bytes += xattr_charge(name.len(), value.len()) as i64;
        if let Some(old) = others.existing {
            c.txn.usage.bytes -= xattr_charge(name.len(), old) as i64;
        }
        c.txn.put_xattr(ino, name, value);
        if name == SECURITY_CAPABILITY {
            r.flags |= super::FLAG_HAS_CAPS;
        }
        r.ctime = Timestamp::now();
        self.stage_inode(&mut c, ino, &r);
        self.stage_answer(&mut c, req, 0);
        self.commit(c)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<XattrReply> {
        check_xattr_name(name)?;
        match self.view().xattr(ino, name)? {
            Some(v) => sized(v, size),
            None => {
                // Tell a missing inode apart from a missing attribute.
                self.load(ino)?;
                Err(FsError::NoData)
            }
        }
    }

    /// Names of all attributes, each NUL-terminated, as `listxattr(2)` returns them.
    pub fn listxattr(&self, ino: Ino, size: u32) -> Result<XattrReply> {
        self.load(ino)?;
        let mut out = Vec::new();
        self.view().xattrs(ino, |name, _| {
            out.extend_from_slice(name);
            out.push(0);
        })?;
        sized(out, size)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.removexattr_as(None, ino, name)
    }

    /// [`Fs::removexattr`] as the answer to `req` (recorded with it).
    pub(super) fn removexattr_as(&self, req: Option<Req>, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        let _g = self.locks.lock(&[ino]);
        let mut r = self.load(ino)?;
        let Some(old) = self.view().xattr(ino, name)? else {
            return Err(FsError::NoData);
        };
        let mut c = self.change();
        c.txn.usage.bytes -= xattr_charge(name.len(), old.len()) as i64;
        c.txn.delete_xattr(ino, name);
        if name == SECURITY_CAPABILITY {
            r.flags &= !super::FLAG_HAS_CAPS;
        }
        r.ctime = Timestamp::now();
        self.stage_inode(&mut c, ino, &r);
        self.stage_answer(&mut c, req, 0);
        self.commit(c)
    }
}
