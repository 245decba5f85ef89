//! [`Value`]: a setting's value as it arrives — from the TOML file, the environment or an
//! API argument — and the parsers every layer shares. Text is accepted for every type, so
//! that environment variables (always text) read like the file and the API.

use std::fmt;

use crate::size::parse_size;

/// A setting's value before it is parsed: what TOML, Python and the environment can give.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// true or false.
    Bool(bool),
    /// Text ("16", "true", "512MiB", "cuda:0"…).
    Str(String),
}

impl fmt::Display for Value {
    /// Integers and booleans bare, floats with their fraction, text in double quotes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Float(x)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl Value {
    /// The text, if this is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A whole number of zero or more: an integer, or text of digits.
    fn whole(&self) -> Option<Result<u64, String>> {
        match self {
            Value::Int(n) => Some(u64::try_from(*n).map_err(|_| format!("{n} is negative"))),
            Value::Str(s) if !s.trim().is_empty() && s.trim().bytes().all(|b| b.is_ascii_digit()) => {
                Some(s.trim().parse().map_err(|_| format!("{s:?} is too large")))
            }
            _ => None,
        }
    }

    /// A byte count: a whole number of bytes (zero allowed), or text with a unit
    /// ("512MiB", "4K", "2GB"; see [`parse_size`]).
    pub fn size(&self) -> Result<u64, String> {
        match (self.whole(), self) {
            (Some(n), _) => n,
            (None, Value::Str(s)) => parse_size(s),
            (None, Value::Float(x)) => Err(format!("{x:?} is not a whole number of bytes")),
            (None, _) => Err(format!("{self} is a boolean, not a number of bytes")),
        }
    }

    /// A whole number, zero or more: an integer, or text of digits.
    pub fn whole_number(&self) -> Result<u64, String> {
        self.whole()
            .unwrap_or_else(|| Err(format!("{self} is not a whole number")))
    }

    /// A positive whole number: an integer, or text of digits.
    pub fn count(&self) -> Result<u64, String> {
        match self.whole() {
            Some(Ok(0)) => Err("0 is not a positive integer".into()),
            Some(n) => n,
            None => Err(format!("{self} is not a positive integer")),
        }
    }

    /// A boolean: true/false, or the text "true"/"false", "1"/"0", "yes"/"no", "on"/"off"
    /// (any case). Numbers are refused: `1` for `true` is more often a mistake than not.
    pub fn flag(&self) -> Result<bool, String> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("{self} is not a boolean")),
            },
            _ => Err(format!("{self} is not a boolean")),
        }
    }

    /// A number of zero or more, finite: an integer, a float or text of one ("2.5").
    pub fn non_negative(&self) -> Result<f64, String> {
        let x = match self {
            Value::Int(n) => *n as f64,
            Value::Float(x) => *x,
            Value::Str(s) => s
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{self} is not a number"))?,
            Value::Bool(_) => return Err(format!("{self} is not a number")),
        };
        if x.is_finite() && x >= 0.0 {
            Ok(x)
        } else {
            Err(format!("{self} is not a finite number of zero or more"))
        }
    }

    /// Text, one of `choices` (as given, no case folding).
    pub fn choice<'a>(&self, choices: &[&'a str]) -> Result<&'a str, String> {
        self.as_str()
            .and_then(|s| choices.iter().find(|c| **c == s.trim()).copied())
            .ok_or_else(|| format!("{self} is not one of the choices"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_accepted_for_every_type() {
        assert_eq!(Value::from("16").count(), Ok(16));
        assert_eq!(Value::from("512MiB").size(), Ok(512 << 20));
        assert_eq!(Value::from("0").size(), Ok(0));
        assert_eq!(Value::Int(4096).size(), Ok(4096));
        assert_eq!(Value::from("true").flag(), Ok(true));
        assert_eq!(Value::from("0").flag(), Ok(false));
        assert_eq!(Value::from("2.5").non_negative(), Ok(2.5));
        assert_eq!(Value::Int(3).non_negative(), Ok(3.0));
    }

    #[test]
    fn wrong_types_are_refused() {
        assert!(Value::Int(-1).size().is_err());
        assert!(Value::Bool(true).size().is_err());
        assert!(Value::Float(1.5).size().is_err());
        assert!(Value::Int(0).count().is_err());
        assert!(Value::Int(1).flag().is_err());
        assert!(Value::Float(f64::NAN).non_negative().is_err());
        assert!(Value::Float(-1.0).non_negative().is_err());
        assert!(Value::from("18446744073709551616").count().is_err());
    }
}
