//! fusevol patch 6: FUSE over io_uring (Linux 6.14+, module parameter `fuse.enable_uring`).
//!
//! With `Config::io_uring` and a kernel that offers `FUSE_OVER_IO_URING` in INIT, the
//! session makes one io_uring (128-byte SQEs) per possible CPU and per thread of that CPU
//! before it answers INIT, and asks for the capability only if every ring was made. After
//! INIT each ring thread registers its slots (`FUSE_IO_URING_CMD_REGISTER`: a header and a
//! payload buffer each) for its queue; once every queue has a slot the kernel sends every
//! request through the rings, each to the queue of the CPU its caller runs on, and the
//! thread answers it and fetches the next in one `io_uring_enter`
//! (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`), where `/dev/fuse` costs a `read` and a
//! `write`. FORGETs and INTERRUPTs still come through `/dev/fuse`: the session's workers
//! keep reading it.
//!
//! A request arrives split: `fuse_in_header` in the header's first 128 bytes, the
//! opcode's own argument struct in the next 128, and every further argument (names,
//! written data) in the payload buffer. Its bytes are put back together in `/dev/fuse`
//! order in a buffer of the thread's own (the size of the argument struct is what the
//! header's length leaves), so that the request decoder is the same for both paths and
//! the slot is free for the reply: the `fuse_out_header` goes to the header, every reply
//! argument to the payload buffer, its length to `payload_sz`.
//!
//! Not for connections that are handed to another process: a request the kernel gave to
//! a ring of a process that dies is never given again (`FUSE_NOTIFY_RESEND` knows only
//! `/dev/fuse`), so a server that keeps its connection in a holder must not use this.
//!
//! Fallback: if a ring cannot be made, the capability is not asked for and `/dev/fuse`
//! serves as before; if the kernel refuses a registration for want of memory or a bad
//! buffer, it stops waiting for the rings and sends requests through `/dev/fuse` again.
//! Any other failure of a ring ends the process: the kernel would keep that CPU's
//! requests waiting for ever, and an ended connection fails them instead.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::dev_fuse::DevFuse;
use crate::ll;
use crate::ll::fuse_abi::fuse_in_header;
use crate::read_buf::FuseReadBuf;
use crate::reply::ReplyEmpty;
use crate::request::Origin;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `FUSE_URING_IN_OUT_HEADER_SZ` and `FUSE_URING_OP_IN_OUT_SZ`.
const IN_OUT_SIZE: usize = 128;
const OP_IN_SIZE: usize = 128;
/// Where a slot's payload buffer starts in its stretch of the mapping: the header
/// (`struct fuse_uring_req_header`, 288 bytes) sits at the stretch's start.
const PAYLOAD_OFFSET: usize = 4096;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER_SIZE: usize = 16;

/// Tags a completion of a registration (rather than of a commit) in its `user_data`.
const REGISTER_TAG: u64 = 1 << 32;

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct ReqHeader {
    in_out: [u8; IN_OUT_SIZE],
    op_in: [u8; OP_IN_SIZE],
    ent: EntInOut,
}

const _: () = assert!(size_of::<ReqHeader>() == 288 && size_of::<ReqHeader>() <= PAYLOAD_OFFSET);
const _: () = assert!(size_of::<squeue::Entry128>() == 128);

/// How many slots each ring registers. One: a request the kernel gives a slot waits for
/// nothing but its own thread, while requests beyond the free slots wait in the kernel's
/// queue for whichever thread commits first (two slots per thread made a request wait
/// behind a slow one of the same thread while other threads were idle).
const SLOTS_PER_RING: usize = 1;

/// Tags the completion of the read that wakes the ring's thread (see `Ring::wake`).
const WAKE_TAG: u64 = 1 << 33;

/// The number of queues the kernel makes: one per possible CPU (`num_possible_cpus`),
/// read from `/sys/devices/system/cpu/possible` ("0-3", "0,2-5").
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0usize;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("cpu list {text:?}"));
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: usize = lo.parse().map_err(|_| bad())?;
        let hi: usize = hi.parse().map_err(|_| bad())?;
        count += hi.checked_sub(lo).ok_or_else(bad)? + 1;
    }
    Ok(count.max(1))
}

/// One anonymous mapping holding a ring's slots.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous private mapping: no file, no address hint, no existing
        // memory affected; the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        // SAFETY: `p` is the mapping just made, `len` bytes long; advice only.
        unsafe {
            libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Mapping::new`, unmapped once. `Ring` declares `ring`
        // before `map`, so the ring's fd is closed first (the kernel's references to the
        // slots die with it, and task work of a dying ring copies nothing); a ring is
        // dropped only after its thread saw every slot end, never started it, or answered
        // DESTROY.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// One ring: its queue, its slots, and the lock under which any thread adds to its
/// submission queue.
pub(crate) struct Ring {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    sq: Mutex<()>,
    dev: Arc<DevFuse>,
    slots: usize,
    stride: usize,
    payload_cap: usize,
    /// Each slot's `[header, payload]`, read by the kernel at registration.
    iovecs: Box<[[libc::iovec; 2]]>,
    owner: OnceLock<ThreadId>,
    /// An eventfd the ring's thread keeps a read armed on: a reply from another thread
    /// queues its commit and writes here, and the ring's thread submits it (only the
    /// ring's thread submits, so every command belongs to a thread that stays).
    wake: std::os::fd::OwnedFd,
    /// Where that read puts the eventfd's count (written by the kernel, never read).
    wake_buf: Box<std::cell::UnsafeCell<u64>>,
    /// Per slot: a request is held that no reply has answered yet. A second reply to
    /// the same request would write into a slot the first one's commit refilled.
    held: Box<[AtomicBool]>,
    map: Mapping,
}

// SAFETY: the raw pointers (`map`, `iovecs`) point into the mapping this ring owns. A
// slot's memory is written by the kernel only between the slot's registration or commit
// and its next completion, and by this process only between that completion and the next
// commit, which the one holder of the slot (the ring thread, then the reply) pushes: no
// two threads touch a slot at once. The submission queue is touched under `sq`, the
// completion queue by the ring's own thread only.
unsafe impl Send for Ring {}
// SAFETY: see `Send`.
unsafe impl Sync for Ring {}

/// The rings of a session, made before INIT is answered.
pub(crate) struct Rings(Vec<Arc<Ring>>);

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rings({})", self.0.len())
    }
}

impl Rings {
    /// Makes `per_queue` rings for every possible CPU, each with room for a payload of
    /// `max_payload` bytes per slot.
    pub(crate) fn new(
        dev: &Arc<DevFuse>,
        per_queue: usize,
        max_payload: usize,
    ) -> io::Result<Rings> {
        let queues = possible_cpus()?;
        let qid_max = u16::try_from(queues).map_err(|_| io::Error::other("too many CPUs"))?;
        let page = page_size::get();
        let payload_cap = max_payload.div_ceil(page) * page;
        let stride = PAYLOAD_OFFSET + payload_cap;
        let mut rings = Vec::with_capacity(queues * per_queue.max(1));
        for qid in 0..qid_max {
            for _ in 0..per_queue.max(1) {
                let map = Mapping::new(stride * SLOTS_PER_RING)?;
                let base = map.ptr.as_ptr();
                let iovecs = (0..SLOTS_PER_RING)
                    .map(|s| {
                        // SAFETY: `s * stride + PAYLOAD_OFFSET + payload_cap` is within
                        // the mapping of `stride * SLOTS_PER_RING` bytes.
                        let (h, p) = unsafe {
                            let h = base.add(s * stride);
                            (h, h.add(PAYLOAD_OFFSET))
                        };
                        [
                            libc::iovec {
                                iov_base: h.cast(),
                                iov_len: size_of::<ReqHeader>(),
                            },
                            libc::iovec {
                                iov_base: p.cast(),
                                iov_len: payload_cap,
                            },
                        ]
                    })
                    .collect();
                // Each slot's one command, the wake-up read, and room to spare.
                let depth = u32::try_from(SLOTS_PER_RING * 2 + 1)
                    .unwrap_or(8)
                    .next_power_of_two();
                // Made disabled here and enabled by its own thread: with one issuer and
                // deferred task work, a request is copied into the slot by the ring's
                // thread when it waits, without a signal to wake it.
                let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_r_disabled()
                    .build(depth)?;
                rings.push(Arc::new(Ring {
                    qid,
                    ring,
                    sq: Mutex::new(()),
                    dev: dev.clone(),
                    slots: SLOTS_PER_RING,
                    stride,
                    payload_cap,
                    iovecs,
                    owner: OnceLock::new(),
                    wake: eventfd()?,
                    wake_buf: Box::new(std::cell::UnsafeCell::new(0)),
                    held: (0..SLOTS_PER_RING)
                        .map(|_| AtomicBool::new(false))
                        .collect(),
                    map,
                }));
            }
        }
        Ok(Rings(rings))
    }

    pub(crate) fn into_inner(self) -> Vec<Arc<Ring>> {
        self.0
    }
}

fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: eventfd has no memory arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A slot's command: the 80-byte `struct fuse_uring_cmd_req`.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

impl Ring {
    fn header(&self, slot: usize) -> *mut ReqHeader {
        // SAFETY: `slot < self.slots`: within the mapping (see `Rings::new`).
        unsafe { self.map.ptr.as_ptr().add(slot * self.stride).cast() }
    }

    fn payload(&self, slot: usize) -> *mut u8 {
        // SAFETY: as `header`; the payload follows at `PAYLOAD_OFFSET`.
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(slot * self.stride + PAYLOAD_OFFSET)
        }
    }

    fn entry(&self, op: u32, commit_id: u64, slot: usize) -> squeue::Entry128 {
        let mut cmd = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), op)
            .cmd(cmd_req(commit_id, self.qid));
        let mut tag = slot as u64;
        if op == CMD_REGISTER {
            cmd = cmd.addr(Some(self.iovecs[slot].as_ptr() as u64));
            tag |= REGISTER_TAG;
        }
        let entry = cmd.build().user_data(tag);
        if op != CMD_REGISTER {
            return entry;
        }
        // The kernel wants `sqe->len == 2` (the header and payload iovecs), which
        // `UringCmd80` has no setter for: the 32-bit `len` sits at byte 24 of the SQE.
        // SAFETY: `Entry128` is `repr(C)` over the 64-byte `io_uring_sqe` and 64 more
        // bytes (size asserted above); every bit pattern is a valid `[u8; 128]` and the
        // one written back differs only in `len`, which is a plain integer field.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
        debug_assert_eq!(raw[0], opcode::UringCmd80::CODE);
        debug_assert_eq!(raw[32..40], tag.to_ne_bytes());
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: see above.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }

    /// Adds `entry` to the submission queue. Only the ring's thread submits (with its next
    /// wait): a command belongs to the thread that submitted it, and would be cancelled
    /// when that thread ends. From another thread, the ring's thread is woken to do it.
    fn push(&self, entry: &squeue::Entry128) -> io::Result<()> {
        let on_owner = self.owner.get() == Some(&std::thread::current().id());
        {
            let _guard = self.sq.lock();
            // SAFETY: the submission queue is only touched under `self.sq`.
            let pushed = unsafe { self.ring.submission_shared().push(entry).is_ok() };
            if !pushed {
                // Cannot happen: every slot has at most one command queued, and the queue
                // has room for twice the slots and the wake-up read.
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
        if !on_owner {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to the ring's own eventfd.
            let n = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
            if n != 8 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Arms the read of `wake` (on the ring's thread).
    fn arm_wake(&self) -> io::Result<()> {
        let read = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.get().cast(),
            8,
        )
        .build()
        .user_data(WAKE_TAG);
        self.push(&read.into())
    }

    /// Writes a reply to `slot` and commits it (fetching the slot's next request). A reply
    /// that cannot be written (too large for the slot, malformed) is committed as EIO, as
    /// the kernel ends a request whose `/dev/fuse` reply it refuses: the slot is never left
    /// holding a request.
    pub(crate) fn reply(&self, slot: usize, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        if !self
            .held
            .get(slot)
            .is_some_and(|h| h.swap(false, Ordering::AcqRel))
        {
            return Err(io::Error::other("a second reply to one FUSE request"));
        }
        let written = self.write_reply(slot, data);
        if written.is_err() {
            self.write_error(slot, libc::EIO);
        }
        // SAFETY: the kernel wrote `commit_id` with the request; this slot is held until
        // the commit below (see `Ring`'s `Send`).
        let commit_id = unsafe { (*self.header(slot)).ent.commit_id };
        if let Err(e) = self.push(&self.entry(CMD_COMMIT_AND_FETCH, commit_id, slot)) {
            give_up(self.qid, "cannot commit a reply", &e);
        }
        written
    }

    fn write_reply(&self, slot: usize, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        let Some((head, args)) = data.split_first() else {
            return Err(io::Error::other("empty FUSE reply"));
        };
        if head.len() < OUT_HEADER_SIZE {
            return Err(io::Error::other("short FUSE reply header"));
        }
        let total: usize = args.iter().map(|a| a.len()).sum();
        if total > self.payload_cap {
            return Err(io::Error::other(format!(
                "FUSE reply of {total} bytes exceeds the ring's {} byte buffer",
                self.payload_cap
            )));
        }
        let hdr = self.header(slot);
        let payload = self.payload(slot);
        // SAFETY: this slot is held by the caller between its completion and its commit
        // (see `Ring`'s `Send`); the copies stay within the header's 128-byte `in_out` and
        // the payload buffer of `payload_cap` bytes (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                head.as_ptr(),
                (*hdr).in_out.as_mut_ptr(),
                OUT_HEADER_SIZE,
            );
            let mut at = 0;
            for a in args {
                std::ptr::copy_nonoverlapping(a.as_ptr(), payload.add(at), a.len());
                at += a.len();
            }
            (*hdr).ent.payload_sz = total as u32;
        }
        Ok(())
    }

    /// Writes an error reply (`fuse_out_header` only) for the request in `slot`.
    fn write_error(&self, slot: usize, errno: i32) {
        let hdr = self.header(slot);
        // SAFETY: as `write_reply`; `commit_id` is the request's unique.
        unsafe {
            let unique = (*hdr).ent.commit_id;
            let mut out = [0u8; OUT_HEADER_SIZE];
            out[0..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
            out[8..16].copy_from_slice(&unique.to_ne_bytes());
            std::ptr::copy_nonoverlapping(
                out.as_ptr(),
                (*hdr).in_out.as_mut_ptr(),
                OUT_HEADER_SIZE,
            );
            (*hdr).ent.payload_sz = 0;
        }
    }

    /// Copies the request of `slot` into `buf` in `/dev/fuse` order; its length, or `None`
    /// when the kernel's lengths do not add up.
    fn take_request(&self, slot: usize, buf: &mut [u8]) -> Option<usize> {
        let hdr = self.header(slot);
        let payload = self.payload(slot);
        const IN: usize = size_of::<fuse_in_header>();
        // SAFETY: the kernel filled this slot before posting its completion, and nothing
        // else touches it until this thread commits it (see `Ring`'s `Send`).
        let (in_out, op_in, payload_sz) = unsafe {
            (
                &(*hdr).in_out,
                &(*hdr).op_in,
                (*hdr).ent.payload_sz as usize,
            )
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(&in_out[0..4]);
        let len = u32::from_ne_bytes(len) as usize;
        let arg0 = len
            .checked_sub(IN + payload_sz)
            .filter(|a| *a <= OP_IN_SIZE);
        let arg0 = arg0?;
        if len > buf.len() || payload_sz > self.payload_cap {
            return None;
        }
        buf[..IN].copy_from_slice(&in_out[..IN]);
        buf[IN..IN + arg0].copy_from_slice(&op_in[..arg0]);
        // SAFETY: `payload_sz <= payload_cap` bytes of the slot's payload buffer, which the
        // kernel wrote (see above).
        let data = unsafe { std::slice::from_raw_parts(payload, payload_sz) };
        buf[IN + arg0..len].copy_from_slice(data);
        Some(len)
    }

    /// Registers every slot and arms the wake-up read (on the ring's thread).
    fn start(&self) -> io::Result<()> {
        for slot in 0..self.slots {
            self.push(&self.entry(CMD_REGISTER, 0, slot))?;
        }
        self.arm_wake()?;
        self.submit_and_wait(0)
    }

    /// Submits what is queued and waits for `want` completions, retrying interruptions.
    fn submit_and_wait(&self, want: usize) -> io::Result<()> {
        let mut tries = 0;
        loop {
            match self.ring.submitter().submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    // Waiting, the loop comes back anyway; submitting only, try a while.
                    tries += 1;
                    if want > 0 {
                        return Ok(());
                    }
                    if tries > 1000 {
                        return Err(e);
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A reply's way back: the ring and slot its request came through.
#[derive(Clone)]
pub(crate) struct UringSlot {
    pub(crate) ring: Arc<Ring>,
    pub(crate) slot: usize,
}

impl std::fmt::Debug for UringSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UringSlot(q{}, {})", self.ring.qid, self.slot)
    }
}

impl UringSlot {
    /// The connection's `/dev/fuse` fd, for what only it offers (backing files).
    pub(crate) fn channel(&self) -> crate::channel::ChannelSender {
        crate::channel::ChannelSender::from_dev(self.ring.dev.clone())
    }

    pub(crate) fn send(&self, data: &[io::IoSlice<'_>]) -> io::Result<()> {
        self.ring.reply(self.slot, data)
    }
}

/// Runs the calling thread on CPU `cpu` only: the kernel queues a request on the queue of
/// the CPU its caller runs on, so the ring's thread answers where the caller waits (no
/// wake-up of another CPU per request).
fn pin_to_cpu(cpu: u16) {
    if usize::from(cpu) >= libc::CPU_SETSIZE as usize {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it for a `cpu`
    // below CPU_SETSIZE (checked above), and sched_setaffinity only reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(usize::from(cpu), &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        warn!(
            "cannot pin the io_uring thread of queue {cpu}: {}",
            io::Error::last_os_error()
        );
    }
}

/// Errors after which a slot is gone for good: the connection ended.
fn slot_ended(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV
    )
}

/// Registration errors after which the kernel serves the connection through `/dev/fuse`
/// again (`fuse_uring_register` failed: it clears `fc->io_uring`).
fn falls_back(errno: i32) -> bool {
    matches!(errno, libc::ENOMEM | libc::EINVAL)
}

/// A ring that cannot go on would leave its CPU's requests waiting for ever (the kernel
/// does not give them to another queue, nor back to `/dev/fuse`): the process ends
/// instead, which ends the connection, and callers get an error rather than a hang.
fn give_up(qid: u16, what: &str, e: &dyn std::fmt::Display) -> ! {
    error!(
        "FUSE io_uring queue {qid}: {what}: {e}; ending the process rather than leaving this CPU's requests unanswered"
    );
    std::process::abort()
}

/// Serves one ring until its slots end (the connection ended). Not drained: a ring
/// thread that left would leave its slots registered and their requests unanswered, and
/// connections served through rings are never handed over (see the module doc).
pub(crate) fn serve<FS: Filesystem>(ring: Arc<Ring>, se: SessionEventLoop<FS>) -> io::Result<()> {
    let _ = ring.owner.set(std::thread::current().id());
    pin_to_cpu(ring.qid);
    if let Err(e) = ring.ring.submitter().register_enable_rings() {
        give_up(ring.qid, "cannot enable the ring", &e);
    }
    if let Err(e) = ring.start() {
        give_up(ring.qid, "cannot register", &e);
    }
    let mut buf = FuseReadBuf::new();
    let buf = buf.as_mut();
    let mut live = ring.slots;
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(ring.slots * 2 + 2);
    while live > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            give_up(ring.qid, "cannot wait for requests", &e);
        }
        // SAFETY: only this thread reads the completion queue.
        unsafe {
            done.extend(
                ring.ring
                    .completion_shared()
                    .map(|c| (c.user_data(), c.result())),
            );
        }
        for (tag, res) in done.drain(..) {
            if tag == WAKE_TAG {
                // A reply from another thread queued its commit: submitted with the next
                // wait. The read is armed again; without it such a commit would wait for
                // another completion that may never come.
                if res < 0 && !matches!(-res, libc::EINTR | libc::EAGAIN) {
                    give_up(
                        ring.qid,
                        "the wake-up read failed",
                        &io::Error::from_raw_os_error(-res),
                    );
                }
                if let Err(e) = ring.arm_wake() {
                    give_up(ring.qid, "cannot arm the wake-up read", &e);
                }
                continue;
            }
            let slot = (tag & (REGISTER_TAG - 1)) as usize;
            if slot >= ring.slots {
                continue;
            }
            if res >= 0 {
                if !answer(&ring, slot, &se, buf) {
                    // DESTROY answered: submit its reply (the kernel waits for it), then stop.
                    if let Err(e) = ring.submit_and_wait(0) {
                        give_up(ring.qid, "cannot send the reply to DESTROY", &e);
                    }
                    return Ok(());
                }
                continue;
            }
            let errno = -res;
            if slot_ended(errno) {
                live -= 1;
            } else if tag & REGISTER_TAG != 0 && falls_back(errno) {
                warn!(
                    "io_uring registration refused on queue {} (errno {errno}): the kernel serves this connection through /dev/fuse",
                    ring.qid
                );
                live -= 1;
            } else if tag & REGISTER_TAG != 0 {
                give_up(
                    ring.qid,
                    "registration refused",
                    &io::Error::from_raw_os_error(errno),
                );
            } else {
                // A commit refused while the connection lives (a commit id or state the
                // kernel does not know) leaves the request in the slot unanswered, and the
                // slot gone: this CPU's requests would wait for ever.
                give_up(
                    ring.qid,
                    "commit refused",
                    &io::Error::from_raw_os_error(errno),
                );
            }
        }
    }
    Ok(())
}

/// Decodes and dispatches the request of `slot`; false after DESTROY.
fn answer<FS: Filesystem>(
    ring: &Arc<Ring>,
    slot: usize,
    se: &SessionEventLoop<FS>,
    buf: &mut [u8],
) -> bool {
    let origin = UringSlot {
        ring: ring.clone(),
        slot,
    };
    let request = ring
        .take_request(slot, buf)
        .and_then(|len| RequestWithSender::with_origin(Origin::Uring(origin.clone()), &buf[..len]));
    let Some(req) = request else {
        error!("malformed FUSE request on io_uring queue {}", ring.qid);
        ring.write_error(slot, libc::EIO);
        // SAFETY: as in `Ring::reply`.
        let commit_id = unsafe { (*ring.header(slot)).ent.commit_id };
        if let Err(e) = ring.push(&ring.entry(CMD_COMMIT_AND_FETCH, commit_id, slot)) {
            give_up(ring.qid, "cannot commit", &e);
        }
        return true;
    };
    ring.held[slot].store(true, Ordering::Release);
    if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
        req.reply::<ReplyEmpty>().ok();
        return false;
    }
    req.dispatch(se);
    true
}

/// The payload size the kernel wants of every slot: `max(FUSE_MIN_READ_BUFFER,
/// max_write, max_pages * PAGE_SIZE)`.
/// `max_pages` is at least the kernel's default of 32, which it uses when
/// `FUSE_MAX_PAGES` is not granted: a buffer too small makes every registration fail.
pub(crate) fn max_payload(max_write: u32, max_pages: u16) -> usize {
    (8192usize)
        .max(max_write as usize)
        .max(usize::from(max_pages.max(32)) * page_size::get())
}
