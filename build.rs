//! Compiles the bundled `profiles/` package and the `mappings/` folder into the binary, so a fresh machine validates and maps with no files beside the executable.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    embed("profiles", &["json"], "BUNDLED_PROFILES", "bundled_profiles.rs");
    embed("mappings", &["toml", "json"], "BUNDLED_MAPPINGS", "bundled_mappings.rs");
}

/// Writes `OUT_DIR/<out>` declaring `constant` as the (file name, contents) of the folder's files with those extensions.
fn embed(folder: &str, extensions: &[&str], constant: &str, out_file: &str) {
    println!("cargo::rerun-if-changed={folder}");
    // Read when the script runs, not when it was compiled: a build script compiled in another checkout
    // (a copied `target/`) would otherwise embed that checkout's files.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join(folder);
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{folder}/: {e}"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()).is_some_and(|x| extensions.contains(&x)))
        .collect();
    files.sort();
    let mut out = format!("/// The files of `{folder}/`, as (file name, contents).\npub const {constant}: &[(&str, &[u8])] = &[\n");
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 file name");
        writeln!(out, "    ({name:?}, include_bytes!({:?})),", path.display().to_string()).expect("write to string");
    }
    out.push_str("];\n");
    let target = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join(out_file);
    std::fs::write(target, out).expect("write the embedded file list");
}
