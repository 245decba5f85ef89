//! The `SPILLWAY_*` environment variables: which are settings, which are read by other
//! parts of spillway, and which look like a misspelt setting (refused).

use super::table::{self, SETTINGS};

/// Every environment variable of spillway's settings starts with this.
pub const PREFIX: &str = "SPILLWAY_";

/// The variable naming the TOML settings file.
pub const CONFIG_VAR: &str = "SPILLWAY_CONFIG";

/// `SPILLWAY_*` variables that are not settings, with what reads them. They are left alone
/// even when their name is close to a setting's.
pub const OTHER_VARIABLES: &[(&str, &str)] = &[
    (CONFIG_VAR, "the TOML settings file, described on this page"),
    (
        "SPILLWAY_LOG",
        "the log filter of the `spillway` tool and `spillway.init_logging()` (e.g. \"info\"; default \"warn\")",
    ),
    (
        "SPILLWAY_NO_NVCC",
        "at build time, `1` skips nvcc: the kernels are compiled at run time by NVRTC",
    ),
    (
        "SPILLWAY_NVCC_ARCH",
        "at build time, the virtual architecture nvcc compiles the kernels for (default compute_75)",
    ),
    ("SPILLWAY_TEST_DIR", "tests: where the GPU and Python tests put their files"),
    (
        "SPILLWAY_DISK_DIR",
        "scripts/gpu-test.sh: the disk directory it tests (default /var/tmp/spillway)",
    ),
    (
        "SPILLWAY_SHM_DIR",
        "scripts/gpu-test.sh: the tmpfs directory it tests (default /dev/shm/spillway)",
    ),
    (
        "SPILLWAY_LOOP_SIZE",
        "scripts/gpu-test.sh: the size of the ext4 image on /dev/shm it tests cuFile on (default 12G)",
    ),
    (
        "SPILLWAY_SANITIZE",
        "scripts/gpu-test.sh: `1` also runs the pack kernels under compute-sanitizer",
    ),
    (
        "SPILLWAY_REGEN_DOCS",
        "tests: `1` rewrites docs/settings.md from the settings table instead of comparing",
    ),
];

/// What a `SPILLWAY_*` variable is.
#[derive(Debug, PartialEq, Eq)]
pub enum Variable {
    /// The variable of this setting (its place in [`SETTINGS`]).
    Setting(usize),
    /// Read elsewhere ([`OTHER_VARIABLES`]), or unlike any setting: not a setting.
    Other,
    /// Unknown but close to a setting's variable: most likely a mistake. The reason, with
    /// the likely setting.
    Lookalike(String),
}

/// Classifies the variable `var`.
pub fn classify(var: &str) -> Variable {
    let Some(rest) = var.strip_prefix(PREFIX) else {
        return Variable::Other;
    };
    if OTHER_VARIABLES.iter().any(|(name, _)| *name == var) {
        return Variable::Other;
    }
    let name = rest.to_ascii_lowercase();
    if rest == name.to_ascii_uppercase() {
        if let Some((i, _)) = table::find(&name) {
            return Variable::Setting(i);
        }
    }
    match SETTINGS.iter().find(|s| looks_like(&name, s.name)) {
        Some(s) => Variable::Lookalike(format!(
            "environment variable {var} is not a spillway setting (did you mean {}?); the settings' variables are {}; unset or rename it",
            s.env_var(),
            SETTINGS.iter().map(|s| s.env_var()).collect::<Vec<_>>().join(", ")
        )),
        None => Variable::Other,
    }
}

/// Whether `name` (lower case) is close to the setting `setting`: a few letters apart, or
/// the setting's name with a part missing or added ("staging", "pack_threshold_bytes").
fn looks_like(name: &str, setting: &str) -> bool {
    let part_of = |short: &str, long: &str| {
        long.strip_prefix(short).is_some_and(|r| r.starts_with('_'))
            || long.strip_suffix(short).is_some_and(|r| r.ends_with('_'))
    };
    edit_distance(name, setting) <= 2 || part_of(name, setting) || part_of(setting, name)
}

/// The Levenshtein distance between `a` and `b`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The setting whose name is closest to `name`, when one is close enough to be meant.
pub fn suggest(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    SETTINGS
        .iter()
        .filter(|s| looks_like(&name, s.name))
        .min_by_key(|s| edit_distance(&name, s.name))
        .map(|s| s.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_classified() {
        let staging = table::find("staging_bytes").map(|(i, _)| i);
        assert_eq!(
            Some(classify("SPILLWAY_STAGING_BYTES")),
            staging.map(Variable::Setting)
        );
        assert_eq!(classify("SPILLWAY_LOG"), Variable::Other);
        assert_eq!(classify("SPILLWAY_TEST_DIR"), Variable::Other);
        assert_eq!(classify("SPILLWAY_SOMETHING_ELSE"), Variable::Other);
        assert_eq!(classify("HOME"), Variable::Other);
        for lookalike in [
            "SPILLWAY_STAGING_BYTE",
            "SPILLWAY_STAGING",
            "SPILLWAY_QUEUEDEPTH",
            "SPILLWAY_THREAD",
            "SPILLWAY_PACK_THRESHOLD_BYTES",
            "SPILLWAY_staging_bytes",
            "SPILLWAY_TIMELINE_SIZE",
        ] {
            assert!(
                matches!(classify(lookalike), Variable::Lookalike(_)),
                "{lookalike}"
            );
        }
    }

    #[test]
    fn suggestions_are_the_closest_setting() {
        assert_eq!(suggest("stagging_bytes"), Some("staging_bytes"));
        assert_eq!(suggest("Queue_Depth"), Some("queue_depth"));
        assert_eq!(suggest("colour"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
