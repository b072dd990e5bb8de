//! Tests of the XML reader: a small hand-written R4 model for exact JSON shapes and issues, and the real R4 model over the corpus.

use std::collections::HashMap;

use super::*;
use crate::definitions::Definitions;
use crate::fhirpath::ChildElement;
use crate::json;
use crate::outcome::IssueCode;

const SYS_STRING: &str = "http://hl7.org/fhirpath/System.String";

/// The children of a type in definition order.
type Children = Vec<(String, ChildElement)>;

/// A tiny slice of R4, enough to exercise every conversion rule with known answers.
struct TestModel {
    /// Type → (base type, children).
    types: HashMap<String, (Option<String>, Children)>,
}

impl TestModel {
    fn new() -> TestModel {
        let mut model = TestModel { types: HashMap::new() };
        let choice_values = "string|boolean|integer|decimal|code|dateTime|base64Binary|CodeableConcept|Coding|Quantity|Reference|Period";
        model.def("Element", None, "id:SYS extension:Extension*");
        model.def("BackboneElement", Some("Element"), "modifierExtension:Extension*");
        model.def("Resource", None, "id:SYS meta:Meta implicitRules:uri language:code");
        model.def("DomainResource", Some("Resource"), "text:Narrative contained:Resource* extension:Extension* modifierExtension:Extension*");
        model.def("Extension", Some("Element"), &format!("url:SYS value[x]:{choice_values}"));
        model.def("Narrative", Some("Element"), "status:code div:xhtml");
        model.def("Meta", Some("Element"), "versionId:id lastUpdated:instant profile:canonical* tag:Coding*");
        model.def("Coding", Some("Element"), "system:uri version:string code:code display:string userSelected:boolean");
        model.def("CodeableConcept", Some("Element"), "coding:Coding* text:string");
        model.def("Quantity", Some("Element"), "value:decimal comparator:code unit:string system:uri code:code");
        model.def("Period", Some("Element"), "start:dateTime end:dateTime");
        model.def("Reference", Some("Element"), "reference:string type:uri display:string");
        model.def("Identifier", Some("Element"), "use:code system:uri value:string period:Period");
        model.def("HumanName", Some("Element"), "use:code text:string family:string given:string* prefix:string* period:Period");
        model.def(
            "Patient",
            Some("DomainResource"),
            "identifier:Identifier* active:boolean name:HumanName* gender:code birthDate:date deceased[x]:boolean|dateTime \
             multipleBirth[x]:boolean|integer contact:Patient.contact*",
        );
        model.def("Patient.contact", Some("BackboneElement"), "name:HumanName gender:code");
        model.def(
            "Observation",
            Some("DomainResource"),
            "status:code code:CodeableConcept subject:Reference effective[x]:dateTime|Period value[x]:Quantity|CodeableConcept|string|boolean|integer \
             component:Observation.component*",
        );
        model.def("Observation.component", Some("BackboneElement"), "code:CodeableConcept value[x]:Quantity|string");
        model.def("Bundle", Some("Resource"), "type:code total:unsignedInt entry:Bundle.entry*");
        model.def("Bundle.entry", Some("BackboneElement"), "fullUrl:uri resource:Resource");
        model.def("Parameters", Some("Resource"), "parameter:Parameters.parameter*");
        model.def("Parameters.parameter", Some("BackboneElement"), &format!("name:string value[x]:{choice_values} resource:Resource part:Parameters.parameter*"));
        model
    }

    /// `spec` lists `name:Type`, `name:Type*` (repeating) and `name[x]:T1|T2` (choice); a type
    /// inherits its base's children first, as a snapshot does.
    fn def(&mut self, name: &str, base: Option<&str>, spec: &str) {
        let mut children = base.and_then(|b| self.types.get(b)).map(|(_, c)| c.clone()).unwrap_or_default();
        for entry in spec.split_whitespace() {
            let (element, types) = entry.split_once(':').expect("name:type");
            let many = types.ends_with('*');
            let types = types.trim_end_matches('*');
            let is_choice = element.ends_with("[x]");
            let types = types.split('|').map(|t| if t == "SYS" { SYS_STRING.to_string() } else { t.to_string() }).collect();
            children.push((element.trim_end_matches("[x]").to_string(), ChildElement { types, is_choice, many }));
        }
        self.types.insert(name.to_string(), (base.map(str::to_string), children));
    }

    fn children_of(&self, parent: &str) -> Option<Children> {
        if parent.starts_with(|c: char| c.is_ascii_lowercase()) {
            // Every primitive type has the same three children.
            let one = |t: &str, many| ChildElement { types: vec![t.to_string()], is_choice: false, many };
            return Some(vec![("id".into(), one(SYS_STRING, false)), ("extension".into(), one("Extension", true)), ("value".into(), one(SYS_STRING, false))]);
        }
        self.types.get(parent).map(|(_, c)| c.clone())
    }
}

impl TypeModel for TestModel {
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement> {
        self.children_of(parent)?.into_iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    fn base_type(&self, type_name: &str) -> Option<String> {
        self.types.get(type_name)?.0.clone()
    }

    fn element_order(&self, type_name: &str) -> Option<Vec<String>> {
        Some(self.children_of(type_name)?.into_iter().map(|(n, _)| n).collect())
    }
}

/// The same model without element order, as a model that cannot tell would be.
struct Unordered(TestModel);

impl TypeModel for Unordered {
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement> {
        self.0.child(parent, name)
    }

    fn base_type(&self, type_name: &str) -> Option<String> {
        self.0.base_type(type_name)
    }
}

fn read(xml: &str) -> (Json, Vec<Issue>) {
    parse_resource(xml.as_bytes(), &TestModel::new()).unwrap_or_else(|e| panic!("not readable: {e}"))
}

/// Reads a document that must convert without issues.
fn clean(xml: &str) -> Json {
    let (json, issues) = read(xml);
    assert!(issues.is_empty(), "unexpected issues: {issues:#?}");
    json
}

fn fatal(xml: &str) -> XmlError {
    parse_resource(xml.as_bytes(), &TestModel::new()).expect_err("should be refused")
}

fn json(text: &str) -> Json {
    json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("bad expected JSON: {e}"))
}

fn patient(body: &str) -> String {
    format!("<Patient xmlns=\"http://hl7.org/fhir\">{body}</Patient>")
}

/// (expression, code, line, column) of each issue, for compact assertions.
fn summary(issues: &[Issue]) -> Vec<(String, IssueCode, usize, usize)> {
    issues.iter().map(|i| (i.expression.clone(), i.code, i.position.map_or(0, |p| p.0), i.position.map_or(0, |p| p.1))).collect()
}

/// The only issue, which must be at `expression` and mention `words`.
fn single_issue(xml: &str, expression: &str, words: &str) -> Json {
    let (json, issues) = read(xml);
    assert_eq!(issues.len(), 1, "expected one issue: {issues:#?}");
    assert_eq!(issues[0].expression, expression, "{issues:#?}");
    assert!(issues[0].message.contains(words), "{:?} lacks {words:?}", issues[0].message);
    assert_eq!(issues[0].severity, crate::outcome::Severity::Error);
    assert!(issues[0].position.is_some());
    json
}

#[test]
fn converts_primitives_complex_and_repeating_elements() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Patient xmlns="http://hl7.org/fhir">
  <!-- comments and processing instructions are ignored -->
  <?pi ignored?>
  <id value="p1"/>
  <active value="true"/>
  <name id="n1">
    <family value="Chalmers"/>
    <given value="Peter"/>
    <given value="James"/>
  </name>
  <name><text value="Jim"/></name>
  <gender value="male"/>
  <birthDate value="1974-12-25"/>
  <deceasedBoolean value="false"/>
  <multipleBirthInteger value="2"/>
</Patient>"#;
    let expected = json(
        r#"{"resourceType":"Patient","id":"p1","active":true,
            "name":[{"id":"n1","family":"Chalmers","given":["Peter","James"]},{"text":"Jim"}],
            "gender":"male","birthDate":"1974-12-25","deceasedBoolean":false,"multipleBirthInteger":2}"#,
    );
    assert_eq!(clean(xml), expected);
}

#[test]
fn keeps_decimal_text_and_types_choices_by_suffix() {
    let xml = r#"<Observation xmlns="http://hl7.org/fhir">
  <status value="final"/>
  <effectivePeriod><start value="2020-01-01"/></effectivePeriod>
  <valueQuantity><value value="1.50"/><unit value="mmol/L"/></valueQuantity>
  <component><valueString value="x"/></component>
  <component><valueQuantity><value value="-1e3"/></valueQuantity></component>
</Observation>"#;
    let expected = json(
        r#"{"resourceType":"Observation","status":"final","effectivePeriod":{"start":"2020-01-01"},
            "valueQuantity":{"value":1.50,"unit":"mmol/L"},
            "component":[{"valueString":"x"},{"valueQuantity":{"value":-1e3}}]}"#,
    );
    let converted = clean(xml);
    assert_eq!(converted, expected);
    assert!(converted.to_string_compact().contains("1.50"), "the number text is kept as written");
}

#[test]
fn puts_primitive_ids_and_extensions_in_the_underscore_sibling() {
    let xml = patient(
        r#"<extension url="http://example.org/complex">
             <extension url="a"><valueCode value="x"/></extension>
             <extension url="b"><valueInteger value="-3"/></extension>
           </extension>
           <name>
             <given value="a"/>
             <given id="g2"><extension url="http://x"><valueString value="b"/></extension></given>
             <given value="c"><extension url="http://y"><valueBoolean value="false"/></extension></given>
           </name>
           <birthDate value="1970-01-01"><extension url="http://t"><valueDateTime value="1970-01-01T10:00:00Z"/></extension></birthDate>
           <deceasedDateTime id="d"/>"#,
    );
    let expected = json(
        r#"{"resourceType":"Patient",
            "extension":[{"url":"http://example.org/complex","extension":[{"url":"a","valueCode":"x"},{"url":"b","valueInteger":-3}]}],
            "name":[{"given":["a",null,"c"],
                     "_given":[null,{"id":"g2","extension":[{"url":"http://x","valueString":"b"}]},{"extension":[{"url":"http://y","valueBoolean":false}]}]}],
            "birthDate":"1970-01-01","_birthDate":{"extension":[{"url":"http://t","valueDateTime":"1970-01-01T10:00:00Z"}]},
            "_deceasedDateTime":{"id":"d"}}"#,
    );
    assert_eq!(clean(&xml), expected);
}

#[test]
fn serializes_the_narrative_div() {
    let xml = patient(
        "<text><status value=\"generated\"/><div xmlns=\"http://www.w3.org/1999/xhtml\">\n  <p>Hi &amp; <b>there</b> &#169;</p>\r\n</div></text>",
    );
    let converted = clean(&xml);
    let div = converted.get("text").and_then(|t| t.get("div")).and_then(Json::as_str);
    assert_eq!(div, Some("<div xmlns=\"http://www.w3.org/1999/xhtml\">\n  <p>Hi &amp; <b>there</b> \u{a9}</p>\n</div>"));
    assert_eq!(converted.get("text").and_then(|t| t.get("status")), Some(&Json::string("generated")));
}

#[test]
fn wraps_contained_and_entry_resources() {
    let xml = r#"<Bundle xmlns="http://hl7.org/fhir">
  <type value="collection"/>
  <total value="2"/>
  <entry>
    <fullUrl value="urn:uuid:1"/>
    <resource>
      <Patient>
        <id value="a"/>
        <contained><Observation><id value="o"/><status value="final"/></Observation></contained>
        <active value="false"/>
      </Patient>
    </resource>
  </entry>
  <entry>
    <resource><Parameters><parameter><name value="p"/><resource><Patient><id value="b"/></Patient></resource>
      <part><name value="q"/><valueDecimal value="0.10"/></part></parameter></Parameters></resource>
  </entry>
</Bundle>"#;
    let expected = json(
        r#"{"resourceType":"Bundle","type":"collection","total":2,"entry":[
             {"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient","id":"a",
                 "contained":[{"resourceType":"Observation","id":"o","status":"final"}],"active":false}},
             {"resource":{"resourceType":"Parameters","parameter":[{"name":"p","resource":{"resourceType":"Patient","id":"b"},
                 "part":[{"name":"q","valueDecimal":0.10}]}]}}]}"#,
    );
    assert_eq!(clean(xml), expected);
}

#[test]
fn carries_unknown_elements_for_the_validator() {
    let xml = patient(
        r#"<nickname value="Jim"/>
           <name><foo><bar value="1"/><bar value="2"/><baz>free text</baz></foo></name>
           <deceasedString value="no such choice type"/>"#,
    );
    let expected = json(
        r#"{"resourceType":"Patient","nickname":"Jim","name":[{"foo":{"bar":["1","2"],"baz":"free text"}}],"deceasedString":"no such choice type"}"#,
    );
    assert_eq!(clean(&xml), expected);
    // An unknown resource type is carried as well: the validator says it is not a resource.
    assert_eq!(clean(r#"<Foo xmlns="http://hl7.org/fhir"><a value="1"/><b/></Foo>"#), json(r#"{"resourceType":"Foo","a":"1","b":{}}"#));
    // Two names for one choice are both carried; the validator reports the clash as for JSON.
    let both = clean(&patient(r#"<deceasedBoolean value="true"/><deceasedDateTime value="2020"/>"#));
    assert_eq!(both, json(r#"{"resourceType":"Patient","deceasedBoolean":true,"deceasedDateTime":"2020"}"#));
}

#[test]
fn reports_text_inside_fhir_elements() {
    let xml = "<Patient xmlns=\"http://hl7.org/fhir\">\n  <active value=\"true\"/> [%loop%]\n  <name>x</name>\n</Patient>";
    let (converted, issues) = read(xml);
    assert_eq!(
        summary(&issues),
        vec![("Patient".to_string(), IssueCode::Structure, 2, 26), ("Patient.name[0]".to_string(), IssueCode::Structure, 3, 9)]
    );
    assert!(issues[0].message.contains("[%loop%]"), "{}", issues[0].message);
    assert_eq!(converted, json(r#"{"resourceType":"Patient","active":true,"name":[{}]}"#));
    // A character that is whitespace to Unicode but not to XML is text.
    single_issue(&patient("\u{3000}<active value=\"true\"/>"), "Patient", "\u{3000}");
}

#[test]
fn reports_undefined_attributes() {
    single_issue(&patient(r#"<active value="true" foo="1"/>"#), "Patient.active", "'foo'");
    single_issue(&patient(r#"<name url="x"/>"#), "Patient.name[0]", "'url'");
    single_issue(r#"<Patient xmlns="http://hl7.org/fhir" id="x"/>"#, "Patient", "'id'");
    single_issue(&patient(r#"<contained id="c"><Patient/></contained>"#), "Patient.contained[0]", "'id'");
    let xsi = r#"<Patient xmlns="http://hl7.org/fhir" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://hl7.org/fhir x.xsd"/>"#;
    single_issue(xsi, "Patient", "xsi:schemaLocation");
    let options = XmlOptions { allow_xsi_schema_location: true };
    let (_, issues) = parse_resource_with(xsi.as_bytes(), &TestModel::new(), &options).unwrap();
    assert!(issues.is_empty(), "{issues:#?}");
}

#[test]
fn reports_elements_out_of_definition_order() {
    let xml = patient(
        "\n<name><family value=\"b\"/><given value=\"a\"/><prefix value=\"c\"/><given value=\"d\"/></name>\n<active value=\"true\"/>\n<gender value=\"male\"/>",
    );
    let (converted, issues) = read(&xml);
    // Issues come in document order although the parent's children are checked first.
    assert_eq!(
        summary(&issues),
        vec![
            ("Patient.name[0].given[1]".to_string(), IssueCode::Invalid, 2, 63),
            ("Patient.active".to_string(), IssueCode::Invalid, 3, 1),
        ]
    );
    assert!(issues[0].message.contains("'given' is out of order: it must come before 'prefix'"), "{}", issues[0].message);
    assert!(issues[1].message.contains("'active' is out of order: it must come before 'name'"), "{}", issues[1].message);
    // The JSON is complete all the same.
    assert_eq!(converted.get("name").and_then(|n| n.as_array()?.first()?.get("given")), Some(&json(r#"["a","d"]"#)));
    // A model that does not know the order skips the check.
    let (_, issues) = parse_resource(xml.as_bytes(), &Unordered(TestModel::new())).unwrap();
    assert!(issues.is_empty(), "{issues:#?}");
}

#[test]
fn reports_a_repeated_single_element_and_keeps_the_first() {
    let converted = single_issue(&patient(r#"<gender value="male"/><gender value="female"/>"#), "Patient.gender", "at most 1");
    assert_eq!(converted, json(r#"{"resourceType":"Patient","gender":"male"}"#));
}

#[test]
fn reports_malformed_primitive_values() {
    let converted = single_issue(&patient(r#"<active value="yes"/>"#), "Patient.active", "'yes' is not a valid boolean");
    assert_eq!(converted, json(r#"{"resourceType":"Patient"}"#));
    single_issue(&patient(r#"<multipleBirthInteger value="+2"/>"#), "Patient.multipleBirthInteger", "not a valid integer");
    single_issue(&patient(r#"<active value=" true"/>"#), "Patient.active", "boolean");
    // The id and extensions of a primitive with a bad value are kept.
    let converted = single_issue(&patient(r#"<active id="a" value="1"/>"#), "Patient.active", "boolean");
    assert_eq!(converted, json(r#"{"resourceType":"Patient","_active":{"id":"a"}}"#));
    // Lexical rules of string-typed primitives are the validator's, as for JSON input.
    assert_eq!(clean(&patient(r#"<birthDate value="not a date"/>"#)).get("birthDate"), Some(&Json::string("not a date")));
    let empty = single_issue(&patient(r#"<gender/>"#), "Patient.gender", "neither a value");
    assert_eq!(empty, json(r#"{"resourceType":"Patient"}"#));
}

#[test]
fn reports_attributes_written_as_elements() {
    single_issue(&patient(r#"<name><id value="x"/></name>"#), "Patient.name[0].id", "attribute");
    single_issue(&patient(r#"<active><value value="true"/></active>"#), "Patient.active.value", "attribute");
    single_issue(&patient(r#"<extension><url value="http://x"/><valueString value="s"/></extension>"#), "Patient.extension[0].url", "attribute");
    // Resource.id is an element, not an attribute.
    assert_eq!(clean(&patient(r#"<id value="x"/>"#)), json(r#"{"resourceType":"Patient","id":"x"}"#));
}

#[test]
fn reports_namespace_problems() {
    single_issue(&patient(r#"<x:active xmlns:x="urn:other" value="true"/>"#), "Patient.active", "urn:other");
    single_issue(&patient(r#"<active xmlns="" value="true"/>"#), "Patient.active", "no namespace");
    single_issue(&patient(r#"<text><status value="generated"/><div><p/></div></text>"#), "Patient.text.div", "XHTML namespace");
    let converted = single_issue(
        &patient(r#"<text><div xmlns="http://www.w3.org/1999/xhtml"><p>a</p><f:b xmlns:f="http://hl7.org/fhir"/></div></text>"#),
        "Patient.text.div",
        "not XHTML",
    );
    assert_eq!(converted.get("text").and_then(|t| t.get("div")), Some(&Json::string("<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>a</p></div>")));
    // A prefixed FHIR namespace is the FHIR namespace.
    assert_eq!(clean(r#"<f:Patient xmlns:f="http://hl7.org/fhir"><f:active value="true"/></f:Patient>"#), json(r#"{"resourceType":"Patient","active":true}"#));
}

#[test]
fn reports_bad_resource_wrappers_and_bare_choices() {
    single_issue(&patient("<contained/>"), "Patient.contained[0]", "must contain a resource");
    let two = single_issue(&patient("<contained><Patient/><Observation/></contained>"), "Patient.contained[0]", "only one resource");
    assert_eq!(two, json(r#"{"resourceType":"Patient","contained":[{"resourceType":"Patient"}]}"#));
    single_issue(&patient(r#"<deceased value="true"/>"#), "Patient.deceased", "choice element");
    single_issue(&patient(r#"<resourceType value="Bundle"/>"#), "Patient.resourceType", "unrecognized");
    single_issue(&patient(r#"<_active value="true"/>"#), "Patient._active", "unrecognized");
}

#[test]
fn refuses_documents_that_are_not_fhir_xml() {
    let e = fatal(r#"<ClinicalDocument xmlns="urn:hl7-org:v3"/>"#);
    assert!(e.message.contains("not appear to be a FHIR resource"), "{e}");
    assert!(fatal("<Patient/>").message.contains("FHIR resource"));
    let e = fatal("<Patient xmlns=\"http://hl7.org/fhir\">\n  <active value=\"true\">\n</Patient>");
    assert_eq!((e.line, e.code), (3, IssueCode::Structure), "{e}");
    let issue = e.to_issue();
    assert_eq!((issue.severity, issue.position), (crate::outcome::Severity::Fatal, Some((3, e.column))));
    let xxe = "<?xml version=\"1.0\"?>\n<!DOCTYPE Patient [<!ENTITY x SYSTEM \"file:///etc/passwd\">]>\n<Patient xmlns=\"http://hl7.org/fhir\"><name><text value=\"&x;\"/></name></Patient>";
    let e = fatal(xxe);
    assert!(e.message.contains("DOCTYPE") && e.line == 2, "{e}");
    assert!(fatal(&patient(r#"<name><text value="&nbsp;"/></name>"#)).message.contains("not declared"));
    assert!(fatal("{\"resourceType\": \"Patient\"}").message.contains("not well-formed") || fatal("{}").message.contains("root"));
    assert!(parse_resource(b"\xff\xfe<\0", &TestModel::new()).is_err());
}

#[test]
fn refuses_deep_nesting_and_converts_up_to_the_limit() {
    let nest = |levels: usize| {
        let mut xml = String::from("<Parameters xmlns=\"http://hl7.org/fhir\"><parameter>");
        xml.push_str(&"<part>".repeat(levels));
        xml.push_str("<name value=\"deepest\"/>");
        xml.push_str(&"</part>".repeat(levels));
        xml.push_str("</parameter></Parameters>");
        xml
    };
    let e = fatal(&nest(100_000));
    assert_eq!(e.code, IssueCode::TooLong, "{e}");
    // Parameters, parameter, the parts and `name` together use the whole depth allowance.
    let (converted, issues) = read(&nest(MAX_DEPTH - 3));
    assert!(issues.is_empty());
    // The JSON stays within what the JSON reader itself accepts.
    let text = converted.to_string_compact();
    assert!(text.contains("deepest"));
    assert_eq!(json::parse(text.as_bytes()).as_ref(), Ok(&converted));
    assert_eq!(fatal(&nest(MAX_DEPTH - 2)).code, IssueCode::TooLong);
    // Unknown content takes the untyped path, which must be bounded the same way.
    let unknown = patient(&format!("{}{}", "<foo>".repeat(MAX_DEPTH - 1), "</foo>".repeat(MAX_DEPTH - 1)));
    let converted = clean(&unknown);
    assert!(json::parse(converted.to_string_compact().as_bytes()).is_ok());
    // And so must the narrative serializer.
    let levels = MAX_DEPTH - 3;
    let narrative = patient(&format!("<text><div xmlns=\"http://www.w3.org/1999/xhtml\">{}x{}</div></text>", "<b>".repeat(levels), "</b>".repeat(levels)));
    let converted = clean(&narrative);
    assert!(at(&converted, "text.div").and_then(Json::as_str).is_some_and(|d| d.contains("<b><b>x</b></b>")));
}

#[test]
fn never_panics_on_truncated_or_mangled_input() {
    let xml = patient(
        r#"<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml"><p>x</p></div></text><name><given value="a"/></name><contained><Observation><valueQuantity><value value="1"/></valueQuantity></Observation></contained>"#,
    );
    let bytes = xml.as_bytes();
    let model = TestModel::new();
    for end in 0..bytes.len() {
        let _ = parse_resource(&bytes[..end], &model);
    }
    for i in 0..bytes.len() {
        for replacement in [b'<', b'>', b'&', b'"', b'/', 0xff, b' '] {
            let mut mangled = bytes.to_vec();
            mangled[i] = replacement;
            let _ = parse_resource(&mangled, &model);
        }
    }
}

// ---- The real R4 model ----

/// The corpus' R4 FHIRPath test inputs, or `None` (the test is skipped).
fn r4_cases(test: &str) -> Option<std::path::PathBuf> {
    Some(crate::need::corpus(test)?.join("fhir-test-cases/r4"))
}

/// The corpus' validator test cases, or `None` (the test is skipped).
fn validator_cases(test: &str) -> Option<std::path::PathBuf> {
    Some(crate::need::corpus(test)?.join("fhir-test-cases/validator"))
}

fn read_r4(cases: &std::path::Path, file: &str) -> (Json, Vec<Issue>) {
    let path = cases.join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_resource_with(&bytes, &*Definitions::base(), &XmlOptions { allow_xsi_schema_location: true })
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Follows a FHIRPath-like path of member names and indices (`name[0].given[1]`).
fn at<'j>(value: &'j Json, path: &str) -> Option<&'j Json> {
    path.split('.').try_fold(value, |node, step| {
        let (name, index) = match step.split_once('[') {
            Some((name, rest)) => (name, Some(rest.trim_end_matches(']').parse::<usize>().ok()?)),
            None => (step, None),
        };
        let member = node.get(name)?;
        match index {
            Some(i) => member.as_array()?.get(i),
            None => Some(member),
        }
    })
}

#[test]
fn converts_every_r4_example_of_the_corpus() {
    let Some(cases) = r4_cases("xml::tests::converts_every_r4_example_of_the_corpus") else { return };
    let mut files: Vec<String> = std::fs::read_dir(&cases)
        .expect("a readable corpus folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".xml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for file in &files {
        let (converted, issues) = read_r4(&cases, file);
        if file == "observation-example.xml" {
            // This FHIRPath test input really has its extension after the status.
            let found: Vec<_> = issues.iter().map(|i| (i.expression.as_str(), i.position)).collect();
            assert_eq!(found, vec![("Observation.extension[0]", Some((5, 2)))], "{issues:#?}");
            continue;
        }
        assert!(issues.is_empty(), "{file}: {issues:#?}");
        let file_type = converted.get("resourceType").and_then(Json::as_str).unwrap_or_default().to_lowercase();
        assert!(file.starts_with(&file_type), "{file}: {file_type}");
    }
}

#[test]
fn reads_known_values_of_the_r4_examples() {
    let Some(cases) = r4_cases("xml::tests::reads_known_values_of_the_r4_examples") else { return };
    let expect = |file: &str, checks: &[(&str, &str)]| {
        let (converted, _) = read_r4(&cases, file);
        for (path, value) in checks {
            let found = at(&converted, path).map(Json::to_string_compact);
            assert_eq!(found.as_deref(), Some(*value), "{file}: {path}");
        }
        converted
    };
    let patient = expect(
        "patient-example.xml",
        &[
            ("id", r#""example""#),
            ("active", "true"),
            ("name[0].given[1]", r#""James""#),
            ("name[2].period.end", r#""2002""#),
            ("identifier[0].type.coding[0].code", r#""MR""#),
            ("_birthDate.extension[0].url", r#""http://hl7.org/fhir/StructureDefinition/patient-birthTime""#),
            ("_birthDate.extension[0].valueDateTime", r#""1974-12-25T14:35:45-05:00""#),
            ("deceasedBoolean", "false"),
            ("contact[0].relationship[0].coding[0].code", r#""N""#),
            ("contact[0].name._family.extension[0].valueString", r#""VV""#),
        ],
    );
    let div = at(&patient, "text.div").and_then(Json::as_str).unwrap_or_default();
    assert!(div.starts_with("<div xmlns=\"http://www.w3.org/1999/xhtml\">") && div.contains("<b>Chalmers</b> (\"Jim\")"), "{div}");
    expect(
        "observation-example.xml",
        &[("resourceType", r#""Observation""#), ("valueQuantity.value", "185"), ("code.coding[0].system", r#""http://loinc.org""#)],
    );
    expect(
        "parameters-example-types.xml",
        &[
            ("parameter[1].valueInteger", "1"),
            ("parameter[2].valueUuid", r#""urn:uuid:79a14950-442c-11ed-b878-0242ac120002""#),
            ("parameter[3].valueDecimal", "1.0"),
        ],
    );
    expect("questionnaire-example.xml", &[("item[0].item[0].item[0].linkId", r#""1.1.1""#)]);
    expect("codesystem-example.xml", &[("concept[0].code", r#""chol-mass""#), ("concept[0].display", r#""SChol (mmol/L)""#), ("caseSensitive", "true")]);
    expect("valueset-example-expansion.xml", &[("expansion.total", "8"), ("expansion.contains[0].code", r#""14647-2""#)]);
    expect("patient-example-period.xml", &[("identifier[0].period.end", r#""2001-05-06T10:10:10Z""#), ("name[2].period.end", r#""2002""#)]);
}

#[test]
fn converted_examples_have_no_structural_problems_for_the_validator() {
    let Some(cases) = r4_cases("xml::tests::converted_examples_have_no_structural_problems_for_the_validator") else { return };
    let validator = crate::validation::Validator::new(Definitions::base());
    for file in ["patient-example.xml", "observation-example.xml", "questionnaire-example.xml", "codesystem-example.xml", "valueset-example-expansion.xml"] {
        let (converted, _) = read_r4(&cases, file);
        let report = validator.validate_json(&converted, &[]);
        let structural: Vec<_> = report.issues.iter().filter(|i| i.code == IssueCode::Structure).collect();
        assert!(structural.is_empty(), "{file}: {structural:#?}");
    }
}

#[test]
fn reads_the_validator_test_cases_like_the_reference_validator() {
    let Some(cases) = validator_cases("xml::tests::reads_the_validator_test_cases_like_the_reference_validator") else { return };
    let model = Definitions::base();
    let read = |file: &str| {
        let bytes = std::fs::read(cases.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        parse_resource(&bytes, &*model)
    };
    // Text in the Bundle and xsi:schemaLocation are the XML problems HL7's validator reports here.
    let (_, issues) = read("xml-fail.xml").expect("readable");
    let messages: Vec<&str> = issues.iter().map(|i| i.message.as_str()).collect();
    assert_eq!(messages.iter().filter(|m| m.contains("text is not allowed")).count(), 2, "{messages:#?}");
    assert_eq!(messages.iter().filter(|m| m.contains("xsi:schemaLocation")).count(), 1, "{messages:#?}");
    assert_eq!(issues.len(), 3, "{issues:#?}");
    // Shift-JIS bytes without an encoding declaration: HL7's validator decodes them lossily, this
    // reader refuses rather than corrupt the text.
    let e = read("japanese-utf8-ok.xml").expect_err("not UTF-8");
    assert_eq!((e.line, e.column), (15, 16), "{e}");
    // A CDA document is not FHIR.
    assert!(read("ccda-xsi-type.xml").expect_err("not FHIR").message.contains("not appear to be a FHIR resource"));
    // A primitive with only an id keeps it for the validator's ele-1 check.
    let (converted, issues) = read("patient-id-only.xml").expect("readable");
    assert!(issues.is_empty(), "{issues:#?}");
    assert_eq!(converted.get("_implicitRules"), Some(&json(r#"{"id":"i1"}"#)));
    // xml:space in the narrative is kept for the validator to judge.
    let (converted, _) = read("dr-xml-space.xml").expect("readable");
    assert!(at(&converted, "text.div").and_then(Json::as_str).is_some_and(|d| d.contains("<pre xml:space=\"preserve\">")));
}

#[test]
fn reads_every_xml_validator_test_case_without_panicking() {
    let Some(cases) = validator_cases("xml::tests::reads_every_xml_validator_test_case_without_panicking") else { return };
    let model = Definitions::base();
    let mut n_read = 0;
    let mut stack = vec![cases];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a readable corpus folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "xml") {
                let bytes = std::fs::read(&path).expect("readable file");
                if parse_resource(&bytes, &*model).is_ok() {
                    n_read += 1;
                }
            }
        }
    }
    assert!(n_read > 100, "only {n_read} XML test files converted");
}


// ---- The writer ----

fn write(json_text: &str) -> String {
    write_resource(&json(json_text), &TestModel::new()).expect("a resource")
}

/// Whether two trees are equal with member order aside and numbers compared by their text.
fn same_tree(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_tree(v, w))),
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_tree(v, w)),
        _ => a == b,
    }
}

/// Writes a resource, reads it back with the reader and expects the same tree and no issues.
fn round_trip(json_text: &str) -> String {
    let original = json(json_text);
    let xml = write(json_text);
    let back = clean(&xml);
    assert!(same_tree(&original, &back), "{xml}\n{back}");
    xml
}

#[test]
fn writes_members_in_definition_order_with_primitive_ids_and_extensions() {
    let xml = round_trip(
        r#"{"gender":"male","name":[{"given":["a",null],"_given":[null,{"id":"g2","extension":[{"url":"http://x","valueString":"b"}]}],"family":"F","id":"n1"}],
            "resourceType":"Patient","_active":{"extension":[{"url":"http://y","valueBoolean":false}]},"active":true,"id":"p1"}"#,
    );
    assert_eq!(
        xml,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Patient xmlns=\"http://hl7.org/fhir\"><id value=\"p1\"/>\
         <active value=\"true\"><extension url=\"http://y\"><valueBoolean value=\"false\"/></extension></active>\
         <name id=\"n1\"><family value=\"F\"/><given value=\"a\"/><given id=\"g2\"><extension url=\"http://x\"><valueString value=\"b\"/></extension></given></name>\
         <gender value=\"male\"/></Patient>"
    );
}

#[test]
fn writes_decimals_as_written_choices_by_their_json_name_and_escapes_values() {
    let xml = round_trip(r#"{"resourceType":"Observation","valueQuantity":{"unit":"mmol/L","value":1.50},"status":"final","code":{"text":"a<b & \"c\"\nd\te"}}"#);
    assert_eq!(
        xml,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Observation xmlns=\"http://hl7.org/fhir\"><status value=\"final\"/>\
         <code><text value=\"a&lt;b &amp; &quot;c&quot;&#10;d&#9;e\"/></code><valueQuantity><value value=\"1.50\"/><unit value=\"mmol/L\"/></valueQuantity></Observation>"
    );
    round_trip(r#"{"resourceType":"Observation","status":"final","component":[{"valueString":"x"},{"valueQuantity":{"value":-1e3}}],"effectivePeriod":{"end":"2020-02-01","start":"2020-01-01"}}"#);
}

#[test]
fn writes_nested_resources_and_the_narrative() {
    let xml = round_trip(
        r#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"a","contained":[{"resourceType":"Observation","status":"final"}],
              "text":{"div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Hi &amp; <b>there</b></p></div>","status":"generated"}},"fullUrl":"urn:uuid:1"},
            {"resource":{"resourceType":"Parameters","parameter":[{"name":"p","resource":{"resourceType":"Patient","active":false}}]}}],"type":"collection"}"#,
    );
    assert!(xml.contains("<entry><fullUrl value=\"urn:uuid:1\"/><resource><Patient><id value=\"a\"/><text><status value=\"generated\"/><div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Hi &amp; <b>there</b></p></div></text><contained><Observation><status value=\"final\"/></Observation></contained></Patient></resource></entry>"), "{xml}");
}

#[test]
fn keeps_the_document_well_formed_whatever_the_narrative_holds() {
    for div in ["<div>no namespace</div>", "<div xmlns=\"http://www.w3.org/1999/xhtml\">a&nbsp;b</div>", "not markup at all & <"] {
        let resource = Json::Object([("resourceType".to_string(), Json::string("Patient")), ("text".to_string(), json(&format!("{{\"status\":\"generated\",\"div\":{}}}", Json::string(div))))].into_iter().collect());
        let xml = write_resource(&resource, &TestModel::new()).expect("a resource");
        let back = clean(&xml);
        assert!(back["text"]["div"].as_str().is_some_and(|d| d.starts_with("<div xmlns=\"http://www.w3.org/1999/xhtml\">")), "{xml}");
    }
}

#[test]
fn writes_unknown_members_last_and_refuses_what_is_not_a_resource() {
    let xml = write(r#"{"resourceType":"Patient","nickname":"Bo","gender":"male"}"#);
    assert!(xml.ends_with("<gender value=\"male\"/><nickname value=\"Bo\"/></Patient>"), "{xml}");
    assert!(write_resource(&json(r#"{"id":"x"}"#), &TestModel::new()).is_none());
    assert!(write_resource(&json("[1]"), &TestModel::new()).is_none());
}

/// Every narrative of a tree replaced by the form the reader gives it (namespace on the `div`, references resolved).
fn normalize_narratives(value: &mut Json) {
    match value {
        Json::Object(object) => {
            if let Some(Json::String(div)) = object.get("div")
                && let Ok(document) = dom::Document::parse(div.as_bytes())
            {
                let normalized = xhtml::serialize(&document.root, &mut Vec::new());
                object.insert("div", Json::string(normalized));
            }
            let keys: Vec<String> = object.iter().map(|(k, _)| k.to_string()).collect();
            for key in keys {
                if let Some(child) = object.get_mut(&key) {
                    normalize_narratives(child);
                }
            }
        }
        Json::Array(items) => items.iter_mut().for_each(normalize_narratives),
        _ => {}
    }
}

#[test]
fn every_official_r4_example_survives_json_to_xml_and_back() {
    let Some(corpus) = crate::need::corpus("xml::tests::every_official_r4_example_survives_json_to_xml_and_back") else { return };
    let definitions = Definitions::base();
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(corpus.join("hl7-examples/resources"))
        .expect("the corpus' official examples")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() > 500, "{} examples", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let mut original = json::parse(&std::fs::read(path).expect("readable")).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let xml = write_resource(&original, &*definitions).unwrap_or_else(|| panic!("{}: not written", path.display()));
        match parse_resource(xml.as_bytes(), &*definitions) {
            Ok((back, issues)) => {
                normalize_narratives(&mut original);
                if !issues.is_empty() || !same_tree(&original, &back) {
                    failures.push(format!("{}: {:?}", path.display(), issues.first()));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{} of {} examples differ:\n{}", failures.len(), files.len(), failures.join("\n"));
}
