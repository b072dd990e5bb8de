//! Unit tests for record schema checking.

use super::*;

fn schema() -> RecordSchema {
    let document = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["record_type", "id", "items"],
        "properties": {
            "record_type": {"const": "screening"},
            "id": {"type": "string"},
            "administered_on": {"type": "string", "format": "date"},
            "items": {"type": "array", "items": {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 3}}}}
        }
    });
    RecordSchema::compile("screening", document, PathBuf::from("screening.schema.json")).expect("schema compiles")
}

#[test]
fn a_conforming_record_has_no_issues() {
    let record = crate::json::parse(br#"{"record_type": "screening", "id": "s1", "administered_on": "2026-01-05", "items": [{"answer": 2}]}"#).unwrap();
    assert_eq!(schema().check(&record), vec![]);
}

#[test]
fn issues_name_the_path_of_the_bad_value() {
    let record = crate::json::parse(br#"{"record_type": "screening", "id": "s1", "administered_on": "2026-13-45", "items": [{"answer": 2}, {"answer": 7}]}"#).unwrap();
    let paths: Vec<String> = schema().check(&record).into_iter().map(|i| i.path).collect();
    assert_eq!(paths, vec!["administered_on".to_string(), "items[1].answer".to_string()]);
}

#[test]
fn pointers_become_dotted_paths() {
    assert_eq!(pointer_to_path(""), "");
    assert_eq!(pointer_to_path("/contacts/0/name/given/1"), "contacts[0].name.given[1]");
}

#[test]
fn a_time_is_a_local_time_of_day() {
    for good in ["07:00:00", "23:59:59", "16:30:00.5"] {
        assert!(is_local_time(good), "{good}");
    }
    for bad in ["7:00:00", "24:00:00", "07:60:00", "07:00", "07:00:00Z", "07:00:00+01:00", "07:00:00.", "ab:cd:ef"] {
        assert!(!is_local_time(bad), "{bad}");
    }
}
