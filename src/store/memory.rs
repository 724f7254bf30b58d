//! The store's memory budget: how one number (`--memory-budget`, the agent's
//! `memory_budget`) is split between RocksDB's block cache and its memtables.
//!
//! The memtables are charged to the block cache (RocksDB's `WriteBufferManager` with a
//! cache): the cache's capacity is the whole budget, and memtable memory evicts cached
//! blocks rather than adding to them. Writes stall when the memtables reach their share
//! until a flush frees memory, so the bound holds under any write load. What the budget
//! does not cover is small and independent of load: the FUSE workers' request buffers
//! (one `max_write` each), table-reader state and the allocator's own overhead.

/// Default budget of one store: enough for 14 MiB chunk memtables (a sequential write
/// stream flushes every 14 MiB) and a block cache that holds the metadata of a
/// few hundred thousand files.
pub const DEFAULT_MEMORY_BUDGET: u64 = 64 << 20;

/// The smallest budget accepted: below it memtables flush every few hundred KiB.
pub const MIN_MEMORY_BUDGET: u64 = 16 << 20;

/// The largest chunk memtable: beyond it a bigger budget goes to the cache.
const MAX_CHUNK_MEMTABLE: u64 = 64 << 20;

/// The split of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MemoryPlan {
    /// Capacity of the block cache, memtables included.
    pub cache_bytes: usize,
    /// What all memtables of the store may hold together (stall above).
    pub write_buffer_bytes: usize,
    /// One memtable of the chunks column family.
    pub chunk_memtable_bytes: usize,
    /// One memtable of the metadata column family.
    pub meta_memtable_bytes: usize,
}

impl MemoryPlan {
    /// Splits `budget` (at least [`MIN_MEMORY_BUDGET`]; smaller values are raised to it):
    /// half for memtables, of which room for two chunk memtables (one filling while the
    /// other flushes) and two metadata memtables; the cache gets the rest.
    pub fn new(budget: u64) -> MemoryPlan {
        let budget = budget.max(MIN_MEMORY_BUDGET);
        let write_buffers = budget / 2;
        let meta = (write_buffers / 16).clamp(1 << 20, 4 << 20);
        let chunk = ((write_buffers - 2 * meta) / 2).min(MAX_CHUNK_MEMTABLE);
        MemoryPlan {
            cache_bytes: to_usize(budget),
            write_buffer_bytes: to_usize(write_buffers),
            chunk_memtable_bytes: to_usize(chunk),
            meta_memtable_bytes: to_usize(meta),
        }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtables_fit_in_their_share_and_the_share_in_the_budget() {
        for budget in [0, 1 << 20, 16 << 20, 64 << 20, 96 << 20, 1 << 30, 64 << 30] {
            let p = MemoryPlan::new(budget);
            let budget = budget.max(MIN_MEMORY_BUDGET) as usize;
            assert_eq!(p.cache_bytes, budget);
            assert!(p.write_buffer_bytes <= budget / 2);
            assert!(
                2 * p.chunk_memtable_bytes + 2 * p.meta_memtable_bytes <= p.write_buffer_bytes,
                "{p:?}"
            );
            assert!(p.chunk_memtable_bytes >= 3 << 20, "{p:?}");
            assert!(p.chunk_memtable_bytes <= MAX_CHUNK_MEMTABLE as usize);
        }
    }

    #[test]
    fn the_default_gives_sixteen_mib_chunk_memtables() {
        let p = MemoryPlan::new(DEFAULT_MEMORY_BUDGET);
        assert_eq!(p.meta_memtable_bytes, 2 << 20);
        assert_eq!(p.chunk_memtable_bytes, 14 << 20);
    }
}
