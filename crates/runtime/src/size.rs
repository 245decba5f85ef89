//! Byte sizes as spillway reads and prints them everywhere (command line, settings, fault
//! plans): "4KiB", "1M", "2GB", "4096".

/// Parses a byte count that must be at least one byte: [`parse_bytes`], refusing zero.
/// Every size spillway's settings and flags take is one of these.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bytes = parse_bytes(text)?;
    if bytes == 0 {
        return Err(format!("'{text}': the size must be at least 1 byte"));
    }
    Ok(bytes)
}

/// Parses a byte count, zero included. Binary units: K, M, G, T, KiB, MiB, GiB, TiB (powers
/// of 1024, as fio and gdsio read them); decimal units: KB, MB, GB, TB (powers of 1000); a
/// bare number is bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "'{text}' is not a size: write a whole number with an optional unit, e.g. 4096, 4KiB, 1M, 2GiB"
        ));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "'{text}': unknown unit '{other}'; use K, M, G, T (or KiB, MiB, GiB, TiB) for powers of 1024, KB, MB, GB, TB for powers of 1000"
            ))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large a size"))
}

/// Formats a byte count with a binary unit, e.g. "1 MiB", "1.5 GiB", "511 B".
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

/// A byte count with the largest binary unit that divides it, as [`parse_bytes`] reads it
/// back exactly ("512MiB", "4KiB", "1000").
pub fn exact_size_text(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| n != 0 && n.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", n / unit))
        .unwrap_or_else(|| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size(" 1 MiB ").unwrap(), 1 << 20);
    }

    #[test]
    fn refuses_bad_sizes() {
        for bad in [
            "",
            "0",
            "0M",
            "abc",
            "-1",
            "1.5G",
            "12Q",
            "99999999999999999999",
            "20000000T",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(parse_size("0").unwrap_err().contains("at least 1 byte"));
        assert!(parse_size("12Q").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(511), "511 B");
        assert_eq!(format_size(1 << 20), "1 MiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
