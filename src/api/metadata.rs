//! `GET /metadata` and `GET /.well-known/smart-configuration`: what the server implements, built from the same registries the handlers use so it cannot claim more than they do.

use std::collections::{BTreeMap, HashSet};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::base::RequestBase;
use super::fhir::{self, object};
use super::state::AppState;
use crate::definitions::Definitions;
use crate::json::Json;
use crate::search::{self, INCLUDES};

const PROFILE_BASE: &str = "http://iop-gateway.org/fhir";
const BULK_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
const BULK_PATIENT_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
const BULK_GROUP_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The CapabilityStatement as JSON text.
pub fn capability_statement(base: &str, resource_types: &HashSet<String>, definitions: &Definitions) -> String {
    let mut profiles: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in definitions.resources_of_type("StructureDefinition") {
        let Some(url) = &entry.url else { continue };
        if !url.starts_with(PROFILE_BASE) {
            continue;
        }
        let Some(sd) = entry.resource() else { continue };
        if sd.get("kind").and_then(Json::as_str) == Some("resource")
            && sd.get("derivation").and_then(Json::as_str) == Some("constraint")
            && let Some(t) = sd.get("type").and_then(Json::as_str)
        {
            profiles.entry(t.to_string()).or_default().push(url.clone());
        }
    }
    let mut types: Vec<&String> = resource_types.iter().collect();
    types.sort();
    let code = |c: &str| object([("code", Json::string(c))]);
    let param = |name: &str, kind: &str, definition: &str| object([("name", Json::string(name)), ("definition", Json::string(definition)), ("type", Json::string(kind))]);
    let validate_op = object([
        ("name", Json::string("validate")),
        ("definition", Json::string("http://hl7.org/fhir/OperationDefinition/Resource-validate")),
        (
            "documentation",
            Json::string("POST [base]/[type]/$validate and POST [base]/[type]/[id]/$validate (the resource's id, if any, must be the instance's); the body is the resource or a Parameters with `resource` and `profile`; nothing is stored."),
        ),
    ]);
    let search_documentation = "GET [base]/[type]?…, GET [base]/[type]/_search?…, or POST [base]/[type]/_search with an application/x-www-form-urlencoded body (combined with the URL's parameters); paging links are GET links. Also _count, _offset, _sort (several keys: _lastUpdated, _id and the type's search parameters, - for descending), _include, _revinclude, _summary (true, text, data, count, false), _elements, _total (none, estimate, accurate). Unknown parameters are refused (400) unless Prefer: handling=lenient, which leaves them out and names them in an OperationOutcome entry (search.mode outcome). Patient compartment: GET [base]/Patient/[id]/[type]?….";
    let mut resources = Vec::new();
    for t in types {
        if t == "Subscription" {
            // Partners' topic-based Subscriptions have their own endpoint (issue 12).
            resources.push(super::subscriptions::capability());
            continue;
        }
        let audit = t == "AuditEvent";
        let mut members = vec![("type", Json::string(t.as_str())), ("profile", Json::string(format!("http://hl7.org/fhir/StructureDefinition/{t}")))];
        if let Some(list) = profiles.get(t.as_str()) {
            members.push(("supportedProfile", Json::Array(list.iter().map(|p| Json::string(p.as_str())).collect())));
        }
        let interactions: &[&str] = if audit { &["read", "search-type"] } else { &["read", "vread", "update", "history-instance", "history-type", "create", "search-type"] };
        let interactions = interactions
            .iter()
            .map(|c| match *c {
                "search-type" if !audit => object([("code", Json::string(*c)), ("documentation", Json::string(search_documentation))]),
                "read" if !audit => object([("code", Json::string(*c)), ("documentation", Json::string("_summary (true, text, data, false) and _elements subset the resource (tagged SUBSETTED)."))]),
                "history-instance" | "history-type" => object([("code", Json::string(*c)), ("documentation", Json::string("_since, _count, _offset; newest first."))]),
                "create" => object([("code", Json::string(*c)), ("documentation", Json::string("Conditional by If-None-Exist, or by search parameters in the URL (POST [base]/[type]?identifier=…); not both."))]),
                _ => code(c),
            })
            .collect();
        members.push(("interaction", Json::Array(interactions)));
        if !audit {
            members.push(("versioning", Json::string("versioned-update")));
            members.push(("readHistory", Json::Bool(true)));
            members.push(("updateCreate", Json::Bool(true)));
            members.push(("conditionalCreate", Json::Bool(true)));
            members.push(("conditionalRead", Json::string("full-support")));
            members.push(("conditionalUpdate", Json::Bool(true)));
        }
        let includes: Vec<Json> = INCLUDES.iter().filter(|(s, _, _)| s == t).map(|(s, p, target)| Json::string(format!("{s}:{p}:{target}"))).collect();
        if !includes.is_empty() {
            members.push(("searchInclude", Json::Array(includes)));
        }
        let revincludes: Vec<Json> = search::SEARCHABLE_TYPES
            .iter()
            .flat_map(|source| search::params(source).iter().map(move |p| (source, p)))
            .filter(|(_, p)| !audit && p.kind == search::Kind::Reference && p.target.is_none_or(|target| target == t.as_str()))
            .map(|(source, p)| Json::string(format!("{source}:{}", p.name)))
            .collect();
        if !revincludes.is_empty() {
            members.push(("searchRevInclude", Json::Array(revincludes)));
        }
        let mut params = vec![param("_id", "token", "http://hl7.org/fhir/SearchParameter/Resource-id")];
        if audit {
            params.extend(super::audit_search::PARAMS.iter().map(|(n, k, d)| param(n, k, d)));
        } else {
            params.push(param("_lastUpdated", "date", "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"));
            params.extend(search::params(t).iter().map(|p| param(p.name, p.kind.as_str(), p.definition)));
        }
        if audit {
            // `_id` is not a filter the audit search implements.
            params.remove(0);
        }
        members.push(("searchParam", Json::Array(params)));
        let mut operations = vec![validate_op.clone()];
        let operation = |name: &str, definition: &str, documentation: &str| {
            object([("name", Json::string(name)), ("definition", Json::string(definition)), ("documentation", Json::string(documentation))])
        };
        if t == "Patient" {
            operations.push(operation("export", BULK_PATIENT_EXPORT, "GET or POST [base]/Patient/$export with Prefer: respond-async: every patient's compartment the client may read, as NDJSON files (Bulk Data STU 3)."));
            operations.push(operation("everything", "http://hl7.org/fhir/OperationDefinition/Patient-everything", "GET [base]/Patient/[id]/$everything: the patient and its compartment the client may read, as a searchset (_since, _type, _count, paging links)."));
        }
        if t == "Group" {
            operations.push(operation("export", BULK_GROUP_EXPORT, "GET or POST [base]/Group/[id]/$export with Prefer: respond-async: the compartments of the Group's member patients; Group/iop-all-clients and Group/iop-active-enrollments are the program's clients (every enrollment, active enrollments), computed at kick-off."));
        }
        members.push(("operation", Json::Array(operations)));
        resources.push(object(members));
    }
    // SMART 2 keeps the oauth-uris extension for older clients (Python fhirclient, fhir-kit-client
    // read the token endpoint there). It requires `authorize`: that endpoint refuses every request.
    let uri = |name: &str, path: &str| object([("url", Json::string(name)), ("valueUri", Json::string(format!("{base}{path}")))]);
    let oauth_uris = object([
        ("url", Json::string("http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris")),
        ("extension", Json::Array(vec![uri("authorize", crate::auth::AUTHORIZE_PATH), uri("token", crate::auth::TOKEN_PATH)])),
    ]);
    let security = object([
        ("extension", Json::Array(vec![oauth_uris])),
        (
            "service",
            Json::Array(vec![object([(
                "coding",
                Json::Array(vec![object([
                    ("system", Json::string("http://terminology.hl7.org/CodeSystem/restful-security-service")),
                    ("code", Json::string("SMART-on-FHIR")),
                ])]),
            )])]),
        ),
        (
            "description",
            Json::string(format!(
                "SMART Backend Services: client_credentials at {base}{} with a private_key_jwt client assertion (RS384 or ES384); system/ scopes (v1 and v2); discovery at {base}/.well-known/smart-configuration.",
                crate::auth::TOKEN_PATH
            )),
        ),
    ]);
    let rest = object([
        ("mode", Json::string("server")),
        ("security", security),
        ("resource", Json::Array(resources)),
        (
            "interaction",
            Json::Array(vec![
                code("transaction"),
                object([("code", Json::string("batch")), ("documentation", Json::string("Every entry an interaction of its own, answered as it would be alone (search, history, read, vread, create, update, conditional forms, $validate); one entry's failure is its own response."))]),
                object([("code", Json::string("search-system")), ("documentation", Json::string("GET [base]?_type=A,B&… with the parameters common to all types: _id, _lastUpdated, _sort by those, _count, _offset, _summary, _elements, _total."))]),
                object([("code", Json::string("history-system")), ("documentation", Json::string("GET [base]/_history: _since, _count, _offset; newest first."))]),
            ]),
        ),
        ("searchParam", Json::Array(vec![param("_id", "token", "http://hl7.org/fhir/SearchParameter/Resource-id"), param("_lastUpdated", "date", "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated")])),
        ("compartment", Json::Array(vec![Json::string("http://hl7.org/fhir/CompartmentDefinition/patient")])),
        (
            "operation",
            Json::Array(vec![
                object([
                    ("name", Json::string("process-message")),
                    ("definition", Json::string("http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message")),
                ]),
                object([
                    ("name", Json::string("export")),
                    ("definition", Json::string(BULK_EXPORT)),
                    (
                        "documentation",
                        Json::string("GET or POST [base]/$export with Prefer: respond-async (Bulk Data STU 3): NDJSON files of what the client may read; status at the Content-Location, files need the same token."),
                    ),
                ]),
            ]),
        ),
    ]);
    object([
        ("resourceType", Json::string("CapabilityStatement")),
        ("status", Json::string("active")),
        ("date", Json::string(fhir::now_instant()[..10].to_string())),
        ("publisher", Json::string("iop-gateway")),
        ("kind", Json::string("instance")),
        ("software", object([("name", Json::string("iop-gateway")), ("version", Json::string(env!("CARGO_PKG_VERSION")))])),
        ("implementation", object([("description", Json::string("iop-gateway FHIR R4 server")), ("url", Json::string(base))])),
        ("fhirVersion", Json::string("4.0.1")),
        // Exactly what `fhir::negotiate` produces and `fhir::read_body` reads.
        ("format", Json::Array(["application/fhir+json", "json", "application/fhir+xml", "xml"].iter().map(|f| Json::string(*f)).collect())),
        ("rest", Json::Array(vec![rest])),
    ])
    .to_string_compact()
}

/// `GET /metadata` (no token needed), with the links of the request's base.
pub async fn metadata(State(state): State<AppState>, base: RequestBase) -> Response {
    fhir::json_response(StatusCode::OK, capability_statement(&base.url, &state.resource_types, state.validator.definitions()))
}

/// `GET /.well-known/smart-configuration` (no token needed).
pub async fn smart_configuration(base: RequestBase) -> Response {
    let body = object([
        ("issuer", Json::string(base.url.as_str())),
        ("token_endpoint", Json::string(base.token_url())),
        ("token_endpoint_auth_methods_supported", Json::Array(vec![Json::string("private_key_jwt")])),
        ("token_endpoint_auth_signing_alg_values_supported", Json::Array(vec![Json::string("RS384"), Json::string("ES384")])),
        ("grant_types_supported", Json::Array(vec![Json::string("client_credentials")])),
        // Required by SMART 2; PKCE belongs to the authorization code flow, which backend services do not use.
        ("code_challenge_methods_supported", Json::Array(Vec::new())),
        ("scopes_supported", Json::Array(vec![Json::string("system/*.cruds"), Json::string("system/*.read"), Json::string("system/*.write")])),
        ("capabilities", Json::Array(["client-confidential-asymmetric", "permission-v1", "permission-v2"].iter().map(|c| Json::string(*c)).collect())),
    ]);
    let mut response = (StatusCode::OK, body.to_string_compact()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_statement_is_valid_r4_and_lists_search_params() {
        let validator = super::super::state::default_validator();
        let types: HashSet<String> = ["Patient", "Observation", "Task", "AuditEvent"].iter().map(|s| s.to_string()).collect();
        let text = capability_statement("http://127.0.0.1:8080", &types, validator.definitions());
        let report = validator.validate_bytes(text.as_bytes(), &[]);
        assert!(report.is_valid(), "{:?}", report.issues);
        let parsed = crate::json::parse(text.as_bytes()).unwrap();
        let resources = parsed["rest"].as_array().unwrap()[0]["resource"].as_array().unwrap().to_vec();
        let observation = resources.iter().find(|r| r["type"].as_str() == Some("Observation")).unwrap();
        let names: Vec<&str> = observation["searchParam"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["_id", "_lastUpdated", "identifier", "patient", "subject", "status", "code", "date"]);
        let patient = resources.iter().find(|r| r["type"].as_str() == Some("Patient")).unwrap();
        let revincludes: Vec<&str> = patient["searchRevInclude"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert!(revincludes.contains(&"Provenance:target") && revincludes.contains(&"Observation:patient"), "{revincludes:?}");
        let task = resources.iter().find(|r| r["type"].as_str() == Some("Task")).unwrap();
        let task_revincludes: Vec<&str> = task["searchRevInclude"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
        assert!(task_revincludes.contains(&"Task:focus") && !task_revincludes.contains(&"Observation:patient"), "a parameter that points only at Patients: {task_revincludes:?}");
        let interactions: Vec<&str> = parsed["rest"].as_array().unwrap()[0]["interaction"].as_array().unwrap().iter().filter_map(|i| i["code"].as_str()).collect();
        assert_eq!(interactions, ["transaction", "batch", "search-system", "history-system"]);
    }
}
