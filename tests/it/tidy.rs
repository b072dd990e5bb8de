//! Repository rules that tooling cannot express: every Rust file says what it is for in its first line, and every Python file in its module docstring.

use std::path::Path;

fn files(dir: &Path, extension: &str, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, extension, found);
        } else if path.extension().is_some_and(|x| x == extension) {
            found.push(path);
        }
    }
}

/// The files (relative to `root`) whose text does not start with `prefix`.
fn not_starting_with(root: &Path, files: &[std::path::PathBuf], prefix: &str) -> Vec<String> {
    files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap_or_default().starts_with(prefix))
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect()
}

fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    files(dir, "rs", found);
}

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches", "examples", "fuzz/fuzz_targets"] {
        if root.join(dir).is_dir() {
            rust_files(&root.join(dir), &mut files);
        }
    }
    files.push(root.join("build.rs"));
    let missing = not_starting_with(root, &files, "//! ");
    assert!(missing.is_empty(), "files without a leading `//!` line: {missing:?}");
}

#[test]
fn every_python_file_starts_with_a_module_docstring() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    files(&root.join("tests/python"), "py", &mut found);
    assert!(!found.is_empty(), "tests/python holds the interoperability script");
    let missing = not_starting_with(root, &found, "\"\"\"");
    assert!(missing.is_empty(), "Python files without a leading module docstring: {missing:?}");
}
