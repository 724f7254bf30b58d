//! The data path: file bytes in fixed-size chunks.
//!
//! Chunk `i` of a file holds bytes `[i*cs, (i+1)*cs)`. Each stored chunk has a length in
//! the chunk-length index (`L` keys): the bytes of the chunk that count as stored data
//! (what the quota and `st_blocks` see). The chunk value itself may be shorter than
//! that length, the rest reads as zeros: this is how `fallocate` reserves space without
//! writing zeros, and how a write into the middle of an empty chunk avoids storing the
//! gap twice. A chunk with no length key is a hole. Usage counts a chunk's length plus
//! [`CHUNK_CHARGE`] for its keys (see [`super::charge`]); `st_blocks` only its length.
//!
//! A write touches only the chunks it covers: a chunk it covers entirely is replaced
//! without being read (sequential streaming needs no read-modify-write); a partly
//! covered chunk gets a patch (a RocksDB merge operand holding only the written bytes),
//! so a 4 KiB overwrite neither reads nor rewrites its 64 KiB chunk. RocksDB applies the
//! patches when the chunk is read and folds them into the chunk at compaction. An
//! encrypted volume's chunks are sealed in 4 KiB blocks (see `crate::store`'s crypt): a
//! patch there covers whole blocks, the partly written first and last ones read first.

use super::charge::CHUNK_CHARGE;
use super::{Change, Fs, FsError, Result, Timestamp, MAX_FILE_SIZE};
use crate::store::codec::{Ino, InodeRecord, Kind};

/// `fallocate` mode bits (from `linux/falloc.h`).
pub const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;

/// Which end of a region `lseek` looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

impl Fs {
    fn chunk_span(&self, idx: u64) -> (u64, u64) {
        (idx * self.chunk_size, (idx + 1) * self.chunk_size)
    }

    /// Stored lengths of chunks `first..=last` that exist, in order.
    pub(super) fn chunk_lens(&self, ino: Ino, first: u64, last: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self.view().chunk_lens(ino, first, last)?)
    }

    fn get_chunk(&self, ino: Ino, idx: u64) -> Result<Vec<u8>> {
        Ok(self.view().chunk(ino, idx)?)
    }

    fn stage_chunk(
        &self,
        c: &mut Change,
        ino: Ino,
        idx: u64,
        bytes: &[u8],
        len: u64,
        old_len: Option<u64>,
    ) {
        c.txn.put_chunk(ino, idx, bytes);
        self.stage_chunk_len(c, ino, idx, len, old_len);
    }

    /// Stages the stored length of chunk `idx` and counts the change in usage.
    fn stage_chunk_len(&self, c: &mut Change, ino: Ino, idx: u64, len: u64, old_len: Option<u64>) {
        c.txn.put_chunk_len(ino, idx, len);
        count_chunk_len(c, len, old_len);
    }

    /// Stages `bytes` at `offset` inside chunk `idx` without reading it (a merge operand,
    /// see [`crate::store::codec::merge_chunk`]); the stored length becomes `len`.
    #[allow(clippy::too_many_arguments)]
    fn stage_chunk_patch(
        &self,
        c: &mut Change,
        ino: Ino,
        idx: u64,
        offset: u32,
        bytes: &[u8],
        len: u64,
        old_len: Option<u64>,
    ) {
        c.txn.patch_chunk(ino, idx, offset, bytes);
        self.stage_chunk_len(c, ino, idx, len, old_len);
    }

    fn stage_drop_chunk(&self, c: &mut Change, ino: Ino, idx: u64, old_len: u64) {
        c.txn.delete_chunk(ino, idx);
        c.txn.delete_chunk_len(ino, idx);
        c.data -= old_len as i64;
        c.txn.usage.bytes -= (old_len + CHUNK_CHARGE) as i64;
        c.txn.usage.chunks -= 1;
    }

    fn file_record(&self, ino: Ino) -> Result<InodeRecord> {
        let r = self.load(ino)?;
        match r.kind {
            Kind::File => Ok(r),
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }

    /// Writes `data` at `offset`; returns the number of bytes written (all of them, or
    /// an error that changed nothing). `kill_privs`: the writer is unprivileged, so
    /// set-id bits and capabilities are dropped (FUSE_HANDLE_KILLPRIV_V2).
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8], kill_privs: bool) -> Result<u32> {
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let _g = self.locks.lock(&[ino]);
        let mut r = self.file_record(ino)?;
        let cs = self.chunk_size;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let lens = self.chunk_lens(ino, first, last)?;
        let mut lens = lens.into_iter().peekable();
        let mut c = self.change();
        let granule = self.view().chunk_granule();
        for idx in first..=last {
            let old_len = match lens.peek() {
                Some((i, l)) if *i == idx => {
                    let l = *l;
                    lens.next();
                    Some(l)
                }
                _ => None,
            };
            let (cstart, cend) = self.chunk_span(idx);
            let lo = offset.max(cstart) - cstart;
            let hi = end.min(cend) - cstart;
            let src = &data[(cstart + lo - offset) as usize..(cstart + hi - offset) as usize];
            let new_len = old_len.unwrap_or(0).max(hi);
            if lo == 0 && hi >= old_len.unwrap_or(0) {
                // Covers everything stored in the chunk: replace without reading.
                self.stage_chunk(&mut c, ino, idx, src, new_len, old_len);
            } else if granule > 1 {
                // An encrypted volume seals chunks in blocks: whole blocks are patched,
                // the partly written first and last ones are read first.
                let bytes = self.whole_blocks(ino, idx, lo, hi, src, granule)?;
                let alo = lo / granule * granule;
                self.stage_chunk_patch(&mut c, ino, idx, alo as u32, &bytes, new_len, old_len);
            } else {
                // Part of the chunk: a patch operand, applied when the chunk is read or
                // compacted, so a 4 KiB write costs 4 KiB instead of a chunk read and
                // rewrite.
                self.stage_chunk_patch(&mut c, ino, idx, lo as u32, src, new_len, old_len);
            }
        }
        if kill_privs
            && (r.perm & (libc::S_ISUID | libc::S_ISGID) as u16 != 0
                || r.flags & super::FLAG_HAS_CAPS != 0)
        {
            self.stage_kill_privs(&mut c, ino, &mut r)?;
        }
        let now = Timestamp::now();
        r.size = r.size.max(end);
        r.mtime = now;
        r.ctime = now;
        r.stored_bytes = (r.stored_bytes as i64 + c.data) as u64;
        r.chunk_count = (r.chunk_count as i64 + c.txn.usage.chunks) as u64;
        self.stage_inode(&mut c, ino, &r);
        self.commit(c)?;
        Ok(data.len() as u32)
    }

    /// `src`, written at bytes `lo..hi` of chunk `idx`, widened to whole blocks of
    /// `granule` bytes with what the chunk holds around it (the first and last block,
    /// when partly written).
    fn whole_blocks(
        &self,
        ino: Ino,
        idx: u64,
        lo: u64,
        hi: u64,
        src: &[u8],
        granule: u64,
    ) -> Result<Vec<u8>> {
        let (alo, ahi) = (lo / granule * granule, hi.div_ceil(granule) * granule);
        let mut bytes = vec![0u8; (ahi - alo) as usize];
        if lo > alo {
            let head = self.view().chunk_range(ino, idx, alo, alo + granule)?;
            bytes[..granule as usize].copy_from_slice(&head);
        }
        // The last block, unless it is the first one, read already.
        if hi < ahi && !(lo > alo && ahi - alo == granule) {
            let tail = self.view().chunk_range(ino, idx, ahi - granule, ahi)?;
            bytes[(ahi - granule - alo) as usize..].copy_from_slice(&tail);
        }
        bytes[(lo - alo) as usize..(hi - alo) as usize].copy_from_slice(src);
        Ok(bytes)
    }

    /// Reads up to `size` bytes at `offset` (short at end of file). All chunks are read
    /// from one snapshot, so a read never sees half of a concurrent write.
    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>> {
        let view = self.view();
        let snap = view.snapshot_for(ino, offset / self.chunk_size);
        let r = snap.inode(ino)?.ok_or(FsError::NotFound)?;
        match r.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid),
        }
        if offset >= r.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = r.size.min(offset + u64::from(size));
        let mut out = vec![0u8; (end - offset) as usize];
        let cs = self.chunk_size;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let mut place = |idx: u64, bytes: &[u8]| {
            let (cstart, _) = self.chunk_span(idx);
            let lo = offset.max(cstart);
            let hi = end.min(cstart + bytes.len() as u64);
            if hi > lo {
                out[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&bytes[(lo - cstart) as usize..(hi - cstart) as usize]);
            }
        };
        snap.chunks_in(ino, first, last, Some((offset, end, cs)), &mut place)?;
        drop(snap);
        self.touch_atime(ino, &r)?;
        Ok(out)
    }

    /// `relatime`: updates atime on read only when it is older than mtime or ctime, or
    /// more than a day old, so reads rarely cost a write.
    fn touch_atime(&self, ino: Ino, r: &InodeRecord) -> Result<()> {
        let now = Timestamp::now();
        if r.atime > r.mtime && r.atime > r.ctime && now.secs - r.atime.secs < 86_400 {
            return Ok(());
        }
        let _g = self.locks.lock(&[ino]);
        let Some(mut cur) = self.load_opt(ino)? else {
            return Ok(());
        };
        cur.atime = now;
        let mut c = self.change();
        self.stage_inode(&mut c, ino, &cur);
        self.commit(c)
    }

    /// Stages a size change of a locked file record: shrinking drops and trims chunks,
    /// growing leaves a hole (holes store nothing and count nothing).
    pub(super) fn stage_truncate(
        &self,
        c: &mut Change,
        ino: Ino,
        r: &mut InodeRecord,
        size: u64,
    ) -> Result<()> {
        let cs = self.chunk_size;
        if size < r.size {
            let keep_partial = !size.is_multiple_of(cs);
            let first_dropped = size.div_ceil(cs);
            let start = if keep_partial {
                size / cs
            } else {
                first_dropped
            };
            let (data_before, chunks_before) = (c.data, c.txn.usage.chunks);
            for (idx, len) in self.chunk_lens(ino, start, u64::MAX)? {
                if idx >= first_dropped {
                    self.stage_drop_chunk(c, ino, idx, len);
                    continue;
                }
                let keep = size % cs;
                if len > keep {
                    let mut bytes = self.get_chunk(ino, idx)?;
                    bytes.truncate(keep as usize);
                    self.stage_chunk(c, ino, idx, &bytes, keep, Some(len));
                }
            }
            r.stored_bytes = (r.stored_bytes as i64 + (c.data - data_before)) as u64;
            r.chunk_count = (r.chunk_count as i64 + (c.txn.usage.chunks - chunks_before)) as u64;
        }
        r.size = size;
        r.ctime = Timestamp::now();
        Ok(())
    }

    /// `fallocate`: mode 0 reserves (and counts) the range, growing the file unless
    /// `KEEP_SIZE`; `PUNCH_HOLE|KEEP_SIZE` frees it. Other modes are not supported.
    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32) -> Result<()> {
        if len == 0 {
            return Err(FsError::Invalid);
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let punch = mode & FALLOC_FL_PUNCH_HOLE != 0;
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        if mode & !(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) != 0 || (punch && !keep_size) {
            return Err(FsError::NotSupported);
        }
        let _g = self.locks.lock(&[ino]);
        let mut r = self.file_record(ino)?;
        let cs = self.chunk_size;
        let (first, last) = (offset / cs, (end - 1) / cs);
        let lens = self.chunk_lens(ino, first, last)?;
        let mut c = self.change();
        if punch {
            for (idx, old) in lens {
                let (cstart, _) = self.chunk_span(idx);
                let lo = offset.max(cstart) - cstart;
                let hi = (end - cstart).min(cs);
                if lo == 0 && hi >= old {
                    self.stage_drop_chunk(&mut c, ino, idx, old);
                    continue;
                }
                if lo >= old {
                    continue;
                }
                let mut bytes = self.get_chunk(ino, idx)?;
                if hi >= old {
                    // The hole reaches the end of what is stored: store less.
                    bytes.truncate(lo as usize);
                    self.stage_chunk(&mut c, ino, idx, &bytes, lo, Some(old));
                } else {
                    let zero_to = (hi as usize).min(bytes.len());
                    if (lo as usize) < zero_to {
                        bytes[lo as usize..zero_to].fill(0);
                    }
                    self.stage_chunk(&mut c, ino, idx, &bytes, old, Some(old));
                }
            }
        } else {
            let mut lens = lens.into_iter().peekable();
            for idx in first..=last {
                let old = match lens.peek() {
                    Some((i, l)) if *i == idx => {
                        let l = *l;
                        lens.next();
                        Some(l)
                    }
                    _ => None,
                };
                let (cstart, cend) = self.chunk_span(idx);
                let hi = end.min(cend) - cstart;
                let old_len = old.unwrap_or(0);
                if hi <= old_len {
                    continue;
                }
                // Allocated space reads as zeros: only the length grows, bytes stay as stored.
                c.txn.put_chunk_len(ino, idx, hi);
                count_chunk_len(&mut c, hi, old);
            }
            if !keep_size && end > r.size {
                r.size = end;
                r.mtime = Timestamp::now();
            }
        }
        r.stored_bytes = (r.stored_bytes as i64 + c.data) as u64;
        r.chunk_count = (r.chunk_count as i64 + c.txn.usage.chunks) as u64;
        r.ctime = Timestamp::now();
        self.stage_inode(&mut c, ino, &r);
        self.commit(c)
    }

    /// `lseek` with `SEEK_DATA` / `SEEK_HOLE`, at chunk-length granularity.
    pub fn seek(&self, ino: Ino, offset: u64, what: Seek) -> Result<u64> {
        let r = self.file_record(ino)?;
        if offset >= r.size {
            return Err(FsError::NoDataPastOffset);
        }
        let cs = self.chunk_size;
        let mut pos = offset;
        for (idx, len) in self.chunk_lens(ino, offset / cs, u64::MAX)? {
            let (cstart, _) = self.chunk_span(idx);
            let data_end = cstart + len;
            if data_end <= pos {
                continue;
            }
            match what {
                Seek::Data => return Ok(pos.max(cstart).min(r.size)),
                Seek::Hole => {
                    if cstart > pos {
                        return Ok(pos);
                    }
                    pos = data_end;
                    if len < cs {
                        return Ok(pos.min(r.size));
                    }
                }
            }
        }
        match what {
            Seek::Data => Err(FsError::NoDataPastOffset),
            Seek::Hole => Ok(pos.min(r.size)),
        }
    }
}

/// Counts a chunk's stored length going from `old_len` (`None`: no chunk) to `len`: the
/// data bytes, and a new chunk's [`CHUNK_CHARGE`].
fn count_chunk_len(c: &mut Change, len: u64, old_len: Option<u64>) {
    let grown = len as i64 - old_len.unwrap_or(0) as i64;
    c.data += grown;
    c.txn.usage.bytes += grown;
    if old_len.is_none() {
        c.txn.usage.chunks += 1;
        c.txn.usage.bytes += CHUNK_CHARGE as i64;
    }
}
