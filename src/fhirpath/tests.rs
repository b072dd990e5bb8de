//! Unit tests for the FHIRPath engine: parsing, navigation over FHIR JSON, operators, functions, environment hooks and limits.

use std::collections::HashMap;

use super::*;
use crate::json;

/// A hand-written slice of the R4 model, enough for these tests.
struct MiniModel {
    children: HashMap<(&'static str, &'static str), (&'static [&'static str], bool)>,
    bases: HashMap<&'static str, &'static str>,
}

impl MiniModel {
    fn new() -> MiniModel {
        let children: &[(&str, &str, &[&str], bool)] = &[
            ("Patient", "id", &["id"], false),
            ("Patient", "name", &["HumanName"], false),
            ("Patient", "birthDate", &["date"], false),
            ("Patient", "active", &["boolean"], false),
            ("Patient", "gender", &["code"], false),
            ("Patient", "deceased", &["boolean", "dateTime"], true),
            ("Patient", "contained", &["Resource"], false),
            ("Patient", "managingOrganization", &["Reference"], false),
            ("Patient", "extension", &["Extension"], false),
            ("Patient", "contact", &["Patient.contact"], false),
            ("Patient.contact", "name", &["HumanName"], false),
            ("HumanName", "given", &["string"], false),
            ("HumanName", "family", &["string"], false),
            ("HumanName", "use", &["code"], false),
            ("HumanName", "extension", &["Extension"], false),
            ("Extension", "url", &["uri"], false),
            ("Extension", "value", &["string", "integer", "Quantity", "Age", "dateTime", "boolean", "code"], true),
            ("Reference", "reference", &["string"], false),
            ("Observation", "status", &["code"], false),
            ("Observation", "value", &["Quantity", "string", "Period", "boolean"], true),
            ("Observation", "effective", &["dateTime", "Period"], true),
            ("Quantity", "value", &["decimal"], false),
            ("Quantity", "unit", &["string"], false),
            ("Quantity", "system", &["uri"], false),
            ("Quantity", "code", &["code"], false),
            ("Organization", "name", &["string"], false),
        ];
        let bases: &[(&str, &str)] = &[
            ("Patient", "DomainResource"),
            ("Observation", "DomainResource"),
            ("Organization", "DomainResource"),
            ("DomainResource", "Resource"),
            ("Patient.contact", "BackboneElement"),
            ("BackboneElement", "Element"),
            ("HumanName", "Element"),
            ("Quantity", "Element"),
            ("Age", "Quantity"),
            ("Duration", "Quantity"),
            ("Period", "Element"),
            ("Extension", "Element"),
            ("Reference", "Element"),
            ("code", "string"),
            ("id", "string"),
            ("string", "Element"),
            ("uri", "Element"),
            ("date", "Element"),
            ("dateTime", "Element"),
            ("boolean", "Element"),
            ("decimal", "Element"),
            ("integer", "Element"),
        ];
        MiniModel {
            children: children.iter().map(|(p, n, t, c)| ((*p, *n), (*t, *c))).collect(),
            bases: bases.iter().copied().collect(),
        }
    }
}

impl TypeModel for MiniModel {
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement> {
        let (types, is_choice) = *self.children.iter().find(|((p, n), _)| *p == parent && *n == name)?.1;
        Some(ChildElement { types: types.iter().map(|t| t.to_string()).collect(), is_choice, many: name == "name" || name == "given" })
    }
    fn base_type(&self, type_name: &str) -> Option<String> {
        self.bases.get(type_name).map(|b| b.to_string())
    }
}

const PATIENT: &str = r##"{
  "resourceType": "Patient",
  "id": "p1",
  "active": true,
  "gender": "male",
  "birthDate": "1974-12-25",
  "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
  "deceasedBoolean": false,
  "name": [
    {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
    {"use": "usual", "given": [null, "Jim"], "_given": [{"extension": [{"url": "http://example.org/x", "valueString": "J"}]}, null]}
  ],
  "contained": [{"resourceType": "Organization", "id": "org1", "name": "Acme"}],
  "managingOrganization": {"reference": "#org1"},
  "contact": [{"name": {"family": "du Marché"}}]
}"##;

const OBSERVATION: &str = r#"{
  "resourceType": "Observation",
  "status": "final",
  "valueQuantity": {"value": 185, "unit": "lbs", "system": "http://unitsofmeasure.org", "code": "[lb_av]"},
  "effectiveDateTime": "2016-03-28"
}"#;

fn with_model<T>(f: impl FnOnce(&TypeCache<'_>) -> T) -> T {
    let model = MiniModel::new();
    let types = TypeCache::new(&model);
    f(&types)
}

fn fixed_now() -> Temporal {
    Temporal::parse_datetime("2024-06-15T10:20:30.000+02:00", false).expect("valid date-time")
}

/// Evaluates `expr` on `resource` and renders each result as the conformance runner does.
fn eval_on(resource: &str, expr: &str) -> Result<Vec<String>, String> {
    let json = json::parse(resource.as_bytes()).map_err(|e| e.to_string())?;
    with_model(|types| {
        let parsed = parse(expr).map_err(|e| format!("syntax: {e}"))?;
        let ctx = Context::new(types).with_now(fixed_now());
        let result = parsed.evaluate(Node::resource(&json), &ctx).map_err(|e| format!("eval: {e}"))?;
        Ok(result.iter().map(|v| v.to_string()).collect())
    })
}

fn eval(expr: &str) -> Result<Vec<String>, String> {
    with_model(|types| {
        let parsed = parse(expr).map_err(|e| format!("syntax: {e}"))?;
        let ctx = Context::new(types).with_now(fixed_now());
        let result = parsed.evaluate_collection(Vec::new(), &ctx).map_err(|e| format!("eval: {e}"))?;
        Ok(result.iter().map(|v| v.to_string()).collect())
    })
}

fn check(expr: &str, expected: &[&str]) {
    assert_eq!(eval(expr), Ok(expected.iter().map(|s| s.to_string()).collect()), "{expr}");
}

fn check_on(resource: &str, expr: &str, expected: &[&str]) {
    assert_eq!(eval_on(resource, expr), Ok(expected.iter().map(|s| s.to_string()).collect()), "{expr}");
}

#[test]
fn syntax_errors_carry_positions() {
    let e = parse("2 + 2 /").unwrap_err();
    assert_eq!(e.position, 7);
    let e = parse("2 + /* open").unwrap_err();
    assert_eq!((e.message.as_str(), e.position), ("unterminated comment", 4));
    let e = parse("name.foo()").unwrap_err();
    assert!(e.message.contains("unknown function 'foo'"), "{e}");
    assert_eq!(e.position, 5);
    assert!(parse("substring()").is_err(), "arity is checked when parsing");
    assert!(parse("'abc").is_err());
    assert!(parse("@2015-13-01").is_err(), "month 13");
    assert!(parse("1 +").is_err());
}

#[test]
fn hostile_nesting_is_an_error_not_a_stack_overflow() {
    let deep_parens = format!("{}1{}", "(".repeat(50_000), ")".repeat(50_000));
    assert!(parse(&deep_parens).is_err());
    let deep_minus = format!("{}1", "-".repeat(50_000));
    assert!(parse(&deep_minus).is_err());
    let deep_calls = format!("{}1{}", "iif(true, ".repeat(5000), ", 0)".repeat(5000));
    assert!(parse(&deep_calls).is_err());
    // Flat chains build deep trees too: a realistic length works, an absurd one is refused.
    let sum = vec!["1"; 100].join(" + ");
    assert_eq!(eval(&sum), Ok(vec!["100".to_string()]));
    assert!(parse(&vec!["1"; 50_000].join(" + ")).is_err());
    assert!(parse(&vec!["name"; 50_000].join(".")).is_err());
}

#[test]
fn decimal_arithmetic_is_exact() {
    check("0.1 + 0.2 = 0.3", &["true"]);
    check("1.0 / 3", &["0.3333333333333333333333333333"]);
    check("(1.2 / 1.8).round(2)", &["0.67"]);
    check("1.50 * 2", &["3.00"]);
    check("7 / 2", &["3.5"]);
    check("7 div 2", &["3"]);
    check("-7 mod 3", &["-1"]);
    check("5 / 0", &[]);
    check("2.2 mod 1.8", &["0.4"]);
    assert!(eval("9223372036854775807 + 1").is_err(), "integer overflow is an error");
}

#[test]
fn three_valued_logic() {
    check("true and {}", &[]);
    check("false and {}", &["false"]);
    check("{} or true", &["true"]);
    check("{} implies false", &[]);
    check("false implies {}", &["true"]);
    check("true xor {}", &[]);
    check("(1 | 2) = (1 | 2)", &["true"]);
    assert!(eval("(true | false) and true").is_err(), "two items are not a Boolean");
}

#[test]
fn primitive_values_and_their_extensions() {
    check_on(PATIENT, "Patient.birthDate", &["@1974-12-25"]);
    check_on(PATIENT, "birthDate.extension.value", &["@1974-12-25T14:35:45-05:00"]);
    check_on(PATIENT, "birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').exists()", &["true"]);
    check_on(PATIENT, "birthDate.hasExtension(%`ext-patient-birthTime`) and name.hasExtension('x').not()", &["true"]);
    // A primitive with only an extension is still a node, just without a value.
    check_on(PATIENT, "name.given.count()", &["4"]);
    check_on(PATIENT, "name.given.where(hasValue())", &["Peter", "James", "Jim"]);
    check_on(PATIENT, "name[1].given.select(hasValue())", &["false", "true"]);
    check_on(PATIENT, "name[1].given[0].extension.value", &["J"]);
    check_on(PATIENT, "name.given.select(getValue()).count() = 3 and birthDate < today()", &["true"]);
    check_on(PATIENT, "id.type().name", &["id"]);
    check_on(PATIENT, "gender.type().name", &["code"]);
    check_on(PATIENT, "children().count()", &["10"]);
}

#[test]
fn types_and_choices() {
    check_on(OBSERVATION, "Observation.value.unit", &["lbs"]);
    check_on(OBSERVATION, "value.is(Quantity) and value is FHIR.Quantity", &["true"]);
    check_on(OBSERVATION, "value.as(Period).start", &[]);
    check_on(OBSERVATION, "value.ofType(Quantity).value", &["185"]);
    check_on(OBSERVATION, "value = 185 '[lb_av]'", &["true"]);
    check_on(OBSERVATION, "value > 80 'kg'", &["true"]);
    check_on(OBSERVATION, "effective.type().name", &["dateTime"]);
    check_on(OBSERVATION, "status.is(code) and status.is(string) and status.as(string).empty()", &["true"]);
    check_on(OBSERVATION, "status.is(System.String)", &["false"]);
    check_on(PATIENT, "contact.type().name", &["BackboneElement"]);
    check_on(PATIENT, "Patient.is(DomainResource) and contained.is(Organization)", &["true"]);
    check("1.is(Integer) and 'a'.is(System.String) and 1.is(Decimal).not()", &["true"]);
    // The JSON spelling of a choice is not a FHIRPath step when the model knows the element.
    assert!(eval_on(OBSERVATION, "valueQuantity.unit").is_err());
    assert!(eval_on(PATIENT, "gender.as(string1)").is_err(), "unknown type");
}

#[test]
fn as_on_collections_filters_unless_strict() {
    let json = json::parse(PATIENT.as_bytes()).expect("valid JSON");
    with_model(|types| {
        let expr = parse("descendants().as(code)").expect("parses");
        let lenient = expr.evaluate(Node::resource(&json), &Context::new(types)).expect("filters");
        let codes: Vec<String> = lenient.iter().map(|v| v.to_string()).collect();
        assert_eq!(codes, ["male", "official", "usual"]);
        assert!(expr.evaluate(Node::resource(&json), &Context::new(types).strict(true)).is_err());
    });
}

#[test]
fn strict_mode_rejects_unknown_elements() {
    let json = json::parse(PATIENT.as_bytes()).expect("valid JSON");
    with_model(|types| {
        let lenient = Context::new(types);
        let strict = Context::new(types).strict(true);
        let expr = parse("name.given1").expect("parses");
        assert_eq!(expr.evaluate(Node::resource(&json), &lenient).map(|v| v.len()), Ok(0));
        assert!(expr.evaluate(Node::resource(&json), &strict).is_err());
        let wrong_type = parse("Observation.status").expect("parses");
        assert!(wrong_type.evaluate(Node::resource(&json), &strict).is_err());
        assert_eq!(wrong_type.evaluate(Node::resource(&json), &lenient).map(|v| v.len()), Ok(0));
    });
}

#[test]
fn untyped_evaluation_infers_from_json() {
    let json = json::parse(OBSERVATION.as_bytes()).expect("valid JSON");
    let types = TypeCache::new(&NoModel);
    let ctx = Context::new(&types);
    let run = |e: &str| -> Vec<String> {
        parse(e).expect("parses").evaluate(Node::resource(&json), &ctx).expect("evaluates").iter().map(|v| v.to_string()).collect()
    };
    assert_eq!(run("value.value + 1"), vec!["186"]);
    assert_eq!(run("value.is(Quantity)"), vec!["true"]);
    assert_eq!(run("effective > @2016-01-01"), vec!["true"], "strings compare with dates");
}

#[test]
fn dates_times_and_partial_precision() {
    check("@1973-12-25 + 7 days", &["@1974-01-01"]);
    check("@2024-01-31 + 1 month", &["@2024-02-29"]);
    check("@2024-02-29 - 1 year", &["@2023-02-28"]);
    check("@1973-12-25T23:30:00.000+10:00 + 1 hour", &["@1973-12-26T00:30:00.000+10:00"]);
    check("@T23:00 + 2 hours", &["@T01:00"]);
    check("@2018-03 < @2018-03-01", &[]);
    check("@2012-04-15T15:00:00+02:00 = @2012-04-15T16:00:00+03:00", &["true"]);
    check("@2012-04-15 ~ @2012-04-15T10:00:00", &["false"]);
    check("@2014.lowBoundary(6) | @2014-02.highBoundary(8)", &["@2014-01", "@2014-02-28"]);
    check("now() = @2024-06-15T10:20:30.000+02:00 and today() = @2024-06-15", &["true"]);
    check("timeOfDay()", &["@T10:20:30.000"]);
    assert!(eval("@1973-12-25 + 1 'mo'").is_err(), "UCUM months are not calendar months");
    assert!(eval("@1973-12-25 + 7").is_err());
}

#[test]
fn quantities() {
    check("4.0000 'g' = 4000.0 'mg'", &["true"]);
    check("7 days = 1 week", &["true"]);
    check("1 year = 1 'a'", &[]);
    check("2.0 'cm' * 2.0 'm' = 0.040 'm2'", &["true"]);
    check("1 'kg' > 999 'g'", &["true"]);
    check("5 'mg' + 1 'g'", &["1005 'mg'"]);
    check("1 'cm'.comparable(1 '[in_i]')", &["true"]);
    check("'5.5 \\'mg\\''.toQuantity() = 5.5 'mg'", &["true"]);
    check("1.587 'cm'.highBoundary(3)", &["1.588 'cm'"]);
}

#[test]
fn strings_and_regexes() {
    check("'abcabc'.replaceMatches('b(c)', 'x$1')", &["axcaxc"]);
    check("'FHIR'.matches('^F.*R$') and 'A\nB'.matches('A.B')", &["true"]);
    check("'Library'.matchesFull('Lib')", &["false"]);
    check("'héllo'.length() = 5 and 'héllo'.substring(1, 2) = 'él' and 'héllo'.indexOf('l') = 2", &["true"]);
    check("'a,b,,c'.split(',').count()", &["4"]);
    check("('x' | 'y').join('+')", &["x+y"]);
    check("'hello'.encode('base64').decode('base64')", &["hello"]);
    check("'<a & b>'.escape('html')", &["&lt;a &amp; b&gt;"]);
    check("'Peter' ~ ' peter '", &["true"]);
    assert!(eval("'x'.matches('(')").is_err(), "a bad regex is an error");
}

#[test]
fn collections_and_lambdas() {
    check("(3 | 1 | 2).sort()", &["1", "2", "3"]);
    check("('b' | 'a').sort(-$this)", &["b", "a"]);
    check("(1 | 2 | 3).aggregate($this + $total, 10)", &["16"]);
    check("(1 | 2 | 3).select($this * $index)", &["0", "2", "6"]);
    check("(1 | 2 | 2).distinct().count() = 2 and (1 | 2).isDistinct()", &["true"]);
    check("(1 | 2 | 3).where($this > 1).exclude(3)", &["2"]);
    check("1.combine(1).union(2)", &["1", "2"]);
    check("(1 | 2).subsetOf(1 | 2 | 3) and (1 | 2 | 3).supersetOf(3)", &["true"]);
    check("iif(true, 'a', 1/0)", &["a"]);
    assert!(eval("(1 | 2).single()").is_err());
}

/// An environment that resolves `Organization/1` and answers memberOf for one value set.
struct TestEnv {
    org: json::Json,
}

impl<'a> Environment<'a> for &'a TestEnv {
    fn resolve(&self, reference: &str) -> Option<Node<'a>> {
        (reference == "Organization/1").then(|| Node::resource(&self.org))
    }
    fn member_of(&self, value: &Value<'a>, value_set: &str) -> Result<Option<bool>, String> {
        if value_set != "http://hl7.org/fhir/ValueSet/administrative-gender" {
            return Ok(None);
        }
        Ok(value.as_str().map(|c| ["male", "female", "other", "unknown"].contains(&c)))
    }
    fn constant(&self, name: &str) -> Option<Vec<Value<'a>>> {
        (name == "answer").then(|| vec![Value::Integer(42)])
    }
}

#[test]
fn environment_hooks_and_variables() {
    let patient = json::parse(PATIENT.as_bytes()).expect("valid JSON");
    let env = TestEnv { org: json::parse(br#"{"resourceType":"Organization","name":"Remote"}"#).expect("valid JSON") };
    let env_ref = &env;
    with_model(|types| {
        let ctx = Context::new(types).with_environment(&env_ref).with_variable("limit", vec![Value::Integer(3)]);
        let run = |e: &str| -> Result<Vec<String>, EvalError> {
            Ok(parse(e).expect("parses").evaluate(Node::resource(&patient), &ctx)?.iter().map(|v| v.to_string()).collect())
        };
        assert_eq!(run("managingOrganization.resolve().name"), Ok(vec!["Acme".to_string()]));
        assert_eq!(run("'Organization/1'.resolve().name"), Ok(vec!["Remote".to_string()]));
        assert_eq!(run("gender.memberOf(%`vs-administrative-gender`)"), Ok(vec!["true".to_string()]));
        assert_eq!(run("gender.memberOf('http://example.org/vs')"), Ok(vec![]));
        assert_eq!(run("%answer + %limit"), Ok(vec!["45".to_string()]));
        assert_eq!(run("%resource.id = %context.id and %rootResource.id = 'p1'"), Ok(vec!["true".to_string()]));
        assert_eq!(run("%ucum & '|' & %`ext-patient-birthTime`"), Ok(vec!["http://unitsofmeasure.org|http://hl7.org/fhir/StructureDefinition/patient-birthTime".to_string()]));
        assert!(run("%missing").is_err());
        assert_eq!(run("conformsTo('http://hl7.org/fhir/StructureDefinition/DomainResource')"), Ok(vec!["true".to_string()]));
        assert!(run("conformsTo('http://example.org/profile')").is_err());
    });
}

#[test]
fn results_convert_to_json() {
    let patient = json::parse(PATIENT.as_bytes()).expect("valid JSON");
    with_model(|types| {
        let ctx = Context::new(types);
        let values = parse("name[0].family | 1.50 | 5 'mg' | @2014-01 | 1 week | true").expect("parses").evaluate(Node::resource(&patient), &ctx).expect("evaluates");
        assert_eq!(
            to_json(&values).to_string_compact(),
            r#"["Chalmers",1.50,{"value":5,"unit":"mg","system":"http://unitsofmeasure.org","code":"mg"},"2014-01",{"value":1,"unit":"week"},true]"#
        );
    });
}

#[test]
fn expressions_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Expression>();
}

/// Representative suite expressions on the suite's own JSON inputs, with the real R4 model.
mod suite_inputs {
    use super::*;
    use crate::definitions::Definitions;

    /// A suite input from the corpus; `None` when the corpus is absent (`test` is then skipped).
    fn corpus(test: &str, file: &str) -> Option<json::Json> {
        let path = crate::need::corpus(test)?.join("fhir-test-cases/r4").join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Some(json::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn run(test: &str, file: &str, expr: &str) -> Option<Result<Vec<String>, EvalError>> {
        let json = corpus(test, file)?;
        let definitions = Definitions::base();
        let types = TypeCache::new(&*definitions);
        let ctx = Context::new(&types);
        Some(parse(expr).expect("parses").evaluate(Node::resource(&json), &ctx).map(|values| values.iter().map(|v| format!("{}:{v}", v.type_name().1)).collect()))
    }

    #[test]
    fn contained_resource_ids() {
        let Some(result) = run("fhirpath::tests::suite_inputs::contained_resource_ids", "patient-container-example.json", "contained.id") else { return };
        assert_eq!(result, Ok(vec!["id:1".to_string()]));
    }

    #[test]
    fn primitive_extensions_without_values() {
        let test = "fhirpath::tests::suite_inputs::primitive_extensions_without_values";
        let Some(result) = run(test, "patient-name-extensions.json", "Patient.name.given.select($this.hasValue())") else { return };
        assert_eq!(result, Ok(vec!["Boolean:false".to_string(), "Boolean:true".to_string()]));
    }

    #[test]
    fn string_functions_refuse_complex_input() {
        let test = "fhirpath::tests::suite_inputs::string_functions_refuse_complex_input";
        let Some(result) = run(test, "appointment-examplereq.json", "Appointment.identifier.startsWith('rand')") else { return };
        assert!(result.is_err());
    }

    #[test]
    fn subset_of_with_this() {
        let Some(result) = run(
            "fhirpath::tests::suite_inputs::subset_of_with_this",
            "explanationofbenefit-example.json",
            "supportingInfo.where(category.coding.code = 'additionalbodysite').sequence.subsetOf($this.item.informationSequence)",
        ) else {
            return;
        };
        assert_eq!(result, Ok(vec!["Boolean:true".to_string()]));
    }
}

#[test]
fn runaway_expressions_stop_with_errors() {
    assert!(eval("1.repeat($this + 1)").is_err());
    assert!(eval("@2020-01-01 + 9223372036854775807 months").is_err());
    assert!(eval("@2020-01-01 + 99999999999 days").is_err());
    check("1.repeat(2)", &["2"]);
}

/// Every invariant of the R4 base specification parses, and evaluates on an empty element
/// without a panic (errors are acceptable there: the element is not what the invariant expects).
#[test]
fn all_r4_core_invariants_parse() {
    let definitions = crate::definitions::Definitions::base();
    let types = TypeCache::new(&*definitions);
    let empty = json::parse(b"{}").expect("valid JSON");
    let mut count = 0;
    let mut failures = Vec::new();
    for entry in definitions.resources_of_type("StructureDefinition") {
        let Some(sd) = entry.resource() else { continue };
        let elements = sd.get("snapshot").and_then(|s| s.get("element")).and_then(json::Json::as_array).unwrap_or(&[]);
        for element in elements {
            let constraints = element.get("constraint").and_then(json::Json::as_array).unwrap_or(&[]);
            for constraint in constraints {
                let Some(expression) = constraint.get("expression").and_then(json::Json::as_str) else { continue };
                count += 1;
                match parse(expression) {
                    Ok(expr) => {
                        let ctx = Context::new(&types);
                        let _ = expr.evaluate(Node::typed(&empty, Some("Element")), &ctx);
                    }
                    Err(e) => failures.push(format!("{expression}: {e}")),
                }
            }
        }
    }
    assert!(count > 1000, "only {count} invariants found");
    assert!(failures.is_empty(), "{} of {count} do not parse:\n{}", failures.len(), failures.join("\n"));
}

/// Random well-formed-ish expressions over all functions and operators: evaluation may fail, but
/// never panics (overflow checks are on in test builds, so arithmetic corners are covered too).
#[test]
fn generated_expressions_never_panic() {
    let lits = ["0", "1", "-1", "2.5", "-0.0", "'a'", "'2014-01-02'", "'12:00'", "@2014", "@2014-02-29", "@T10:00", "@2014-01-01T10:00:00Z", "@2014-01-01T10", "5 'mg'", "3 days", "1 year", "2 'wk'", "true", "false", "{}", "9223372036854775807", "99999999999999999999999999999", "0.0000000000000000000000000001", "'1 \\'mg\\''", "'[a-'", "'dGVzdA=='", "'&lt;'"];
    let paths = ["name", "name.given", "birthDate", "gender", "contained", "id", "$this", "$index", "$total", "%resource", "active", "deceased", "contact.name", "descendants()", "children()", "name.given.extension"];
    let funcs0 = ["exists()", "empty()", "count()", "first()", "last()", "tail()", "single()", "distinct()", "isDistinct()", "not()", "toString()", "toInteger()", "toDecimal()", "toQuantity()", "toDate()", "toDateTime()", "toTime()", "toBoolean()", "convertsToQuantity()", "length()", "upper()", "lower()", "toChars()", "trim()", "abs()", "ceiling()", "floor()", "exp()", "ln()", "sqrt()", "truncate()", "round()", "lowBoundary()", "highBoundary()", "precision()", "type()", "hasValue()", "getValue()", "resolve()", "allTrue()", "anyFalse()", "sort()", "today()", "now()", "timeOfDay()", "children()", "descendants()"];
    let funcs1 = ["where", "select", "repeat", "all", "exists", "skip", "take", "substring", "indexOf", "startsWith", "contains", "matches", "split", "join", "power", "log", "round", "lowBoundary", "highBoundary", "union", "combine", "intersect", "exclude", "subsetOf", "supersetOf", "aggregate", "sort", "trace", "extension", "encode", "decode", "escape", "unescape", "comparable", "toQuantity", "memberOf", "conformsTo"];
    let ops = ["+", "-", "*", "/", "div", "mod", "&", "|", "=", "!=", "~", "!~", "<", "<=", ">", ">=", "and", "or", "xor", "implies", "in", "contains"];
    let types = ["Integer", "String", "Quantity", "HumanName", "code", "string", "System.Boolean", "FHIR.date", "Patient", "Resource"];
    let json = json::parse(PATIENT.as_bytes()).expect("valid JSON");
    let mut seed: u64 = 7;
    let mut rnd = move |n: usize| { seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (seed >> 33) as usize % n };
    // The grammar's word lists, one argument each, read best at the call.
    #[allow(clippy::too_many_arguments)]
    fn generate(depth: u32, rnd: &mut dyn FnMut(usize) -> usize, l: &[&str], p: &[&str], f0: &[&str], f1: &[&str], o: &[&str], t: &[&str]) -> String {
        if depth == 0 { return if rnd(2) == 0 { l[rnd(l.len())].to_string() } else { p[rnd(p.len())].to_string() }; }
        match rnd(7) {
            0 => format!("({} {} {})", generate(depth - 1, rnd, l, p, f0, f1, o, t), o[rnd(o.len())], generate(depth - 1, rnd, l, p, f0, f1, o, t)),
            1 => format!("{}.{}", generate(depth - 1, rnd, l, p, f0, f1, o, t), f0[rnd(f0.len())]),
            2 => format!("{}.{}({})", generate(depth - 1, rnd, l, p, f0, f1, o, t), f1[rnd(f1.len())], generate(depth - 1, rnd, l, p, f0, f1, o, t)),
            3 => format!("({} {} {})", generate(depth - 1, rnd, l, p, f0, f1, o, t), if rnd(2) == 0 { "is" } else { "as" }, t[rnd(t.len())]),
            4 => format!("iif({}, {}, {})", generate(depth - 1, rnd, l, p, f0, f1, o, t), generate(depth - 1, rnd, l, p, f0, f1, o, t), generate(depth - 1, rnd, l, p, f0, f1, o, t)),
            5 => format!("{}[{}]", generate(depth - 1, rnd, l, p, f0, f1, o, t), generate(depth - 1, rnd, l, p, f0, f1, o, t)),
            _ => format!("-{}", generate(depth - 1, rnd, l, p, f0, f1, o, t)),
        }
    }
    let mut ok = 0; let mut errs = 0;
    with_model(|tc| {
        for _ in 0..20_000 {
            let d = 1 + rnd(4) as u32;
            let src = generate(d, &mut rnd, &lits, &paths, &funcs0, &funcs1, &ops, &types);
            let Ok(e) = parse(&src) else {
                errs += 1;
                continue;
            };
            let ctx = Context::new(tc);
            if e.evaluate(Node::resource(&json), &ctx).is_ok() { ok += 1; }
            let _ = e.evaluate_collection(vec![], &ctx.strict(true));
        }
    });
    assert!(ok > 1000 && errs < 15_000, "the generator should mostly produce evaluable expressions ({ok} ok, {errs} not parsed)");
}

/// R4's dom-3, the expression the memo and the focus analysis were made for.
const DOM_3: &str = "contained.where((('#'+id in (%resource.descendants().reference | %resource.descendants().as(canonical) | %resource.descendants().as(uri) | %resource.descendants().as(url))) or descendants().where(reference = '#').exists() or descendants().where(as(canonical) = '#').exists() or descendants().where(as(canonical) = '#').exists()).not()).trace('unmatched', id).empty()";

/// The same expression without the analysis: nothing memoized, focus always observed.
fn parse_plain(expr: &str) -> Expression {
    Expression { source: expr.into(), root: parser::parse_expression(expr).expect("valid"), memo_slots: 0, focus_members: None }
}

#[test]
fn focus_members_are_found_only_where_the_focus_is_seen_through_them() {
    let members = |e: &str| parse(e).expect("valid").focus_members().map(|m| m.iter().map(|n| n.to_string()).collect::<Vec<_>>());
    let names = |n: &[&str]| Some(n.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(members("contained.contained.empty()"), names(&["contained"]));
    assert_eq!(members("contained.meta.versionId.empty() and contained.meta.lastUpdated.empty()"), names(&["contained"]));
    assert_eq!(members("text.`div`.exists()"), names(&["text"]));
    assert_eq!(members(DOM_3), names(&["contained"]));
    assert_eq!(members("name.where(%resource.id.exists()).empty() and birthDate.empty()"), names(&["name", "birthDate"]));
    assert_eq!(members("name.all(given.exists())"), names(&["name"]));
    assert_eq!(members("iif(name.exists(), 1, 2) = 1"), names(&["name"]));
    assert_eq!(members("name.exists() != value.exists()"), names(&["name", "value"]));
    // The focus itself, %-constants, type names, the clock and resolve() are all refused.
    for seen in [
        "exists()",
        "$this.name.exists()",
        "%resource.contained.empty()",
        "%context.name.exists()",
        "Patient.name.exists()",
        "iif(name.exists(), %resource.id, 'x').exists()",
        "name.iif(given.exists(), %resource.id, 'x').exists()",
        "(name | %resource.name).where(given.exists()).empty()",
        "(1 | 2).where($this = %resource.id.length()).empty()",
        "birthDate < today()",
        "managingOrganization.resolve().exists()",
        "children().empty()",
        "descendants().empty()",
        "name.select(given).combine(%rootResource.name).empty()",
    ] {
        assert_eq!(members(seen), None, "{seen}");
    }
}

#[test]
fn an_expression_sees_nothing_of_a_focus_without_its_members() {
    let expr = parse("value.exists() and name.empty()").expect("valid");
    let sees_nothing = |text: &str| expr.sees_nothing_of(&json::parse(text.as_bytes()).expect("json"));
    assert!(sees_nothing(r#"{"resourceType":"Patient","id":"x","active":true}"#));
    assert!(!sees_nothing(r#"{"name":[{"family":"x"}]}"#));
    assert!(!sees_nothing(r#"{"valueString":"x"}"#), "choice spelling");
    assert!(!sees_nothing(r#"{"_value":{"id":"1"}}"#), "primitive extension");
    assert!(!sees_nothing(r#""a string""#), "not an object");
    assert!(!parse("exists()").expect("valid").sees_nothing_of(&json::parse(b"{}").expect("json")));
}

/// The fast path of the invariants: on a focus the expression sees nothing of, evaluating on an
/// empty object of the same type gives the same result, whatever %resource is.
#[test]
fn results_on_an_unseen_focus_equal_results_on_an_empty_one() {
    let expressions = [
        "contained.contained.empty()",
        DOM_3,
        "text.`div`.exists()",
        "name.where(%resource.id.exists()).empty() and birthDate.empty()",
        "name.all(given.exists())",
        "iif(name.exists(), 1, 2) = 1",
        "name.exists() or gender.exists().not()",
        "contained.select(%resource.id).union(name).count() = 0",
        "(contained | name).where($this = %resource).exists().not()",
        "name.aggregate($total + 1, 0) = 0",
        "name.first().given.exists() implies birthDate.exists()",
        "name.count() + 1 = 1",
    ];
    let foci = [
        r#"{"resourceType":"Patient","id":"p","active":true}"#,
        r#"{"resourceType":"Patient","id":"p","gender":"male","contained":[{"resourceType":"Organization","id":"o"}]}"#,
        r#"{"resourceType":"Patient","text":{"div":"<div/>"},"name":[{"given":["A"]}]}"#,
        r#"{"resourceType":"Patient","birthDate":"2000-01-01","_gender":{"id":"g"}}"#,
        r#"{"resourceType":"Patient","deceasedBoolean":true}"#,
    ];
    let empty = json::parse(b"{}").expect("json");
    let mut compared = 0;
    with_model(|types| {
        for text in foci {
            let focus = json::parse(text.as_bytes()).expect("json");
            let resource = json::parse(PATIENT.as_bytes()).expect("json");
            for source in expressions {
                let expr = parse(source).expect("valid");
                assert!(expr.focus_members().is_some(), "{source}");
                if !expr.sees_nothing_of(&focus) {
                    continue;
                }
                compared += 1;
                for ctx_resource in [&focus, &resource] {
                    let ctx = Context::new(types).with_resource(Node::resource(ctx_resource)).with_root_resource(Node::resource(&resource));
                    let on_focus = expr.evaluate_bool(Node::typed(&focus, Some("Patient")), &ctx);
                    let on_empty = expr.evaluate_bool(Node::typed(&empty, Some("Patient")), &ctx);
                    assert_eq!(on_focus, on_empty, "{source} on {text}");
                    assert_eq!(on_focus, parse_plain(source).evaluate_bool(Node::typed(&focus, Some("Patient")), &ctx), "{source} on {text}");
                }
            }
        }
    });
    assert!(compared >= 20, "only {compared} cases exercised the fast path");
}

#[test]
fn memoized_sub_expressions_give_the_results_of_plain_evaluation() {
    assert!(parse(DOM_3).expect("valid").memo_slots >= 2, "the union is hoisted and %resource.descendants() shared");
    assert_eq!(parse("name.given.exists()").expect("valid").memo_slots, 0);
    let cases = [
        DOM_3,
        "name.where(%resource.name.count() = 2).count()",
        "name.select(%resource.id & given.first())",
        "name.where($this = %resource.name.first()).count()",
        "(1 | 2 | 3).select($this + %resource.name.count())",
        "name.select(%context.id | %context.id)",
        "name.select(given.count() + name.count())",
        "name.select($index + (1 | 2).count())",
        "name.aggregate($total + %resource.name.count(), 0)",
        "(1 | 2).select(now() = now())",
        "name.where(given.trace('g').exists()).count()",
        "contained.where(('#' + id) in %resource.descendants().reference).id",
        "name.select(iif(%resource.active, given.first(), family))",
        "name.select((%resource.name | %resource.contact.name).count())",
    ];
    let resource = json::parse(PATIENT.as_bytes()).expect("json");
    with_model(|types| {
        let ctx = Context::new(types).with_now(fixed_now());
        for source in cases {
            let render = |r: Result<Vec<Value<'_>>, EvalError>| r.map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>());
            let memoized = render(parse(source).expect("valid").evaluate(Node::resource(&resource), &ctx));
            let plain = render(parse_plain(source).evaluate(Node::resource(&resource), &ctx));
            assert_eq!(memoized, plain, "{source}");
        }
    });
}

#[test]
fn large_string_collections_dedupe_like_small_ones() {
    let letters: Vec<String> = (0..40).map(|i| format!("'{}'", (b'a' + (i % 13) as u8) as char)).collect();
    let union = letters.join(" | ");
    check(&format!("({union}).count()"), &["13"]);
    check(&format!("({}).distinct().count()", letters.join(").combine(")), &["13"]);
    check(&format!("({}).isDistinct()", letters.join(").combine(")), &["false"]);
    // Strings that are dates equal Date values, so a mixed collection keeps the pairwise rules.
    let mut mixed: Vec<String> = (1..=20).map(|d| format!("'2020-01-{d:02}'")).collect();
    mixed.push("@2020-01-05".to_string());
    check(&format!("({}).count()", mixed.join(" | ")), &["20"]);
}
