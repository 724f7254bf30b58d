//! Extended attributes: one key per (inode, name), value stored as is.
//!
//! Limits follow Linux: names of at most 255 bytes (ERANGE beyond), values of at most
//! 64 KiB (E2BIG). Namespaces `user.`, `trusted.` and `security.` are stored; `system.`
//! (POSIX ACLs) is not supported. Setting or removing an attribute updates ctime.

use super::{Change, Fs, FsError, Result, Timestamp};
use crate::store::key_codec::{self as keys, Ino};

pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;
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

impl Fs {
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        let _g = self.locks.lock(&[ino]);
        let mut r = self.load(ino)?;
        let key = keys::xattr_key(self.vid(), ino, name);
        let exists = self.store.get_meta(&key)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoData);
        }
        let mut c = Change::new();
        c.batch.put_cf(self.store.meta(), key, value);
        if name == SECURITY_CAPABILITY {
            r.flags |= super::FLAG_HAS_CAPS;
        }
        r.ctime = Timestamp::now();
        self.stage_inode(&mut c, ino, &r);
        self.commit(c)
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<XattrReply> {
        check_xattr_name(name)?;
        match self
            .store
            .get_meta(&keys::xattr_key(self.vid(), ino, name))?
        {
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
        self.store
            .scan_meta(&keys::xattr_prefix(self.vid(), ino), |k, _| {
                let (_, name) = keys::parse_xattr_key(self.vid(), k)?;
                out.extend_from_slice(&name);
                out.push(0);
                Ok(true)
            })?;
        sized(out, size)
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        let _g = self.locks.lock(&[ino]);
        let mut r = self.load(ino)?;
        let key = keys::xattr_key(self.vid(), ino, name);
        if self.store.get_meta(&key)?.is_none() {
            return Err(FsError::NoData);
        }
        let mut c = Change::new();
        c.batch.delete_cf(self.store.meta(), key);
        if name == SECURITY_CAPABILITY {
            r.flags &= !super::FLAG_HAS_CAPS;
        }
        r.ctime = Timestamp::now();
        self.stage_inode(&mut c, ino, &r);
        self.commit(c)
    }
}
