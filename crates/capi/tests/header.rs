//! `include/spillway.h` is generated from the sources by cbindgen: this test generates it
//! and fails when the committed header differs. `SPILLWAY_REGEN_HEADER=1` rewrites it
//! instead (then commit it).

use std::path::Path;

/// The sources cbindgen reads, in the order their items appear in the header.
const SOURCES: &[&str] = &[
    "src/status.rs",
    "src/error.rs",
    "src/strings.rs",
    "src/settings.rs",
    "src/engine.rs",
    "src/stats.rs",
    "src/ops.rs",
];

/// Sources with nothing exported.
const INTERNAL: &[&str] = &["src/lib.rs", "src/args.rs", "src/tests.rs"];

const REGEN: &str = "SPILLWAY_REGEN_HEADER";

#[test]
fn the_committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(dir.join("src")).unwrap() {
        let name = format!("src/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(
            SOURCES.contains(&name.as_str()) || INTERNAL.contains(&name.as_str()),
            "{name} is new: add it to SOURCES (it exports functions or types) or INTERNAL in {}",
            file!()
        );
    }
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("reading cbindgen.toml");
    let mut builder = cbindgen::Builder::new().with_config(config);
    for source in SOURCES {
        builder = builder.with_src(dir.join(source));
    }
    let mut generated = Vec::new();
    builder
        .generate()
        .expect("cbindgen cannot read the sources")
        .write(&mut generated);
    let path = dir.join("include/spillway.h");
    if std::env::var_os(REGEN).is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not what the sources generate: run `{REGEN}=1 cargo test -p spillway-capi --test header` and commit the header",
        path.display()
    );
}
