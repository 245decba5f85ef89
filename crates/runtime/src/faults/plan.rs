//! [`FaultPlan`]: which faults to inject and how often, parsed from and printed as text
//! like `read_error=0.01,short=0.05,enospc_after=1GiB,latency=2ms,seed=7`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The seed of a plan that names none: runs are reproducible unless asked otherwise.
pub const DEFAULT_SEED: u64 = 0x5eed_fa17;

/// Which requests a plan's faults apply to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultOps {
    /// Reads only: writes pass through untouched.
    Read,
    /// Writes only: reads pass through untouched.
    Write,
    /// Reads and writes.
    #[default]
    Both,
}

impl FaultOps {
    /// "read", "write" or "both".
    pub fn as_str(self) -> &'static str {
        match self {
            FaultOps::Read => "read",
            FaultOps::Write => "write",
            FaultOps::Both => "both",
        }
    }

    /// Whether faults apply to a read (`write == false`) or a write.
    pub fn covers(self, write: bool) -> bool {
        match self {
            FaultOps::Read => !write,
            FaultOps::Write => write,
            FaultOps::Both => true,
        }
    }
}

/// What a [`FaultyBackend`](super::FaultyBackend) injects; its documentation says what each
/// fault does.
///
/// The text form is comma-separated `key=value` items, applied left to right (a later key
/// overrides an earlier one: `error=0.1,read_error=0.2`). `""`, `none` and `off` are the
/// plan that injects nothing. [`Display`](fmt::Display) prints the plan in the same form,
/// leaving out keys at their defaults, and [`FaultPlan::parse`] reads it back to an equal
/// plan.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    /// `read_error`: probability that a read fails with EIO (nothing is read).
    pub read_error: f64,
    /// `write_error`: probability that a write fails with EIO (nothing is written).
    pub write_error: f64,
    /// `short`: probability that a request of more than 4096 bytes moves only a prefix of
    /// its bytes (a multiple of 4096) and completes with that shorter count.
    pub short: f64,
    /// `enospc_after`: bytes that writes through the wrapper may send to the inner
    /// backend in all; a write that would take the total past it fails with ENOSPC.
    pub enospc_after: Option<u64>,
    /// `latency`: how much later than the inner backend a delayed request completes
    /// (zero: none is delayed).
    pub latency: Duration,
    /// `latency_p`: probability that a request is delayed by `latency` (default 1).
    pub latency_p: f64,
    /// `seed`: the seed of the random choices (0x5eed_fa17 when not given).
    pub seed: u64,
    /// `ops`: the requests faults apply to (default both).
    pub ops: FaultOps,
}

impl Default for FaultPlan {
    /// The plan that injects nothing.
    fn default() -> Self {
        FaultPlan {
            read_error: 0.0,
            write_error: 0.0,
            short: 0.0,
            enospc_after: None,
            latency: Duration::ZERO,
            latency_p: 1.0,
            seed: DEFAULT_SEED,
            ops: FaultOps::Both,
        }
    }
}

/// The keys a plan's text takes, for error messages.
pub const KEYS: &str = "read_error, write_error, error, short, enospc_after, latency, latency_p, seed, ops";

impl FaultPlan {
    /// Parses a plan (see the type's documentation for the form). A bad item is refused
    /// with a message naming the text, the key and what it accepts, e.g.
    /// `faults: "read_error=2": read_error is a probability from 0 to 1`.
    pub fn parse(text: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("none") || trimmed.eq_ignore_ascii_case("off") {
            return Ok(plan);
        }
        let mut latency_p_given = false;
        for item in trimmed.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |why: String| format!("faults: \"{item}\": {why}");
            let Some((key, value)) = item.split_once('=') else {
                return Err(bad(format!("expected key=value, with a key among {KEYS}")));
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "read_error" => plan.read_error = probability(key, value).map_err(bad)?,
                "write_error" => plan.write_error = probability(key, value).map_err(bad)?,
                "error" => {
                    let p = probability(key, value).map_err(bad)?;
                    plan.read_error = p;
                    plan.write_error = p;
                }
                "short" => plan.short = probability(key, value).map_err(bad)?,
                "enospc_after" => {
                    plan.enospc_after = Some(
                        crate::size::parse_bytes(value)
                            .map_err(|e| bad(format!("enospc_after is a size of 0 or more bytes: {e}")))?,
                    )
                }
                "latency" => plan.latency = parse_duration(value).map_err(|e| bad(format!("latency {e}")))?,
                "latency_p" => {
                    plan.latency_p = probability(key, value).map_err(bad)?;
                    latency_p_given = true;
                }
                "seed" => {
                    plan.seed = value
                        .parse()
                        .map_err(|_| bad("seed is a whole number from 0 to 2^64-1".into()))?
                }
                "ops" => {
                    plan.ops = match value {
                        "read" => FaultOps::Read,
                        "write" => FaultOps::Write,
                        "both" => FaultOps::Both,
                        _ => return Err(bad("ops is one of read, write, both".into())),
                    }
                }
                _ => return Err(bad(format!("unknown key \"{key}\"; the keys are {KEYS}"))),
            }
        }
        if latency_p_given && plan.latency.is_zero() {
            return Err(format!(
                "faults: \"{text}\": latency_p needs latency=DURATION (e.g. latency=2ms)"
            ));
        }
        plan.check().map_err(|e| format!("faults: \"{text}\": {e}"))?;
        Ok(plan)
    }

    /// Checks a plan built in code: probabilities from 0 to 1, and no fault that `ops`
    /// rules out (a read error under `ops=write`, ENOSPC under `ops=read`).
    pub fn check(&self) -> Result<(), String> {
        for (key, p) in [
            ("read_error", self.read_error),
            ("write_error", self.write_error),
            ("short", self.short),
            ("latency_p", self.latency_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{key} is a probability from 0 to 1, not {p}"));
            }
        }
        match self.ops {
            FaultOps::Write if self.read_error > 0.0 => Err("read_error has no effect with ops=write".into()),
            FaultOps::Read if self.write_error > 0.0 => Err("write_error has no effect with ops=read".into()),
            FaultOps::Read if self.enospc_after.is_some() => {
                Err("enospc_after has no effect with ops=read".into())
            }
            _ => Ok(()),
        }
    }

    /// True when the plan injects nothing (every request passes through unchanged).
    pub fn is_none(&self) -> bool {
        self.read_error == 0.0
            && self.write_error == 0.0
            && self.short == 0.0
            && self.enospc_after.is_none()
            && (self.latency.is_zero() || self.latency_p == 0.0)
    }
}

impl FromStr for FaultPlan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultPlan::parse(s)
    }
}

impl fmt::Display for FaultPlan {
    /// The text form, keys at their defaults left out; `none` for the empty plan with the
    /// default seed and ops.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = Vec::new();
        if self.read_error == self.write_error {
            if self.read_error != 0.0 {
                items.push(format!("error={}", self.read_error));
            }
        } else {
            if self.read_error != 0.0 {
                items.push(format!("read_error={}", self.read_error));
            }
            if self.write_error != 0.0 {
                items.push(format!("write_error={}", self.write_error));
            }
        }
        if self.short != 0.0 {
            items.push(format!("short={}", self.short));
        }
        if let Some(n) = self.enospc_after {
            items.push(format!("enospc_after={}", crate::size::exact_size_text(n)));
        }
        if !self.latency.is_zero() {
            items.push(format!("latency={}", duration_text(self.latency)));
            if self.latency_p != 1.0 {
                items.push(format!("latency_p={}", self.latency_p));
            }
        }
        if self.seed != DEFAULT_SEED {
            items.push(format!("seed={}", self.seed));
        }
        if self.ops != FaultOps::Both {
            items.push(format!("ops={}", self.ops.as_str()));
        }
        if items.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&items.join(","))
        }
    }
}

fn probability(key: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{key} is a probability from 0 to 1")),
    }
}

/// A duration: a number (decimals allowed) and a unit, `ns`, `us`, `ms` or `s`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    const ACCEPTS: &str = "is a duration: a number and a unit among ns, us, ms, s, e.g. 2ms, 500us, 1.5s";
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| ACCEPTS.to_string())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| ACCEPTS.to_string())?;
    let unit_ns = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return Err(ACCEPTS.to_string()),
    };
    let ns = (value * unit_ns).round();
    // An hour is far more than any test waits for; a bound keeps the arithmetic safe.
    if !ns.is_finite() || ns > 3.6e12 {
        return Err("is at most 3600s".into());
    }
    Ok(Duration::from_nanos(ns as u64))
}

/// A duration in the largest of s, ms, us, ns that divides it exactly.
fn duration_text(d: Duration) -> String {
    let ns = d.as_nanos();
    [(1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us")]
        .iter()
        .find(|(unit, _)| ns.is_multiple_of(*unit))
        .map(|(unit, name)| format!("{}{name}", ns / unit))
        .unwrap_or_else(|| format!("{ns}ns"))
}
