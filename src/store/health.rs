//! What an operator watches of a store: its bytes on disk against the data it holds, and
//! whether RocksDB is holding writes back or has failed in the background. Read from
//! RocksDB's in-memory properties and the volumes' usage keys: cheap enough for every
//! scrape. [`WeakStore`] lets the metrics registry watch a store without keeping it open.

use std::sync::{Arc, Weak};

use super::{Result, Store, StoreInner};

/// A store's health at one moment (see [`Store::health`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StoreHealth {
    /// Bytes of the store's live table and blob files (the WAL aside).
    pub disk_bytes: u64,
    /// Of `disk_bytes`, bytes of blob files that no chunk references any more (overwritten
    /// or deleted data not yet collected).
    pub garbage_bytes: u64,
    /// Bytes the store's volumes use, as their quotas count them (file data plus a
    /// fixed charge per inode, entry and chunk).
    pub data_bytes: u64,
    /// Memtable bytes not yet flushed to table or blob files.
    pub memtable_bytes: u64,
    /// RocksDB stops every write right now (too many memtables or level-0 files).
    pub write_stopped: bool,
    /// RocksDB slows writes to this many bytes per second right now; 0: not delayed.
    pub delayed_write_rate: u64,
    /// Flush or compaction failures since the store opened.
    pub background_errors: u64,
    /// Changes are being refused at the disk's free-space floor right now.
    pub at_free_space_floor: bool,
}

impl StoreHealth {
    /// Disk bytes per byte of data (`None` while the store holds no data).
    pub fn space_amplification(&self) -> Option<f64> {
        (self.data_bytes > 0).then(|| self.disk_bytes as f64 / self.data_bytes as f64)
    }
}

/// A handle that does not keep the store open.
#[derive(Clone)]
pub struct WeakStore(Weak<StoreInner>);

impl std::fmt::Debug for WeakStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.0.upgrade().map(|i| i.dir.clone());
        f.debug_tuple("WeakStore").field(&dir).finish()
    }
}

impl WeakStore {
    /// The store, while something else keeps it open.
    pub fn upgrade(&self) -> Option<Store> {
        self.0.upgrade().map(|inner| Store { inner })
    }
}

impl Store {
    pub fn downgrade(&self) -> WeakStore {
        WeakStore(Arc::downgrade(&self.inner))
    }

    /// The store's health now.
    pub fn health(&self) -> Result<StoreHealth> {
        let db = &self.inner.db;
        let mut h = StoreHealth::default();
        for cf in self.all_cfs() {
            let prop = |name: &str| -> Result<u64> {
                Ok(db.property_int_value_cf(cf, name)?.unwrap_or(0))
            };
            h.disk_bytes +=
                prop("rocksdb.live-sst-files-size")? + prop("rocksdb.live-blob-file-size")?;
            h.garbage_bytes += prop("rocksdb.live-blob-file-garbage-size")?;
            h.memtable_bytes += prop("rocksdb.cur-size-all-mem-tables")?;
        }
        let prop = |name: &str| -> Result<u64> { Ok(db.property_int_value(name)?.unwrap_or(0)) };
        h.write_stopped = prop("rocksdb.is-write-stopped")? != 0;
        h.delayed_write_rate = prop("rocksdb.actual-delayed-write-rate")?;
        h.background_errors = prop("rocksdb.background-errors")?;
        h.at_free_space_floor = self.free_space_floor().1;
        for name in self.volume_names()? {
            match self.inspect_volume(&name) {
                Ok(v) => h.data_bytes += v.used_bytes,
                // Deleted since it was listed.
                Err(super::Error::VolumeNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(h)
    }
}
