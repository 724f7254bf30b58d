//! fusevol patch: draining a session before its process hands the connection over.
//!
//! A server that leaves a live connection to the next one (whose fds another process
//! keeps) should first stop reading requests and finish the ones it has read: then no
//! request is left half-done when it exits, and the next server needs neither
//! `FUSE_NOTIFY_RESEND` (which old kernels lack) nor to run anything twice. Requests
//! not read yet stay queued in the kernel for the next server.
//!
//! [`Drain::stop`] sets a flag that each worker checks before its next read, and wakes
//! the workers blocked in `read(/dev/fuse)` with `SIGUSR2`, whose handler does nothing
//! and is installed without `SA_RESTART`: the read returns EINTR. The kernel's wait
//! there is interruptible and takes a request off the queue only when it returns one,
//! so nothing is lost. A signal is sent only to a worker that marked itself as reading
//! (rarely, one that has just returned from its read with a request gets it inside its
//! callback: the syscalls there retry EINTR, or return it), and again every few
//! milliseconds until every worker has left its loop ([`Drain::wait`], or
//! [`Drain::poke`] from a caller draining several sessions at once), because a worker may
//! be signalled just before it enters the read. `stop` alone is not enough. Workers enlist their thread under a lock and leave the
//! list before the thread ends, so a listed thread is always alive when signalled.
//!
//! If the handler cannot be installed (another one owns `SIGUSR2`), no signal is ever
//! sent: `wait` then returns false at its deadline and the caller falls back to what it
//! did before (the next server resends what was read).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The signal that wakes a worker blocked in its read.
const WAKE_SIGNAL: libc::c_int = libc::SIGUSR2;
/// How often [`Drain::wait`] signals the workers still reading.
const RESIGNAL: Duration = Duration::from_millis(2);

extern "C" fn wake(_: libc::c_int) {}

/// Installs the wake handler once per process; false if `SIGUSR2` has another owner.
fn handler_installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` structs are plain data, zeroed is a valid start; the
        // handler is async-signal-safe (it does nothing); `old` receives the previous
        // action, which is put back if it was not the default.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // No SA_RESTART: a read interrupted by the signal returns EINTR.
            action.sa_flags = 0;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(WAKE_SIGNAL, &action, &mut old) != 0 {
                return false;
            }
            if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN {
                libc::sigaction(WAKE_SIGNAL, &old, std::ptr::null_mut());
                log::warn!("SIGUSR2 has a handler already: sessions cannot be drained");
                return false;
            }
            true
        }
    })
}

#[derive(Debug)]
struct Listed {
    thread: libc::pthread_t,
    reading: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct State {
    stopping: AtomicBool,
    next_id: AtomicU64,
    workers: Mutex<HashMap<u64, Listed>>,
}

/// Stops a session's workers between requests (see the module doc). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Drain(Arc<State>);

impl Drain {
    /// Asks every worker to leave its loop before its next read, and wakes the ones
    /// blocked in a read now. Requests being handled are finished and answered.
    pub fn stop(&self) {
        // SeqCst here and in the worker (`reading` then `stopping`): of the two stores,
        // at least one is seen by the other side's load.
        self.0.stopping.store(true, Ordering::SeqCst);
        if handler_installed() {
            self.signal_readers();
        }
    }

    /// Waits until every worker has left its loop, signalling the ones still blocked in
    /// a read, until `deadline`. True if all have left.
    pub fn wait(&self, deadline: Instant) -> bool {
        loop {
            if self.drained() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.poke();
            std::thread::sleep(RESIGNAL);
        }
    }

    /// Signals again the workers still blocked in a read (after [`Drain::stop`]; call it
    /// every few milliseconds until [`Drain::drained`]).
    pub fn poke(&self) {
        if handler_installed() {
            self.signal_readers();
        }
    }

    /// Have all workers left their loop?
    pub fn drained(&self) -> bool {
        self.0.workers.lock().is_empty()
    }

    /// The number of workers still in their loop.
    pub fn workers(&self) -> usize {
        self.0.workers.lock().len()
    }

    fn signal_readers(&self) {
        let workers = self.0.workers.lock();
        for w in workers.values() {
            if w.reading.load(Ordering::SeqCst) {
                // SAFETY: the thread is listed, and a worker leaves the list (under this
                // lock) before its thread ends, so `thread` names a live thread.
                unsafe {
                    libc::pthread_kill(w.thread, WAKE_SIGNAL);
                }
            }
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    /// Lists the calling thread as a worker until the returned guard drops (on that
    /// same thread, before it ends).
    pub(crate) fn enlist(&self) -> Enlisted {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let reading = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        self.0.workers.lock().insert(
            id,
            Listed {
                thread,
                reading: reading.clone(),
            },
        );
        Enlisted {
            drain: self.clone(),
            id,
            reading,
        }
    }
}

/// A worker's place in the drain's list; it leaves the list when dropped.
#[derive(Debug)]
pub(crate) struct Enlisted {
    drain: Drain,
    id: u64,
    reading: Arc<AtomicBool>,
}

impl Enlisted {
    /// Marks the worker as (not) blocked in its read: only a reading worker is signalled.
    pub(crate) fn reading(&self, now: bool) {
        self.reading.store(now, Ordering::SeqCst);
    }
}

impl Drop for Enlisted {
    fn drop(&mut self) {
        self.drain.0.workers.lock().remove(&self.id);
    }
}
