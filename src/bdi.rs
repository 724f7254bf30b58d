//! The dirty-page bound of a FUSE mount's writeback device (bdi), set after mounting.
//!
//! The kernel gives every FUSE mount its own bdi, `/sys/class/bdi/0:<minor>` (the minor of
//! the mount's `st_dev`, its FUSE connection number), with `strict_limit` 1 and `max_ratio`
//! 1: at most 1 % of the node's dirty threshold (some tens of MiB) may be dirty in the
//! volume's page cache before its writers are throttled. That is a guard against FUSE
//! servers nobody trusts; fusevol's own mounts deserve a larger bound: buffered 4 KiB
//! random writes ran 1.54× as fast with 256 MiB (bench/results/2026-12-02, targets
//! `fusevol` and `fusevol-kdirty`).
//!
//! [`DirtyLimit`] is what to set (a byte bound, preferred, or a percentage of the node's
//! dirty threshold); [`apply`] writes it. Strict limiting stays on, so the bound holds for
//! each volume separately, whatever the others do. This module owns only those sysfs
//! files. It never fails a mount: a read-only `/sys` (an unprivileged container) leaves
//! the kernel's default, with a warning.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::size::{format_bytes, parse_quantity};

/// Where the kernel lists writeback devices.
const BDI_ROOT: &str = "/sys/class/bdi";

/// The most a mount's dirty pages may take, set in its bdi after mounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLimit {
    /// Leave the kernel's default (`max_ratio` 1 for FUSE).
    Kernel,
    /// A percentage (1..=100) of the node's dirty threshold: `max_ratio`.
    Percent(u8),
    /// Bytes: `max_bytes` (Linux 6.2+; the kernel turns it into a share of the dirty
    /// threshold when it is written). Older kernels get the matching `max_ratio`.
    Bytes(u64),
}

/// fusevol's default: a quarter of a GiB of dirty pages per volume (the measurement
/// behind it: bench/results/2026-12-02).
pub const DEFAULT: DirtyLimit = DirtyLimit::Bytes(256 << 20);

/// A [`DirtyLimit`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid dirty-page limit {0:?}: use a size (256Mi), a percentage of the node's dirty threshold (1% to 100%), or 0 for the kernel's default")]
pub struct DirtyLimitError(pub String);

impl std::str::FromStr for DirtyLimit {
    type Err = DirtyLimitError;
    fn from_str(s: &str) -> Result<Self, DirtyLimitError> {
        let bad = || DirtyLimitError(s.to_string());
        let t = s.trim();
        if let Some(percent) = t.strip_suffix('%') {
            return match percent.trim().parse::<u8>() {
                Ok(0) => Ok(DirtyLimit::Kernel),
                Ok(p) if p <= 100 => Ok(DirtyLimit::Percent(p)),
                _ => Err(bad()),
            };
        }
        match parse_quantity(t).map_err(|_| bad())? {
            0 => Ok(DirtyLimit::Kernel),
            bytes => Ok(DirtyLimit::Bytes(bytes)),
        }
    }
}

impl fmt::Display for DirtyLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLimit::Kernel => f.write_str("0"),
            DirtyLimit::Percent(p) => write!(f, "{p}%"),
            DirtyLimit::Bytes(b) => f.write_str(&format_bytes(*b)),
        }
    }
}

/// The bdi directory of FUSE connection `conn`.
pub fn bdi_dir(conn: u32) -> PathBuf {
    Path::new(BDI_ROOT).join(format!("0:{conn}"))
}

/// Sets `limit` on the bdi of FUSE connection `conn` (if known) and logs what it did; a
/// refusal is a warning, never an error.
pub fn set_for_connection(conn: Option<u32>, limit: DirtyLimit, volume: &str) {
    if limit == DirtyLimit::Kernel {
        return;
    }
    let Some(conn) = conn else {
        tracing::warn!(
            volume,
            "FUSE connection unknown: the kernel's dirty-page limit stays"
        );
        return;
    };
    match apply(&bdi_dir(conn), limit) {
        Ok(set) => tracing::debug!(volume, conn, set, "dirty-page limit set"),
        Err(error) => {
            tracing::warn!(volume, conn, %error, %limit, "cannot raise the dirty-page limit of the mount; the kernel's default (1% of the dirty threshold) stays")
        }
    }
}

/// Writes `limit` into the bdi directory `dir`; returns what was written (`file=value`).
pub fn apply(dir: &Path, limit: DirtyLimit) -> io::Result<String> {
    match limit {
        DirtyLimit::Kernel => Ok(String::new()),
        DirtyLimit::Percent(p) => write(dir, "max_ratio", u64::from(p)),
        DirtyLimit::Bytes(bytes) if dir.join("max_bytes").exists() => {
            match write(dir, "max_bytes", bytes) {
                // More than the node's whole dirty threshold: the whole of it.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => write(dir, "max_ratio", 100),
                r => r,
            }
        }
        DirtyLimit::Bytes(bytes) => {
            let threshold = std::fs::read_to_string("/proc/vmstat")
                .ok()
                .and_then(|t| dirty_threshold_bytes(&t, page_size()))
                .ok_or_else(|| io::Error::other("no nr_dirty_threshold in /proc/vmstat"))?;
            write(dir, "max_ratio", u64::from(ratio_for(bytes, threshold)))
        }
    }
}

fn write(dir: &Path, file: &str, value: u64) -> io::Result<String> {
    std::fs::write(dir.join(file), format!("{value}\n"))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))?;
    Ok(format!("{file}={value}"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The node's dirty threshold in bytes, from the text of /proc/vmstat.
fn dirty_threshold_bytes(vmstat: &str, page: u64) -> Option<u64> {
    vmstat.lines().find_map(|l| {
        let value = l.strip_prefix("nr_dirty_threshold ")?;
        value.trim().parse::<u64>().ok()?.checked_mul(page)
    })
}

/// The smallest whole percentage of `threshold` that holds `bytes` (1..=100).
fn ratio_for(bytes: u64, threshold: u64) -> u8 {
    if threshold == 0 {
        return 100;
    }
    let percent = (u128::from(bytes) * 100).div_ceil(u128::from(threshold));
    u8::try_from(percent.clamp(1, 100)).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_sizes_percentages_or_zero() {
        let cases: &[(&str, DirtyLimit)] = &[
            ("0", DirtyLimit::Kernel),
            ("0%", DirtyLimit::Kernel),
            ("256Mi", DirtyLimit::Bytes(256 << 20)),
            ("1G", DirtyLimit::Bytes(1_000_000_000)),
            ("20%", DirtyLimit::Percent(20)),
            (" 100% ", DirtyLimit::Percent(100)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DirtyLimit>(), Ok(*want), "{text:?}");
        }
        for bad in ["", "101%", "-5%", "lots", "%", "1.5%"] {
            assert!(bad.parse::<DirtyLimit>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn limits_print_as_they_parse() {
        for text in ["0", "20%", "256Mi"] {
            let limit: DirtyLimit = text.parse().unwrap();
            assert_eq!(limit.to_string().parse::<DirtyLimit>(), Ok(limit));
        }
    }

    #[test]
    fn the_dirty_threshold_is_read_from_vmstat() {
        let text = "nr_dirty 12\nnr_dirty_threshold 1138437\nnr_dirty_background_threshold 5\n";
        assert_eq!(dirty_threshold_bytes(text, 4096), Some(1138437 * 4096));
        assert_eq!(dirty_threshold_bytes("nr_dirty 12\n", 4096), None);
    }

    #[test]
    fn a_byte_bound_becomes_the_smallest_percentage_holding_it() {
        assert_eq!(ratio_for(256 << 20, 1 << 30), 25);
        assert_eq!(ratio_for((256 << 20) + 1, 1 << 30), 26);
        assert_eq!(ratio_for(1, 1 << 30), 1);
        assert_eq!(ratio_for(8 << 30, 1 << 30), 100);
        assert_eq!(ratio_for(5, 0), 100);
    }

    fn fake_bdi(with_max_bytes: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("max_ratio"), "1\n").unwrap();
        std::fs::write(dir.path().join("strict_limit"), "1\n").unwrap();
        if with_max_bytes {
            std::fs::write(dir.path().join("max_bytes"), "46077788\n").unwrap();
        }
        dir
    }

    fn read(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file)).unwrap()
    }

    #[test]
    fn apply_writes_the_byte_bound_and_leaves_strict_limiting_on() {
        let dir = fake_bdi(true);
        let set = apply(dir.path(), DirtyLimit::Bytes(256 << 20)).unwrap();
        assert_eq!(set, format!("max_bytes={}", 256 << 20));
        assert_eq!(read(dir.path(), "max_bytes"), format!("{}\n", 256 << 20));
        assert_eq!(read(dir.path(), "max_ratio"), "1\n");
        assert_eq!(read(dir.path(), "strict_limit"), "1\n");
    }

    #[test]
    fn apply_writes_a_percentage_as_max_ratio() {
        let dir = fake_bdi(true);
        assert_eq!(
            apply(dir.path(), DirtyLimit::Percent(20)).unwrap(),
            "max_ratio=20"
        );
        assert_eq!(read(dir.path(), "max_ratio"), "20\n");
        assert_eq!(read(dir.path(), "max_bytes"), "46077788\n");
    }

    #[test]
    fn without_max_bytes_a_byte_bound_becomes_a_ratio() {
        let dir = fake_bdi(false);
        let set = apply(dir.path(), DirtyLimit::Bytes(1 << 40)).unwrap();
        assert_eq!(set, "max_ratio=100", "1 TiB exceeds any dirty threshold");
        assert_eq!(read(dir.path(), "max_ratio"), "100\n");
        assert!(!dir.path().join("max_bytes").exists());
    }

    #[test]
    fn the_kernel_default_touches_nothing_and_a_missing_bdi_is_an_error() {
        let dir = fake_bdi(true);
        assert_eq!(apply(dir.path(), DirtyLimit::Kernel).unwrap(), "");
        assert_eq!(read(dir.path(), "max_ratio"), "1\n");
        let gone = dir.path().join("0:999");
        assert!(apply(&gone, DirtyLimit::Percent(5)).is_err());
    }
}
