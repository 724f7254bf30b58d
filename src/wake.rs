//! The FUSE module parameters fusevol sets for the node: `fuse.wake_here` (on by default)
//! and `fuse.enable_uring` (with `--io-uring`, see [`enable_uring`]).
//!
//! Every FUSE request is a round trip between two tasks: the caller sleeps until a
//! server thread writes the reply, and on a virtual machine waking a task on the other
//! (idle) CPU costs an inter-processor interrupt and a VM exit, often more than the
//! request itself. Kernels that have `/sys/module/fuse/parameters/wake_here` (this
//! project's 6.18 machines do; the function behind it, `fuse_wakes_here`, sits beside
//! the scheduler's `__wake_up_on_current_cpu`) can wake the waiting task on the CPU that
//! wrote the reply instead. Measured on a dev mount with 4 server threads, 2 reps each
//! (see the README's "Speed" section): file creates 2,622–2,903/s → 3,493–4,004/s,
//! unlinks 4,448–4,702/s → 5,677–5,927/s, O_DIRECT 4 KiB reads and fsync'd 4 KiB
//! writes unchanged within the noise.
//!
//! The parameter is node-wide (it applies to every FUSE filesystem of the node) and only
//! changes on which CPU a woken task runs, never what a request does. fusevol turns it on
//! at start (`fusevol mount --fuse-wake-here`, the agent's `fuse_wake_here`, both on by
//! default), leaves it on when it exits, and never turns it off: a node's owner who
//! wants it off sets the option to false. A kernel without it, or a read-only `/sys`, is
//! logged and changes nothing else.

use std::io;
use std::path::Path;

/// Where the kernel exposes the parameter.
pub const WAKE_HERE: &str = "/sys/module/fuse/parameters/wake_here";

/// What [`enable`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It was off; fusevol turned it on.
    Enabled,
    /// It was on already.
    AlreadyOn,
    /// This kernel has no such parameter.
    Absent,
}

/// Turns the boolean module parameter at `param` on (the kernel's `Y`).
pub fn enable(param: &Path) -> io::Result<Outcome> {
    let current = match std::fs::read_to_string(param) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Absent),
        Err(e) => return Err(e),
    };
    if matches!(current.trim(), "Y" | "y" | "1") {
        return Ok(Outcome::AlreadyOn);
    }
    std::fs::write(param, "Y\n")?;
    Ok(Outcome::Enabled)
}

/// Turns `fuse.wake_here` on for the node if `wanted` and the kernel has it; logs what it
/// did. Never fails: the parameter is a speed setting, not a condition for serving. Where
/// FUSE is a module not loaded yet (no FUSE mount since boot), `/sys/module/fuse` appears
/// only once `/dev/fuse` is opened: it is opened (and closed) first.
pub fn apply(wanted: bool) {
    if !wanted {
        tracing::debug!("fuse.wake_here left as the kernel has it (fuse_wake_here = false)");
        return;
    }
    load_module(Path::new(WAKE_HERE));
    match enable(Path::new(WAKE_HERE)) {
        Ok(Outcome::Enabled) => tracing::info!(
            param = WAKE_HERE,
            "turned on for the node: tasks waiting for a FUSE reply wake on the replying CPU"
        ),
        Ok(Outcome::AlreadyOn) => tracing::debug!(param = WAKE_HERE, "already on"),
        Ok(Outcome::Absent) => {
            tracing::debug!(
                param = WAKE_HERE,
                "this kernel has no fuse.wake_here; nothing to set"
            )
        }
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => tracing::debug!(
            param = WAKE_HERE,
            %error,
            "not permitted to turn fuse.wake_here on (not root?)"
        ),
        Err(error) => tracing::warn!(
            param = WAKE_HERE,
            %error,
            "cannot turn fuse.wake_here on (read-only /sys?); FUSE round trips stay slower"
        ),
    }
}

/// Where FUSE is a module not loaded yet (no FUSE mount since boot), its parameters
/// appear only once `/dev/fuse` is opened: opens (and closes) it if `param` is missing.
/// Harmless elsewhere.
fn load_module(param: &Path) {
    if !param.exists() {
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse");
    }
}

/// Where the kernel (6.14+) lets FUSE servers choose io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Turns `fuse.enable_uring` on for a server asked to serve over io_uring (`--io-uring`);
/// logs what it did, never fails. The parameter only offers the choice to FUSE servers
/// that ask for it in INIT: others are unaffected. With a connection holder
/// (`held`) io_uring is not used and nothing is changed.
pub fn enable_uring(held: bool) {
    if held {
        tracing::warn!("--io-uring is not used with --fdstore: a request a ring of a dead server had taken would never be answered; serving through /dev/fuse");
        return;
    }
    load_module(Path::new(ENABLE_URING));
    match enable(Path::new(ENABLE_URING)) {
        Ok(Outcome::Enabled) => tracing::info!(
            param = ENABLE_URING,
            "turned on for the node: FUSE servers may ask for io_uring"
        ),
        Ok(Outcome::AlreadyOn) => tracing::debug!(param = ENABLE_URING, "already on"),
        Ok(Outcome::Absent) => tracing::warn!(
            param = ENABLE_URING,
            "this kernel has no FUSE over io_uring (6.14+); serving through /dev/fuse"
        ),
        Err(error) => {
            tracing::warn!(param = ENABLE_URING, %error, "cannot turn FUSE over io_uring on; serving through /dev/fuse")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wake_here"), text).unwrap();
        dir
    }

    fn read(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("wake_here")).unwrap()
    }

    #[test]
    fn an_off_parameter_is_turned_on() {
        let dir = param("N\n");
        assert_eq!(
            enable(&dir.path().join("wake_here")).unwrap(),
            Outcome::Enabled
        );
        assert_eq!(read(&dir), "Y\n");
    }

    #[test]
    fn an_on_parameter_is_left_alone() {
        for on in ["Y\n", "1\n"] {
            let dir = param(on);
            assert_eq!(
                enable(&dir.path().join("wake_here")).unwrap(),
                Outcome::AlreadyOn
            );
            assert_eq!(read(&dir), on, "rewritten");
        }
    }

    #[test]
    fn a_kernel_without_it_is_absent_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("wake_here");
        assert_eq!(enable(&missing).unwrap(), Outcome::Absent);
        assert!(
            !missing.exists(),
            "a file was created where the kernel has none"
        );
    }

    #[test]
    fn an_unwritable_parameter_is_an_error() {
        // A directory in its place: reading it fails with EISDIR, as a stand-in for a
        // parameter that cannot be read or written.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("wake_here")).unwrap();
        assert!(enable(&dir.path().join("wake_here")).is_err());
    }
}
