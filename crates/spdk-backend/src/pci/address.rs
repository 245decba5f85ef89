//! [`PciAddress`]: a PCI function's address, `DDDD:BB:DD.F`, as sysfs names it.

use std::fmt;
use std::str::FromStr;

use super::PciError;

/// A PCI function's address: domain (segment), bus, device and function.
///
/// Parses `0000:01:00.0` and the domain-less `01:00.0` (domain 0), as `lspci -D` and `lspci`
/// print them; hex digits in either case. Displays in the form sysfs uses, lower case with at
/// least four domain digits: `0000:01:00.0`. The domain is 32 bits wide because domains
/// behind Intel VMD start at `10000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment group).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0 to 31.
    pub device: u8,
    /// Function number, 0 to 7.
    pub function: u8,
}

impl PciAddress {
    /// The address of `domain:bus:device.function`; `None` when `device` > 31 or `function` > 7.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<PciAddress> {
        (device < 32 && function < 8).then_some(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = PciError;

    fn from_str(s: &str) -> Result<PciAddress, PciError> {
        let bad = |reason: &str| PciError::BadAddress {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (rest, function) = s
            .rsplit_once('.')
            .ok_or_else(|| bad("no '.' before the function number"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [bus, device] => ("0", *bus, *device),
            [domain, bus, device] => (*domain, *bus, *device),
            _ => return Err(bad("expected two or three ':'-separated fields before the '.'")),
        };
        let domain = hex(domain, 1, 8).ok_or_else(|| bad("the domain must be 1 to 8 hex digits"))?;
        let bus = hex(bus, 2, 2).ok_or_else(|| bad("the bus must be 2 hex digits"))?;
        let device = hex(device, 2, 2).ok_or_else(|| bad("the device must be 2 hex digits"))?;
        let function = hex(function, 1, 1).ok_or_else(|| bad("the function must be 1 hex digit"))?;
        if device > 0x1f {
            return Err(bad("the device number must be at most 1f"));
        }
        if function > 7 {
            return Err(bad("the function number must be at most 7"));
        }
        Ok(PciAddress {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// `s` as hex when it has `min..=max` hex digits and nothing else.
fn hex(s: &str, min: usize, max: usize) -> Option<u32> {
    let ok = (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PciAddress, PciError> {
        s.parse()
    }

    #[test]
    fn parses_full_and_short_forms() {
        let a = parse("0000:01:00.0").unwrap();
        assert_eq!(a, PciAddress::new(0, 1, 0, 0).unwrap());
        assert_eq!(parse("01:00.0").unwrap(), a);
        let b = parse("0001:AF:1f.7").unwrap();
        assert_eq!((b.domain, b.bus, b.device, b.function), (1, 0xaf, 0x1f, 7));
        assert_eq!(b.to_string(), "0001:af:1f.7");
        assert_eq!(parse("10000:e1:00.0").unwrap().to_string(), "10000:e1:00.0");
        assert_eq!(a.to_string(), "0000:01:00.0");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "zz",
            "0000:01:00",
            "0000:01:00.8",
            "0000:01:20.0",
            "0000:1:00.0",
            "0000:001:00.0",
            "0000:01:00.00",
            "000000000:01:00.0",
            "0:0000:01:00.0",
            "0000:0g:00.0",
            " 0000:01:00.0",
            "+000:01:00.0",
        ] {
            let err = parse(bad).expect_err(bad);
            let text = err.to_string();
            assert!(matches!(err, PciError::BadAddress { .. }), "{bad}: {text}");
            assert!(
                text.contains("0000:01:00.0"),
                "message shows the expected form: {text}"
            );
        }
    }

    #[test]
    fn orders_by_domain_bus_device_function() {
        let mut v: Vec<PciAddress> = ["0001:00:00.0", "0000:02:00.0", "0000:01:00.1", "0000:01:00.0"]
            .iter()
            .map(|s| parse(s).unwrap())
            .collect();
        v.sort();
        let shown: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            shown,
            ["0000:01:00.0", "0000:01:00.1", "0000:02:00.0", "0001:00:00.0"]
        );
    }
}
