//! Runs the official FHIRPath R4 test suite (`tests-fhir-r4.xml`) against the engine and prints pass/fail/skip per group.
//!
//! Usage: `cargo run --release --example fhirpath_conformance -- [PATH/TO/tests-fhir-r4.xml] [--verbose] [--bench]`
//! (default `../shared/corpus/fhir-test-cases/r4/fhirpath/tests-fhir-r4.xml`; the input
//! resources are read from the folder above the suite's). Always exits 0: the figure is a
//! measurement, not a gate.
//!
//! How the suite's attributes are read:
//! - `invalid="syntax"` passes only on a parse error; `invalid="semantic"`, `"execution"` (and
//!   the malformed `"true"`) pass on a parse or evaluation error, since this engine reports
//!   semantic problems (unknown functions, wrong argument counts, strict-mode unknown elements)
//!   at parse or evaluation time rather than in a separate static check.
//! - `mode="strict"` evaluates with [`Context::strict`]; other tests are lenient.
//! - `predicate="true"` converts the result to a Boolean (empty → false, one Boolean → itself,
//!   anything else → true) before comparing.
//! - Outputs compare in order (unless `ordered="false"`), by the FHIRPath literal text of each
//!   value and, when the output has a `type`, by type name (FHIR type for nodes, System type
//!   with a lower-case first letter otherwise).
//!
//! `--bench` also times invariant-style expressions over every element of the suite's inputs
//! (parsed once, evaluated per element) and prints evaluations per second.
//!
//! XML inputs are read with the crate's FHIR XML reader ([`iop_gateway::xml`]) and the R4 model;
//! an input that cannot be read is reported and its tests count as skipped. For comparing
//! readers, `FHIRPATH_JSON_INPUTS=DIR` names a folder of JSON renderings (`patient-example.json`
//! for `patient-example.xml`) to use instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iop_gateway::definitions::Definitions;
use iop_gateway::fhirpath::{self, Context, Node, TypeCache, TypeModel, Value};
use iop_gateway::json::{self, Json};
use quick_xml::events::Event;

const DEFAULT_SUITE: &str = "../shared/corpus/fhir-test-cases/r4/fhirpath/tests-fhir-r4.xml";

#[derive(Default, Debug)]
struct Test {
    group: String,
    name: String,
    input: Option<String>,
    predicate: bool,
    strict: bool,
    ordered: bool,
    expression: String,
    invalid: Option<String>,
    outputs: Vec<(Option<String>, String)>,
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let verbose = args.iter().any(|a| a == "--verbose");
    let suite = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| DEFAULT_SUITE.to_string());
    let suite = PathBuf::from(suite);
    let text = match std::fs::read_to_string(&suite) {
        Ok(t) => t,
        Err(e) => {
            println!("cannot read {}: {e}", suite.display());
            return;
        }
    };
    let tests = match read_suite(&text) {
        Ok(t) => t,
        Err(e) => {
            println!("cannot parse {}: {e}", suite.display());
            return;
        }
    };
    let input_dir = suite.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let json_twins = std::env::var_os("FHIRPATH_JSON_INPUTS").map(PathBuf::from);

    let definitions = Definitions::base();
    let types = TypeCache::new(&*definitions);

    let mut inputs: BTreeMap<String, Result<Json, String>> = BTreeMap::new();
    let mut groups: Vec<(String, Tally)> = Vec::new();
    let mut failures = Vec::new();
    for test in &tests {
        if groups.last().is_none_or(|(g, _)| *g != test.group) {
            groups.push((test.group.clone(), Tally::default()));
        }
        let Some((_, tally)) = groups.last_mut() else { continue };
        let input = match &test.input {
            None => None,
            Some(file) => {
                let loaded = inputs.entry(file.clone()).or_insert_with(|| load_input(&input_dir, json_twins.as_deref(), file, &*definitions));
                match loaded {
                    Ok(json) => Some(&*json),
                    Err(reason) => {
                        tally.skipped += 1;
                        if verbose {
                            println!("SKIP {}: {reason}", test.name);
                        }
                        continue;
                    }
                }
            }
        };
        match run(test, input, &types) {
            Ok(()) => tally.passed += 1,
            Err(why) => {
                tally.failed += 1;
                failures.push(format!("{} / {}: {}\n    expected {}\n    {why}", test.group, test.name, test.expression.trim(), expected_text(test)));
            }
        }
    }

    let mut total = Tally::default();
    println!("{:<36} {:>6} {:>6} {:>7}", "group", "passed", "failed", "skipped");
    for (group, t) in &groups {
        println!("{group:<36} {:>6} {:>6} {:>7}", t.passed, t.failed, t.skipped);
        total.passed += t.passed;
        total.failed += t.failed;
        total.skipped += t.skipped;
    }
    for (file, loaded) in &inputs {
        if let Err(reason) = loaded {
            println!("input {file} not read: {reason}");
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for f in &failures {
            println!("  {f}");
        }
    }
    if args.iter().any(|a| a == "--bench") {
        bench(&inputs, &types);
    }
    let all = total.passed + total.failed + total.skipped;
    println!(
        "\ntotal {all} tests: {} passed ({:.1}% of all), {} failed, {} skipped (unreadable input)",
        total.passed,
        100.0 * total.passed as f64 / all.max(1) as f64,
        total.failed,
        total.skipped
    );
}

fn load_input(dir: &Path, json_twins: Option<&Path>, file: &str, model: &dyn TypeModel) -> Result<Json, String> {
    let path = dir.join(file);
    if let Some(stem) = file.strip_suffix(".xml") {
        if let Some(twins) = json_twins {
            let twin = twins.join(format!("{stem}.json"));
            let bytes = std::fs::read(&twin).map_err(|e| format!("cannot read {}: {e}", twin.display()))?;
            return json::parse(&bytes).map_err(|e| format!("{}: {e}", twin.display()));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        return iop_gateway::xml::parse_resource(&bytes, model).map(|(json, _issues)| json).map_err(|e| format!("{}: {e:?}", path.display()));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    json::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn expected_text(test: &Test) -> String {
    if let Some(kind) = &test.invalid {
        return format!("error ({kind})");
    }
    let items: Vec<String> =
        test.outputs.iter().map(|(t, v)| format!("{}{v}", t.as_deref().map(|t| format!("{t}: ")).unwrap_or_default())).collect();
    format!("[{}]", items.join(", "))
}

fn run(test: &Test, input: Option<&Json>, types: &TypeCache<'_>) -> Result<(), String> {
    let expr = match fhirpath::parse(&test.expression) {
        Ok(e) => e,
        Err(e) => {
            return if test.invalid.is_some() { Ok(()) } else { Err(format!("got syntax error: {e}")) };
        }
    };
    let ctx = Context::new(types).strict(test.strict);
    let result = match input {
        Some(json) => expr.evaluate(Node::resource(json), &ctx),
        None => expr.evaluate_collection(Vec::new(), &ctx),
    };
    let values = match result {
        Err(e) => {
            return match test.invalid.as_deref() {
                Some("syntax") => Err(format!("expected a syntax error, got evaluation error: {e}")),
                Some(_) => Ok(()),
                None => Err(format!("got error: {e}")),
            };
        }
        Ok(v) => v,
    };
    if test.invalid.is_some() {
        return Err(format!("got {}", render(&values)));
    }
    let got: Vec<(String, String)> = if test.predicate {
        let b = match values.as_slice() {
            [] => false,
            [v] => !matches!(v.prim_bool(), Some(false)),
            _ => true,
        };
        vec![("boolean".to_string(), b.to_string())]
    } else {
        values.iter().map(|v| (type_of(v), v.to_string())).collect()
    };
    let matches = |(gt, gv): &(String, String), (et, ev): &(Option<String>, String)| gv == ev && et.as_ref().is_none_or(|t| t == gt);
    let ok = got.len() == test.outputs.len()
        && if test.ordered {
            got.iter().zip(&test.outputs).all(|(g, e)| matches(g, e))
        } else {
            let mut used = vec![false; got.len()];
            test.outputs.iter().all(|e| match got.iter().enumerate().find(|(i, g)| !used[*i] && matches(g, e)) {
                Some((i, _)) => {
                    used[i] = true;
                    true
                }
                None => false,
            })
        };
    if ok {
        Ok(())
    } else {
        let items: Vec<String> = got.iter().map(|(t, v)| format!("{t}: {v}")).collect();
        Err(format!("got [{}]", items.join(", ")))
    }
}

trait PrimBool {
    fn prim_bool(&self) -> Option<bool>;
}

impl PrimBool for Value<'_> {
    fn prim_bool(&self) -> Option<bool> {
        match self.to_system() {
            Value::Boolean(b) => Some(b),
            _ => None,
        }
    }
}

fn render(values: &[Value<'_>]) -> String {
    let items: Vec<String> = values.iter().map(|v| format!("{}: {v}", type_of(v))).collect();
    format!("[{}]", items.join(", "))
}

/// The suite's type names: FHIR types as named, System types with a lower-case first letter (except Quantity).
fn type_of(v: &Value<'_>) -> String {
    let (namespace, name) = v.type_name();
    if namespace == "System" && name != "Quantity" {
        let mut chars = name.chars();
        chars.next().map(|c| c.to_ascii_lowercase().to_string() + chars.as_str()).unwrap_or_default()
    } else {
        name.into_owned()
    }
}

/// Reads the suite with a streaming XML reader; the file is plain XML (not FHIR XML).
fn read_suite(text: &str) -> Result<Vec<Test>, String> {
    let mut reader = quick_xml::Reader::from_str(text);
    let mut tests = Vec::new();
    let mut group = String::new();
    let mut current: Option<Test> = None;
    let mut field: Option<String> = None;
    let mut buffer = String::new();
    let mut output_type: Option<String> = None;
    loop {
        let event = reader.read_event().map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        match event {
            Event::Start(e) | Event::Empty(e) => {
                let tag = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                let attrs: BTreeMap<String, String> = e
                    .attributes()
                    .flatten()
                    .map(|a| {
                        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                        let value = a.unescape_value().map(|v| v.into_owned()).unwrap_or_default();
                        (key, value)
                    })
                    .collect();
                match tag.as_str() {
                    "group" => group = attrs.get("name").cloned().unwrap_or_default(),
                    "test" => {
                        current = Some(Test {
                            group: group.clone(),
                            name: attrs.get("name").cloned().unwrap_or_else(|| format!("(unnamed in {group})")),
                            input: attrs.get("inputfile").cloned(),
                            predicate: attrs.get("predicate").is_some_and(|p| p == "true"),
                            strict: attrs.get("mode").is_some_and(|m| m == "strict"),
                            ordered: attrs.get("ordered").is_none_or(|o| o != "false"),
                            ..Test::default()
                        });
                    }
                    "expression" => {
                        if let Some(t) = current.as_mut() {
                            t.invalid = attrs.get("invalid").cloned();
                            if attrs.get("mode").is_some_and(|m| m == "strict") {
                                t.strict = true;
                            }
                        }
                        field = Some(tag);
                        buffer.clear();
                    }
                    "output" => {
                        output_type = attrs.get("type").cloned();
                        field = Some(tag);
                        buffer.clear();
                    }
                    _ => {}
                }
            }
            Event::Text(t) if field.is_some() => {
                let raw = String::from_utf8_lossy(t.as_ref()).into_owned();
                buffer.push_str(&quick_xml::escape::unescape(&raw).map(|c| c.into_owned()).unwrap_or(raw));
            }
            Event::GeneralRef(r) if field.is_some() => {
                let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                buffer.push_str(match name.as_str() {
                    "lt" => "<",
                    "gt" => ">",
                    "amp" => "&",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                });
            }
            Event::CData(t) if field.is_some() => {
                buffer.push_str(&String::from_utf8_lossy(t.as_ref()));
            }
            Event::End(e) => {
                let tag = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                match tag.as_str() {
                    "expression" => {
                        if let Some(t) = current.as_mut() {
                            t.expression = buffer.clone();
                        }
                        field = None;
                    }
                    "output" => {
                        if let Some(t) = current.as_mut() {
                            t.outputs.push((output_type.take(), buffer.clone()));
                        }
                        field = None;
                    }
                    "test" => tests.extend(current.take()),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(tests)
}

/// Evaluates a few invariant-like expressions on every element node of the loaded inputs.
fn bench(inputs: &BTreeMap<String, Result<Json, String>>, types: &TypeCache<'_>) {
    const EXPRESSIONS: &[&str] = &[
        "hasValue() or (children().count() > id.count())",
        "extension.exists() != value.exists()",
        "name.where(use = 'official').given.first().exists() or telecom.where(system = 'phone').exists()",
        "descendants().where(is(Quantity)).all(value.exists())",
    ];
    let ctx = Context::new(types);
    let everything = fhirpath::parse("descendants()").expect("valid expression");
    for source in EXPRESSIONS {
        let expr = fhirpath::parse(source).expect("valid expression");
        let start = std::time::Instant::now();
        let mut evaluations = 0u64;
        let mut errors = 0u64;
        while start.elapsed().as_millis() < 500 {
            for json in inputs.values().flatten() {
                let root = Node::resource(json);
                let mut nodes = everything.evaluate(root.clone(), &ctx).unwrap_or_default();
                nodes.push(Value::Node(root));
                for node in nodes {
                    if let Value::Node(n) = node {
                        evaluations += 1;
                        if expr.evaluate(n, &ctx).is_err() {
                            errors += 1;
                        }
                    }
                }
            }
        }
        let per_second = evaluations as f64 / start.elapsed().as_secs_f64();
        println!("bench {source:<100} {per_second:>12.0} evaluations/s ({errors} errors)");
    }
}
