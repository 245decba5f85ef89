//! [`SettingsError`]: a setting refused, with its name, where its value came from and what
//! it takes; and [`Source`]: where a setting's value came from.

use std::fmt;
use std::path::PathBuf;

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Nothing set it: its default.
    Default,
    /// The TOML file (named by `SPILLWAY_CONFIG`), under the setting's name.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// An API argument (a keyword of `spillway.Engine`).
    Argument,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::Argument => write!(f, "argument"),
        }
    }
}

/// A refused setting (or settings file). Its message names the setting, where the value
/// came from (file and key, environment variable, or argument) and what it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsError {
    setting: Option<String>,
    source: Option<Source>,
    reason: String,
    message: String,
}

impl SettingsError {
    /// `value` given to `setting` from `source` does not fit: `reason` says why, and what
    /// the setting takes.
    pub(super) fn value(setting: &str, source: &Source, value: &impl fmt::Display, reason: String) -> Self {
        let message = match source {
            Source::File(path) => format!("{}: {setting} = {value}: {reason}", path.display()),
            Source::Env(var) => format!("environment variable {var}={value}: {reason}"),
            Source::Argument | Source::Default => format!("argument {setting}={value}: {reason}"),
        };
        SettingsError {
            setting: Some(setting.to_string()),
            source: Some(source.clone()),
            reason,
            message,
        }
    }

    /// `name` from `source` is not a setting; `reason` says so, with the likely one.
    pub(super) fn unknown(name: &str, source: &Source, reason: String) -> Self {
        let message = match source {
            Source::File(path) => format!("{}: {reason}", path.display()),
            Source::Env(_) | Source::Argument | Source::Default => reason.clone(),
        };
        SettingsError {
            setting: Some(name.to_string()),
            source: Some(source.clone()),
            reason,
            message,
        }
    }

    /// Anything else: the settings file cannot be read, or settings do not fit together.
    pub(super) fn other(setting: Option<&str>, source: Option<Source>, message: String) -> Self {
        SettingsError {
            setting: setting.map(str::to_string),
            source,
            reason: message.clone(),
            message,
        }
    }

    /// The setting refused (the name as given, for one that does not exist), if one is.
    pub fn setting(&self) -> Option<&str> {
        self.setting.as_deref()
    }

    /// Where the refused value came from, if one value is to blame.
    pub fn source(&self) -> Option<&Source> {
        self.source.as_ref()
    }

    /// Why it was refused and what is accepted, without saying where the value came from:
    /// for callers that name the place themselves (`spillway.Engine: name=value: reason`).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SettingsError {}

impl From<SettingsError> for spillway_runtime::Error {
    fn from(e: SettingsError) -> Self {
        spillway_runtime::Error::invalid(e.message)
    }
}
