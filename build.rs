//! Compiles the bundled `profiles/` package into the binary, so a fresh machine validates against it with no files beside the executable.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=profiles");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .expect("profiles/ exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = String::from("/// The files of `profiles/`, as (file name, contents).\npub const BUNDLED_PROFILES: &[(&str, &[u8])] = &[\n");
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 file name");
        writeln!(out, "    ({name:?}, include_bytes!({:?})),", path.display().to_string()).expect("write to string");
    }
    out.push_str("];\n");
    let target = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("bundled_profiles.rs");
    std::fs::write(target, out).expect("write bundled_profiles.rs");
}
