//! `docs/settings.md`, generated from the settings table: every setting with its
//! environment variable, default and meaning, the layer order and the file format. A test
//! keeps the committed page equal to [`markdown`].

use std::fmt::Write;

use super::environment::{CONFIG_VAR, OTHER_VARIABLES};
use super::table::{Kind, SETTINGS};

/// The settings file of the documentation's example (checked to load by the tests).
pub(super) const EXAMPLE: &str = r#"# /etc/spillway.toml, used with: export SPILLWAY_CONFIG=/etc/spillway.toml
device = "cuda:0"
backend = "uring"
queue_depth = 32
threads = 2
staging_bytes = "1GiB"
prefetch_bytes = "512MiB"
pack_flush_delay_ms = 0.5
dedup = true
"#;

/// Every kind of value, in the order the page explains them.
const KINDS: &[(Kind, &str)] = &[
    (Kind::Size, "size"),
    (Kind::SizeOrAuto, "size or \"auto\""),
    (Kind::Count, "count"),
    (Kind::Whole, "whole number"),
    (Kind::Flag, "boolean"),
    (Kind::Millis, "milliseconds"),
    (Kind::Device, "device"),
    (Kind::Backend, "backend"),
    (Kind::Weights, "weights"),
    (Kind::RankPaths, "rank paths"),
    (Kind::Faults, "fault plan"),
];

fn label(kind: Kind) -> &'static str {
    KINDS.iter().find(|(k, _)| *k == kind).map_or("value", |(_, l)| l)
}

/// The text of `docs/settings.md`.
pub fn markdown() -> String {
    let mut md = String::new();
    let _ = write_page(&mut md);
    md
}

fn write_page(md: &mut String) -> std::fmt::Result {
    writeln!(md, "# Settings")?;
    writeln!(md)?;
    writeln!(
        md,
        "<!-- Generated from src/settings/table.rs: edit the table, then run \
         `SPILLWAY_REGEN_DOCS=1 cargo test -p spillway --lib settings`. -->"
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Every setting of the offload engine, its device and its backend. A setting's value \
         comes from the highest of these layers that gives it:\n\
         \n\
         1. an API argument: a keyword of `spillway.Engine(path, capacity=None, **settings)`, \
         or a flag of `spillway bench` (`--qd` for `queue_depth`, …: see its `--help`);\n\
         2. its environment variable: `SPILLWAY_` and the setting's name in capitals \
         (`SPILLWAY_STAGING_BYTES=1GiB`);\n\
         3. the TOML settings file named by `{CONFIG_VAR}`, under the setting's name (no file \
         is read when `{CONFIG_VAR}` is unset; one that is named but cannot be read or parsed \
         is an error);\n\
         4. its default.\n\
         \n\
         A value that does not fit is refused, whatever its layer, with a message naming the \
         setting, where the value came from (the file and key, the environment variable, or \
         the argument) and what the setting takes. Settings that do not fit together \
         (`prefetch_bytes` above `staging_bytes`, …) are refused once every layer is applied, \
         naming each setting involved and where it was set.\n\
         \n\
         In Python, `spillway.SETTINGS` maps each name to its default and meaning, and \
         `spillway.Engine.resolve_settings(**settings)` tells each setting's value and where \
         it came from. In Rust, `spillway::settings::Settings` does the same \
         (`Settings::load()?`, `.set(name, value)?`, `.source(name)`, `.resolve()?`)."
    )?;
    writeln!(md)?;
    writeln!(md, "## Every setting")?;
    writeln!(md)?;
    writeln!(
        md,
        "| Setting | Environment variable | Default | Takes | Meaning |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for s in SETTINGS {
        writeln!(
            md,
            "| `{}` | `{}` | `{}` | {} | {} |",
            s.name,
            s.env_var(),
            s.kind.show(&s.default_value()),
            label(s.kind),
            s.meaning.replace('|', "\\|")
        )?;
    }
    writeln!(md)?;
    writeln!(md, "## Values")?;
    writeln!(md)?;
    writeln!(
        md,
        "Text is accepted for every kind of value, so an environment variable says what a TOML \
         value or a Python argument says (`\"16\"`, `\"true\"`, `\"512MiB\"`, `\"2.5\"`)."
    )?;
    writeln!(md)?;
    for (kind, name) in KINDS {
        writeln!(md, "- **{name}**: {}.", kind.accepts())?;
    }
    writeln!(md)?;
    writeln!(md, "## The settings file")?;
    writeln!(md)?;
    writeln!(
        md,
        "TOML, one top-level key per setting, named as in the table; values as TOML integers, \
         floats, booleans or strings. A key that is not a setting is refused (with the closest \
         setting's name). For example:"
    )?;
    writeln!(md)?;
    writeln!(md, "```toml\n{}```", EXAMPLE)?;
    writeln!(md)?;
    writeln!(md, "## Other `SPILLWAY_` variables")?;
    writeln!(md)?;
    writeln!(
        md,
        "An environment variable that starts with `SPILLWAY_`, is not a setting's and looks \
         like one (a few letters off, or a setting's name with a part missing or added, as in \
         `SPILLWAY_STAGING_BYTE` or `SPILLWAY_STAGING`) is refused as a likely misspelling. \
         These are read by other parts of spillway, and are not settings:"
    )?;
    writeln!(md)?;
    for (var, what) in OTHER_VARIABLES {
        writeln!(md, "- `{var}`: {what}.")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn docs_settings_md_is_the_generated_page() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/settings.md");
        let page = markdown();
        if std::env::var_os("SPILLWAY_REGEN_DOCS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &page).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == page,
            "{} differs from the settings table (src/settings/table.rs): regenerate it with \
             `SPILLWAY_REGEN_DOCS=1 cargo test -p spillway --lib settings` and commit the result",
            path.display()
        );
    }

    #[test]
    fn every_kind_is_explained() {
        for s in SETTINGS {
            assert_ne!(
                label(s.kind),
                "value",
                "{} has a kind the page does not explain",
                s.name
            );
        }
    }
}
