//! Sizes written as Kubernetes quantities (`64Mi`, `10Gi`, `500M`, `1e9`, `1024`),
//! parsed into bytes. Owns nothing else.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (use a Kubernetes quantity such as 512Mi, 10Gi, 500M or 1048576)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

/// A byte count parsed from a Kubernetes quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, SizeError> {
        parse_quantity(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

/// Parses a Kubernetes quantity into bytes. Fractions are allowed when the result is a
/// whole number of bytes after rounding up (as Kubernetes rounds storage requests up).
pub fn parse_quantity(input: &str) -> Result<u64, SizeError> {
    let fail = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(fail("empty"));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') && num.len() == 1 {
        return Err(fail("no number"));
    }
    if num.matches('.').count() > 1 {
        return Err(fail("malformed number"));
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| fail("unknown suffix"))?;
            10u128.checked_pow(exp).ok_or(fail("too large"))?
        }
        _ => return Err(fail("unknown suffix")),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| fail("malformed number"))?
    };
    let mut total = int.checked_mul(multiplier).ok_or(fail("too large"))?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(fail("too many decimals"));
        }
        let digits: u128 = frac.parse().map_err(|_| fail("malformed number"))?;
        let scale = 10u128.pow(frac.len() as u32);
        let part = (digits * multiplier).div_ceil(scale);
        total = total.checked_add(part).ok_or(fail("too large"))?;
    }
    u64::try_from(total).map_err(|_| fail("too large"))
}

/// Binary suffixes and their power of two, largest first.
pub const BINARY_UNITS: [(&str, u32); 6] = [
    ("Ei", 60),
    ("Pi", 50),
    ("Ti", 40),
    ("Gi", 30),
    ("Mi", 20),
    ("Ki", 10),
];

/// Formats bytes with the largest binary suffix that divides them exactly.
pub fn format_bytes(b: u64) -> String {
    for (suffix, shift) in BINARY_UNITS {
        if b != 0 && b.is_multiple_of(1u64 << shift) {
            return format!("{}{}", b >> shift, suffix);
        }
    }
    b.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_kubernetes_quantities() {
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1024"), Ok(1024));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("1e3"), Ok(1000));
        assert_eq!(parse_quantity("2k"), Ok(2000));
        assert_eq!(parse_quantity("0.5"), Ok(1), "fractions of a byte round up");
    }

    #[test]
    fn rejects_bad_quantities() {
        for bad in [
            "", "12Qx", "Gi", "-5Mi", "1.2.3", "1 Gi", "16Ei", "1e40", "abc",
        ] {
            let e = parse_quantity(bad).unwrap_err();
            assert!(e.to_string().contains("invalid size"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn formatted_sizes_parse_back(b in any::<u64>()) {
            prop_assert_eq!(parse_quantity(&format_bytes(b)), Ok(b));
        }

        #[test]
        fn binary_suffixes_scale(n in 0u64..1_000_000) {
            prop_assert_eq!(parse_quantity(&format!("{n}Ki")), Ok(n * 1024));
            prop_assert_eq!(parse_quantity(&format!("{n}Mi")), Ok(n << 20));
        }
    }
}
