use std::mem::align_of;
use std::ptr::NonNull;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Size of the buffer for reading a request from the kernel. Since the kernel may send
/// up to `MAX_WRITE_SIZE` bytes in a write request, we use that value plus some extra space.
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096;

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// fusevol patch: the buffer is an anonymous private mapping rather than a zeroed
/// `Vec`, so that only the pages a request actually fills become resident. Upstream's
/// `vec![0; 16 MiB + 4 KiB]` per worker thread was zeroed by the allocator whenever it
/// came from an arena rather than a fresh mapping (glibc raises its mmap threshold after
/// the first large free, and thread arenas clear what they hand out): ~21 MiB of resident
/// memory per served volume of four workers, 2.2 GiB for 100 idle volumes. A mapping is
/// page-aligned, so the header is always aligned. If the mapping cannot be made, the
/// zeroed `Vec` is the fallback.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    storage: Storage,
}

#[derive(Debug)]
enum Storage {
    Mapped { ptr: NonNull<u8>, len: usize },
    Heap(Vec<u8>),
}

// SAFETY: the mapping is owned exclusively by this value (nothing else holds the pointer),
// like the `Vec` it replaces; moving it to another thread moves that ownership.
unsafe impl Send for Storage {}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` with the default buffer size.
    ///
    /// The actual buffer may be slightly larger to accommodate alignment requirements.
    pub(crate) fn new() -> Self {
        // SAFETY: a fresh anonymous private mapping: no file, no address hint, no
        // existing memory affected; the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUFFER_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let storage = match NonNull::new(p.cast::<u8>()) {
            Some(ptr) if p != libc::MAP_FAILED => {
                // No transparent huge pages: a 1 MiB request would otherwise make whole
                // 2 MiB pages resident (where THP is "always"). Advice only; a refusal
                // changes nothing else.
                // SAFETY: `p` is the mapping just made, `BUFFER_SIZE` bytes long.
                unsafe {
                    libc::madvise(p, BUFFER_SIZE, libc::MADV_NOHUGEPAGE);
                }
                Storage::Mapped {
                    ptr,
                    len: BUFFER_SIZE,
                }
            }
            _ => Storage::Heap(vec![0; BUFFER_SIZE]),
        };
        Self { storage }
    }

    /// Returns a mutable reference to the aligned portion of the buffer.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        let buffer: &mut [u8] = match &mut self.storage {
            // SAFETY: `ptr` points to `len` bytes mapped readable and writable by `new`,
            // owned by `self` until `drop`; the returned borrow of `self` keeps it alive
            // and unaliased. Anonymous mappings read as zeros until written.
            Storage::Mapped { ptr, len } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
            Storage::Heap(v) => v,
        };
        let alignment = align_of::<abi::fuse_in_header>();
        let off = alignment - (buffer.as_ptr() as usize) % alignment;
        if off == alignment {
            buffer
        } else {
            &mut buffer[off..]
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Storage::Mapped { ptr, len } = self {
            // SAFETY: the mapping made in `FuseReadBuf::new`, unmapped once; no borrow of
            // it outlives `self`.
            unsafe {
                libc::munmap(ptr.as_ptr().cast(), *len);
            }
        }
    }
}
