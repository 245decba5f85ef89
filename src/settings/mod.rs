//! Settings: every setting of the offload engine, its device and its backend, in one table
//! ([`SETTINGS`]), given in layers — lowest to highest:
//!
//! 1. defaults;
//! 2. the TOML file named by `SPILLWAY_CONFIG` (none when unset);
//! 3. `SPILLWAY_*` environment variables (`SPILLWAY_STAGING_BYTES=1GiB`);
//! 4. API arguments ([`Settings::set`]).
//!
//! ```no_run
//! # fn main() -> Result<(), spillway::settings::SettingsError> {
//! let mut settings = spillway::settings::Settings::load()?; // defaults, file, environment
//! settings.set("staging_bytes", "1GiB")?; // an argument overrides them all
//! let resolved = settings.resolve()?; // checked together
//! # let _ = resolved; Ok(()) }
//! ```
//!
//! Every refusal names the setting, where its value came from and what it takes.
//! `docs/settings.md` is generated from the table ([`markdown`]).

mod docs;
mod environment;
mod error;
mod table;
#[cfg(test)]
mod tests;
mod value;

use std::path::Path;

use spillway_runtime::engine::{EngineConfig, SetSizes};
use spillway_runtime::FaultPlan;

use crate::choice::{BackendChoice, MemChoice};
use crate::rank::RankPaths;
use crate::select::Choices;

pub use docs::markdown;
pub use environment::{suggest, CONFIG_VAR, OTHER_VARIABLES, PREFIX};
pub use error::{SettingsError, Source};
pub use table::{
    find, names, Kind, Setting, MAX_PACK_FLUSH_DELAY_MS, MAX_PINNED_BYTES, MAX_QUEUE_DEPTH, MAX_THREADS,
    MAX_TIMELINE_CAPACITY, SETTINGS,
};
pub use value::Value;

use environment::Variable;

/// Settings resolved and checked: what [`crate::select::setup`] and the engine take.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Device and backend choices.
    pub choices: Choices,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// Bytes of the pinned host-memory tier in front of storage (0: none).
    pub host_tier: u64,
    /// Files one directory path is spread over (0: chosen by its filesystem, see
    /// [`crate::open`]).
    pub spread_files: u32,
    /// Bytes per stripe unit when the storage is several paths.
    pub stripe_bytes: u64,
    /// Stripe units per round of each path (empty: one each).
    pub stripe_weights: Vec<u32>,
    /// Storage paths per local rank (empty: the paths given).
    pub rank_paths: RankPaths,
    /// Faults to inject into the backend's requests, for testing resilience
    /// ([`FaultPlan::is_none`]: none, the default). [`crate::select::setup`] wraps the
    /// backend in a [`spillway_runtime::FaultyBackend`] when it injects anything.
    pub faults: FaultPlan,
}

impl Default for Resolved {
    /// Every setting's default.
    fn default() -> Self {
        Resolved {
            choices: Choices {
                backend: BackendChoice::Auto,
                mem: MemChoice::Auto,
                gpu: None,
                queue_depth: spillway_runtime::DEFAULT_QUEUE_DEPTH,
                threads: 1,
                pinned_bytes: None,
                pci: None,
            },
            engine: EngineConfig::default(),
            host_tier: 0,
            spread_files: 0,
            stripe_bytes: DEFAULT_STRIPE_BYTES,
            stripe_weights: Vec::new(),
            rank_paths: RankPaths::default(),
            faults: FaultPlan::default(),
        }
    }
}

/// The most storage paths one engine or bench stripes over: each gets backends (rings,
/// threads, pinned staging memory) of its own.
pub const MAX_PATHS: usize = 64;

/// The largest settings file read (`SPILLWAY_CONFIG`): a settings file is a few hundred
/// bytes; anything larger is not one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The default stripe unit: 1 MiB.
pub const DEFAULT_STRIPE_BYTES: u64 = 1 << 20;

/// Every setting's value and where it came from, layer on layer.
#[derive(Clone, Debug)]
pub struct Settings {
    values: Resolved,
    /// Per setting (in [`SETTINGS`] order), where its value came from.
    sources: Vec<Source>,
}

impl Default for Settings {
    /// Every setting at its default.
    fn default() -> Self {
        Settings {
            values: Resolved::default(),
            sources: vec![Source::Default; SETTINGS.len()],
        }
    }
}

impl Settings {
    /// Defaults, then the file named by `SPILLWAY_CONFIG`, then the `SPILLWAY_*` variables
    /// of this process's environment.
    pub fn load() -> Result<Settings, SettingsError> {
        let mut env = Vec::new();
        for (var, value) in std::env::vars_os() {
            // A variable whose name is not text is none of ours.
            let Some(var) = var.to_str() else { continue };
            if var != CONFIG_VAR && !matches!(environment::classify(var), Variable::Setting(_)) {
                if let Some(value) = value.to_str() {
                    env.push((var.to_string(), value.to_string()));
                }
                continue;
            }
            let value = value.into_string().map_err(|raw| {
                SettingsError::other(
                    None,
                    Some(Source::Env(var.to_string())),
                    format!(
                        "environment variable {var} is not valid UTF-8 ({raw:?}): set it to text or unset it"
                    ),
                )
            })?;
            env.push((var.to_string(), value));
        }
        Settings::load_from(env)
    }

    /// Defaults, then the file named by `SPILLWAY_CONFIG` in `env`, then the `SPILLWAY_*`
    /// variables of `env` (other variables are ignored): [`Settings::load`] on a given
    /// environment.
    pub fn load_from<I, K, V>(env: I) -> Result<Settings, SettingsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        let mut settings = Settings::default();
        if let Some((_, path)) = env.iter().find(|(k, _)| k == CONFIG_VAR) {
            if path.trim().is_empty() {
                return Err(SettingsError::other(
                    None,
                    Some(Source::Env(CONFIG_VAR.into())),
                    format!("{CONFIG_VAR} is set but empty: name a TOML settings file, or unset it"),
                ));
            }
            settings.apply_file(Path::new(path))?;
        }
        settings.apply_env(env)?;
        Ok(settings)
    }

    /// Applies the TOML settings file at `path`: one top-level key per setting, named as
    /// the setting. Refuses an unreadable file, invalid TOML, an unknown key and a bad value.
    pub fn apply_file(&mut self, path: &Path) -> Result<(), SettingsError> {
        let source = Source::File(path.to_path_buf());
        let text = read_config(path).map_err(|e| {
            SettingsError::other(
                None,
                Some(source.clone()),
                format!(
                    "cannot read the settings file {} ({CONFIG_VAR} names it): {e}; point {CONFIG_VAR} at a readable TOML file or unset it",
                    path.display()
                ),
            )
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            SettingsError::other(
                None,
                Some(source.clone()),
                format!(
                    "{}: not a valid TOML settings file: {}",
                    path.display(),
                    e.to_string().trim_end()
                ),
            )
        })?;
        for (key, item) in &table {
            let Some((i, setting)) = find(key) else {
                return Err(SettingsError::unknown(key, &source, unknown_reason("key", key)));
            };
            let value = match item {
                toml::Value::Integer(n) => Value::Int(*n),
                toml::Value::Float(x) => Value::Float(*x),
                toml::Value::Boolean(b) => Value::Bool(*b),
                toml::Value::String(s) => Value::Str(s.clone()),
                other => {
                    return Err(SettingsError::value(
                        key,
                        &source,
                        other,
                        format!(
                            "a TOML {} is not a value; {key} takes {}",
                            other.type_str(),
                            setting.kind.accepts()
                        ),
                    ))
                }
            };
            self.set_at(i, &value, source.clone())?;
        }
        Ok(())
    }

    /// Applies the `SPILLWAY_*` variables of `env` that name settings. Refuses a bad value,
    /// and an unknown `SPILLWAY_*` variable close to a setting's (a likely misspelling);
    /// others ([`OTHER_VARIABLES`], or unlike any setting) are ignored.
    pub fn apply_env<I, K, V>(&mut self, env: I) -> Result<(), SettingsError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        env.sort();
        for (var, text) in env {
            match environment::classify(&var) {
                Variable::Setting(i) => self.set_at(i, &Value::Str(text), Source::Env(var))?,
                Variable::Lookalike(reason) => {
                    return Err(SettingsError::unknown(&var, &Source::Env(var.clone()), reason))
                }
                Variable::Other => {}
            }
        }
        Ok(())
    }

    /// Sets `name` to `value` as an API argument, overriding every other layer.
    pub fn set(&mut self, name: &str, value: impl Into<Value>) -> Result<(), SettingsError> {
        self.set_from(name, value, Source::Argument)
    }

    /// Sets `name` to `value`, recording `source` as where it came from.
    pub fn set_from(
        &mut self,
        name: &str,
        value: impl Into<Value>,
        source: Source,
    ) -> Result<(), SettingsError> {
        let (i, _) = known(name, &source)?;
        self.set_at(i, &value.into(), source)
    }

    /// Sets `name` from `source` by `put`, which writes a value already of the setting's type
    /// into the values, unchecked by the table: for a caller whose own parser gives exactly
    /// that type, and says more than the setting's text can (`spillway bench`'s
    /// `--mem host --gpu 1`, which device selection then refuses by name). `put` must write
    /// `name`'s part of the values and nothing else.
    pub fn set_typed(
        &mut self,
        name: &str,
        source: Source,
        put: impl FnOnce(&mut Resolved),
    ) -> Result<(), SettingsError> {
        let (i, _) = known(name, &source)?;
        put(&mut self.values);
        self.sources[i] = source;
        Ok(())
    }

    /// Puts `name` back at its default, as if no layer had set it: for a caller that reads
    /// only some of the settings (`spillway bench`'s seq workload has no engine), so that
    /// the values it ignores are neither checked together nor reported.
    pub fn reset(&mut self, name: &str) -> Result<(), SettingsError> {
        let (i, setting) = known(name, &Source::Default)?;
        self.set_at(i, &setting.default_value(), Source::Default)
    }

    fn set_at(&mut self, i: usize, value: &Value, source: Source) -> Result<(), SettingsError> {
        let setting = &SETTINGS[i];
        setting.set(&mut self.values, value).map_err(|why| {
            let reason = format!("{why}; {} takes {}", setting.name, setting.kind.accepts());
            SettingsError::value(setting.name, &source, value, reason)
        })?;
        self.sources[i] = source;
        Ok(())
    }

    /// Where the value of `name` came from; `None` for a name that is not a setting.
    pub fn source(&self, name: &str) -> Option<&Source> {
        find(name).map(|(i, _)| &self.sources[i])
    }

    /// The value of `name` now; `None` for a name that is not a setting.
    pub fn value(&self, name: &str) -> Option<Value> {
        find(name).map(|(_, s)| s.get(&self.values))
    }

    /// Every setting with its value and where the value came from, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static Setting, Value, &Source)> + '_ {
        SETTINGS
            .iter()
            .zip(&self.sources)
            .map(|(s, source)| (s, s.get(&self.values), source))
    }

    /// The values as [`Settings::resolve`] makes them, the sizes left unset fitted to the
    /// staging memory, but not yet checked together: for a caller that refuses a
    /// combination in its own words first (`spillway bench`, naming its flags).
    pub fn fitted(&self) -> Resolved {
        let mut values = self.values.clone();
        let set = |name: &str| self.source(name).is_some_and(|s| *s != Source::Default);
        values.engine.fit_to_staging(SetSizes {
            prefetch_bytes: set("prefetch_bytes"),
            pack_extent_bytes: set("pack_extent_bytes"),
            pack_threshold: set("pack_threshold"),
        });
        values
    }

    /// The settings, once checked together (`prefetch_bytes` at most `staging_bytes`, …);
    /// a refusal names each setting involved and where its value came from. Call it after
    /// the last layer: settings may disagree until then.
    pub fn resolve(&self) -> Result<Resolved, SettingsError> {
        let values = self.fitted();
        values.engine.check().map_err(|e| {
            // The settings the refusal names, each with where its value came from; the one
            // blamed is the first a caller set, else the first named.
            let named: Vec<(&Setting, &Source)> = e
                .settings
                .iter()
                .filter_map(|name| SETTINGS.iter().zip(&self.sources).find(|(s, _)| s.name == *name))
                .collect();
            let wheres: Vec<String> = named
                .iter()
                .map(|(s, src)| format!("{}: {src}", s.name))
                .collect();
            let blamed = named
                .iter()
                .find(|(_, src)| **src != Source::Default)
                .or(named.first());
            let message = if wheres.is_empty() {
                e.to_string()
            } else {
                format!("{e} (sources: {})", wheres.join("; "))
            };
            SettingsError::other(
                blamed.map(|(s, _)| s.name),
                blamed.map(|(_, src)| (*src).clone()),
                message,
            )
        })?;
        Ok(values)
    }
}

/// The text of the settings file at `path`: a regular file of at most
/// [`MAX_CONFIG_BYTES`], in UTF-8. It is opened with `O_NONBLOCK`, so that a FIFO cannot
/// hold up the open, and its type is checked on the descriptor before anything is read, so
/// that a device (`/dev/zero`, a terminal) or a FIFO is refused instead of read forever.
fn read_config(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "it is {}, not a regular file",
                spillway_runtime::file_kind(&meta.file_type())
            ),
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "it holds {} bytes, more than a settings file may ({MAX_CONFIG_BYTES} bytes, 1 MiB)",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    // A file growing meanwhile is read no further than the limit.
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it grew past {MAX_CONFIG_BYTES} bytes (1 MiB) while being read"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("it is not UTF-8 text ({e})")))
}

/// "unknown key "x" (did you mean "y"?); the settings are …".
fn unknown_reason(what: &str, name: &str) -> String {
    let hint = suggest(name)
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default();
    format!(
        "unknown {what} {name:?}{hint}; the settings are {}",
        names().collect::<Vec<_>>().join(", ")
    )
}

/// The table's index and entry of setting `name`, or the refusal of an unknown name given
/// from `source`.
fn known(name: &str, source: &Source) -> Result<(usize, &'static Setting), SettingsError> {
    find(name).ok_or_else(|| SettingsError::unknown(name, source, unknown_reason("setting", name)))
}
