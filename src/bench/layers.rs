//! What the settings layers under the command line (the `SPILLWAY_*` environment variables
//! and the TOML file named by `SPILLWAY_CONFIG`) gave a `spillway bench` run: each value
//! taken ([`Taken`]) and the choices made from them ([`Layers`]). Reports list them, so a
//! result is never silently shaped by the environment, and refusals name them
//! ([`Layers::annotate`]).

use std::fmt;

use serde::Serialize;
use spillway_runtime::Error;

use crate::settings::{self, Settings, Source, Value};

/// One setting's value taken from the environment or the settings file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Taken {
    /// The setting's name, as in `docs/settings.md`.
    pub setting: &'static str,
    /// Its value, as text ("32", "1MiB", "host").
    pub value: String,
    /// Where it came from: the environment variable, or "file PATH".
    pub source: String,
}

impl fmt::Display for Taken {
    /// "queue_depth=32 from SPILLWAY_QUEUE_DEPTH".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} from {}", self.setting, self.value, self.source)
    }
}

/// What the layers under the command line (environment, settings file) gave a bench run.
#[derive(Clone, Debug, Default)]
pub struct Layers {
    /// The settings whose values were taken from the environment or the file: those the
    /// bench has flags for in their order, then the engine's others in the table's, then
    /// `rank_paths`.
    pub taken: Vec<Taken>,
    /// Choices made from them (this local rank's storage paths, from `rank_paths`).
    pub notes: Vec<String>,
}

impl Layers {
    /// The report's notes about the layers: each value taken, then the choices made.
    pub fn report_notes(&self) -> impl Iterator<Item = String> + '_ {
        self.taken
            .iter()
            .map(Taken::to_string)
            .chain(self.notes.iter().cloned())
    }

    /// `e`, saying which values came from outside the command line when any did: a refusal
    /// that names a flag (or a failure to use a device or backend) may be about a value the
    /// flag never gave. Errors without a message of their own are returned as they are.
    pub fn annotate(&self, e: Error) -> Error {
        if self.taken.is_empty() {
            return e;
        }
        let taken: Vec<String> = self.taken.iter().map(Taken::to_string).collect();
        let add = |text: String| format!("{text} (set outside the command line: {})", taken.join(", "));
        match e {
            Error::InvalidArgument(msg) => Error::InvalidArgument(add(msg)),
            Error::Device(msg) => Error::Device(add(msg)),
            Error::Unavailable { what, reason } => Error::Unavailable {
                what,
                reason: add(reason),
            },
            Error::Target { path, reason } => Error::Target {
                path,
                reason: add(reason),
            },
            Error::Io { context, source } => Error::Io {
                context: add(context),
                source,
            },
            other => other,
        }
    }
}

/// The value of `name` when the environment or the file gave it; `None` at its default.
pub(super) fn taken(settings: &Settings, name: &'static str) -> Option<Taken> {
    let source = match settings.source(name)? {
        Source::Env(var) => var.clone(),
        Source::File(path) => format!("file {}", path.display()),
        Source::Default | Source::Argument => return None,
    };
    let (_, setting) = settings::find(name)?;
    let value = match settings.value(name)? {
        Value::Str(text) => text,
        other => setting.kind.show(&other),
    };
    Some(Taken {
        setting: name,
        value,
        source,
    })
}
