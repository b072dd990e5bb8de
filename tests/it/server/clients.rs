//! What mainstream FHIR clients (fhirpy, fhirclient, fhir-kit-client, Medplum) send, over a real socket: conditional create by query string, search by POST, conditional read, malformed JSON, reserved words in the id position, instance `$validate`.

use serde_json::{Value, json};

use super::support::{Gateway, assert_outcome, patient, phq9};

const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.3.9999.1";

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The text of an outcome's issues, for checking what it names.
fn outcome_text(body: &Value) -> String {
    assert_outcome(body);
    body["issue"].as_array().unwrap().iter().map(|i| format!("{} {}", i["diagnostics"], i["details"])).collect::<Vec<_>>().join("; ")
}

fn entry_urls(bundle: &Value) -> Vec<String> {
    bundle["entry"].as_array().map(|e| e.iter().map(|e| e["fullUrl"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == relation).map(|l| l["url"].as_str().unwrap().to_string())
}

/// fhirpy's `get_or_create`: `POST /Patient?identifier=…` is a conditional create, like `If-None-Exist`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_with_a_query_string_is_a_conditional_create() {
    let gw = Gateway::start().await;
    let clinic = gw.token("clinic").await;
    let path = format!("Patient?identifier={MRN_SYSTEM}|MRN-GOC");
    let (status, first) = gw.post(&clinic, &path, &patient("MRN-GOC")).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = gw.post(&clinic, &path, &patient("MRN-GOC")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], first["id"], "the existing resource comes back");
    assert_eq!(again["meta"]["versionId"], "1", "and is not written again");
    let (_, found) = gw.get(&clinic, &path).await;
    assert_eq!(found["total"], 1, "nothing was created the second time: {found}");
    // `_format` is not a criterion: such a create is a plain one.
    let (status, _) = gw.post(&clinic, "Patient?_format=json", &patient("MRN-GOC")).await;
    assert_eq!(status, 201);
    let (status, body) = gw.post(&clinic, &path, &patient("MRN-GOC")).await;
    assert_eq!(status, 412, "two match now: {body}");
    assert_outcome(&body);
    let (_, found) = gw.get(&clinic, &path).await;
    assert_eq!(found["total"], 2);

    let (status, body) = gw.post(&clinic, "Patient?no-such-param=1", &patient("MRN-X")).await;
    assert_eq!(status, 400, "{body}");
    assert!(outcome_text(&body).contains("no-such-param"), "{body}");
    let (status, body) = gw.post(&clinic, "Patient?_count=1", &patient("MRN-X")).await;
    assert_eq!(status, 400, "criteria that filter nothing would match any Patient: {body}");
    assert!(outcome_text(&body).contains("filter nothing"), "{body}");
    let both = gw
        .http
        .post(gw.url(&format!("Patient?identifier={MRN_SYSTEM}|MRN-BOTH")))
        .bearer_auth(&clinic)
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", format!("identifier={MRN_SYSTEM}|MRN-BOTH"))
        .body(patient("MRN-BOTH").to_string())
        .send()
        .await
        .unwrap();
    let (status, body) = answer(both).await;
    assert_eq!(status, 400, "{body}");
    assert!(outcome_text(&body).contains("If-None-Exist"), "{body}");
    let (_, found) = gw.get(&clinic, &format!("Patient?identifier={MRN_SYSTEM}|MRN-X,{MRN_SYSTEM}|MRN-BOTH")).await;
    assert_eq!(found["total"], 0, "refused creates store nothing");

    // Partner isolation holds: a Patient another partner planted with the identifier is not the match.
    let unit_b = gw.token("unit-b").await;
    let planted_path = format!("Patient?identifier={MRN_SYSTEM}|MRN-PLANT");
    let (status, planted) = gw.post(&unit_b, &planted_path, &patient("MRN-PLANT")).await;
    assert_eq!(status, 201, "{planted}");
    let (status, own) = gw.post(&clinic, &planted_path, &patient("MRN-PLANT")).await;
    assert_eq!(status, 201, "the clinic gets a resource of its own: {own}");
    assert_ne!(own["id"], planted["id"]);
    let (status, again) = gw.post(&unit_b, &planted_path, &patient("MRN-PLANT")).await;
    assert_eq!((status, &again["id"]), (200, &planted["id"]), "unit-b matches only its own");
    gw.stop().await;
}

/// `POST /[type]/_search` with a form body, and `GET /[type]/_search`, answer as `GET /[type]?…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_by_post_and_by_get_on_search_answer_as_a_search() {
    let gw = Gateway::start().await;
    let clinic = gw.token("clinic").await;
    let (_, p) = gw.post(&clinic, "Patient", &patient("MRN-PS")).await;
    let pref = format!("Patient/{}", p["id"].as_str().unwrap());
    for (day, score) in [(2, 14), (9, 11), (16, 7)] {
        let (status, _) = gw.post(&clinic, "Observation", &phq9(&pref, score, &format!("2026-03-{day:02}T09:30:00Z"))).await;
        assert_eq!(status, 201);
    }
    let (_, other) = gw.post(&clinic, "Patient", &patient("MRN-PS2")).await;
    let (status, _) = gw.post(&clinic, "Observation", &phq9(&format!("Patient/{}", other["id"].as_str().unwrap()), 3, "2026-03-03T09:30:00Z")).await;
    assert_eq!(status, 201);

    let (status, by_get) = gw.get(&clinic, &format!("Observation?patient={pref}&_sort=date&_count=2")).await;
    assert_eq!(status, 200);
    assert_eq!(by_get["total"], 3);
    // Parameters from the body and from the URL are combined.
    let response = gw.http.post(gw.url("Observation/_search?_sort=date")).bearer_auth(&clinic).form(&[("patient", pref.as_str()), ("_count", "2")]).send().await.unwrap();
    let (status, by_post) = answer(response).await;
    assert_eq!(status, 200, "{by_post}");
    assert_eq!(by_post["type"], "searchset");
    assert_eq!(by_post["total"], by_get["total"]);
    assert_eq!(entry_urls(&by_post), entry_urls(&by_get));
    assert_eq!(entry_urls(&by_post).len(), 2);
    let (status, on_search) = gw.get(&clinic, &format!("Observation/_search?patient={pref}&_sort=date&_count=2")).await;
    assert_eq!(status, 200, "{on_search}");
    assert_eq!(entry_urls(&on_search), entry_urls(&by_get));

    // The paging links of a POST search are GET links that work.
    let next = link(&by_post, "next").expect("a next link");
    assert!(next.starts_with(&format!("{}/Observation?", gw.base)), "{next}");
    let (status, page2) = gw.get(&clinic, next.trim_start_matches(&gw.base)).await;
    assert_eq!(status, 200, "{page2}");
    assert_eq!(page2["total"], 3);
    assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
    assert_eq!(page2["entry"][0]["resource"]["valueInteger"], 7);
    let own_self = link(&by_post, "self").unwrap();
    let (_, again) = gw.get(&clinic, own_self.trim_start_matches(&gw.base)).await;
    assert_eq!(entry_urls(&again), entry_urls(&by_get), "{own_self}");

    // A search by POST is refused as the same search by GET would be, and a body that is no form is refused.
    let response = gw.http.post(gw.url("Observation/_search")).bearer_auth(&clinic).form(&[("no-such-param", "1")]).send().await.unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 400, "{body}");
    assert!(outcome_text(&body).contains("no-such-param"), "{body}");
    let (status, body) = gw.post(&clinic, "Observation/_search", &json!({"patient": pref})).await;
    assert_eq!(status, 415, "{body}");
    assert_outcome(&body);
    let response = gw.http.post(gw.url("Frobnicator/_search")).bearer_auth(&clinic).form(&[("_id", "1")]).send().await.unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 404, "{body}");
    assert_outcome(&body);
    gw.stop().await;
}

/// Malformed JSON is 400 (422 is for JSON that is not valid FHIR); `If-None-Match` and `If-Modified-Since` give 304;
/// the `self` link shows the page size used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_conditional_read_and_the_count_used() {
    let gw = Gateway::start_with("default_page_size = 2\nmax_page_size = 3\n").await;
    let clinic = gw.token("clinic").await;
    let response = gw.http.post(gw.url("Patient")).bearer_auth(&clinic).header("content-type", "application/fhir+json").body("{\"resourceType\": \"Patient\",\n \"gender\": }").send().await.unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 400, "{body}");
    assert!(outcome_text(&body).contains("not valid JSON"), "{body}");
    let mut invalid = patient("MRN-422");
    invalid["gender"] = json!("nonsense");
    assert_eq!(gw.post(&clinic, "Patient", &invalid).await.0, 422, "well-formed JSON that is not valid FHIR stays 422");

    let response = gw.send(reqwest::Method::POST, &clinic, "Patient", &patient("MRN-304")).await;
    assert_eq!(response.status(), 201);
    let last_modified = response.headers()["last-modified"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    let path = format!("Patient/{}", created["id"].as_str().unwrap());
    let conditional_get = |name: &'static str, value: String| {
        let request = gw.http.get(gw.url(&path)).bearer_auth(&clinic).header(name, value);
        async move { request.send().await.unwrap() }
    };
    let not_modified = conditional_get("if-none-match", "W/\"1\"".into()).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], "W/\"1\"");
    assert!(not_modified.bytes().await.unwrap().is_empty(), "a 304 has no body");
    assert_eq!(conditional_get("if-none-match", "W/\"2\"".into()).await.status(), 200);
    assert_eq!(conditional_get("if-modified-since", last_modified.clone()).await.status(), 304);
    assert_eq!(conditional_get("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT".into()).await.status(), 200);
    assert_eq!(conditional_get("if-modified-since", "yesterday".into()).await.status(), 200, "an unreadable date is ignored");
    let mut changed = created.clone();
    changed["gender"] = json!("female");
    assert_eq!(gw.put(&clinic, &path, &changed).await.0, 200);
    let modified = conditional_get("if-none-match", "W/\"1\"".into()).await;
    assert_eq!(modified.status(), 200, "version 2 is not the one the client has");
    assert_eq!(modified.json::<Value>().await.unwrap()["meta"]["versionId"], "2");
    assert_eq!(conditional_get("if-none-match", "W/\"2\"".into()).await.status(), 304);

    for n in 0..3 {
        assert_eq!(gw.post(&clinic, "Patient", &patient(&format!("MRN-PAGE-{n}"))).await.0, 201);
    }
    let (status, page) = gw.get(&clinic, "Patient?_count=100").await;
    assert_eq!(status, 200);
    assert_eq!(page["entry"].as_array().unwrap().len(), 3);
    let own_self = link(&page, "self").unwrap();
    assert!(own_self.contains("_count=3") && !own_self.contains("_count=100"), "{own_self}");
    let next = link(&page, "next").unwrap();
    assert!(next.contains("_count=3") && next.contains("_offset=3"), "{next}");
    let (_, page2) = gw.get(&clinic, next.trim_start_matches(&gw.base)).await;
    assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
    let (_, default) = gw.get(&clinic, "Patient").await;
    assert!(link(&default, "self").unwrap().contains("_count=2"), "{default}");
    gw.stop().await;
}

/// Reserved words where an id goes answer what is wrong, never "not known"; `$validate` works on an instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_words_in_the_id_position_and_instance_validate() {
    let gw = Gateway::start().await;
    let clinic = gw.token("clinic").await;
    let get_cases: &[(&str, u16, &str)] = &[("Patient/_foo", 400, "_foo"), ("Patient/$everything", 405, "$everything"), ("Patient/$validate", 405, "POST")];
    for (path, expected, named) in get_cases {
        let (status, body) = gw.get(&clinic, path).await;
        assert_eq!(status, *expected, "GET {path}: {body}");
        let text = outcome_text(&body);
        assert!(text.contains(named) && !text.contains("not known"), "GET {path}: {text}");
    }
    // Type-level history is answered by its own handler where one exists, else it is named as unsupported.
    let (status, body) = gw.get(&clinic, "Patient/_history").await;
    if status != 200 {
        let text = outcome_text(&body);
        assert!(text.contains("_history") && !text.contains("not known"), "{status} {text}");
    }
    for (method, path, expected, named) in [(reqwest::Method::POST, "Patient/_foo", 405, "_foo"), (reqwest::Method::PUT, "Patient/_search", 405, "_search")] {
        let (status, body) = answer(gw.send(method.clone(), &clinic, path, &patient("MRN-R")).await).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert!(outcome_text(&body).contains(named), "{method} {path}: {body}");
    }

    let (_, created) = gw.post(&clinic, "Patient", &patient("MRN-V")).await;
    let id = created["id"].as_str().unwrap();
    let (status, ok) = gw.post(&clinic, &format!("Patient/{id}/$validate"), &created).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["resourceType"], "OperationOutcome");
    assert!(ok["issue"].as_array().unwrap().iter().all(|i| i["severity"] != "error"), "{ok}");
    let mut bad = created.clone();
    bad["gender"] = json!("nonsense");
    let params = json!({"resourceType": "Parameters", "parameter": [{"name": "mode", "valueCode": "update"}, {"name": "resource", "resource": bad}]});
    let (status, invalid) = gw.post(&clinic, &format!("Patient/{id}/$validate"), &params).await;
    assert_eq!(status, 200, "{invalid}");
    assert!(invalid["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error" && i.to_string().contains("Patient.gender")), "{invalid}");
    let mut elsewhere = created.clone();
    elsewhere["id"] = json!("some-other-id");
    let (status, body) = gw.post(&clinic, &format!("Patient/{id}/$validate"), &elsewhere).await;
    assert_eq!(status, 400, "{body}");
    assert!(outcome_text(&body).contains("some-other-id"), "{body}");
    let (status, body) = gw.post(&clinic, &format!("Observation/{id}/$validate"), &created).await;
    assert_eq!(status, 400, "{body}");
    assert_outcome(&body);
    let (status, body) = gw.post(&clinic, &format!("Patient/{id}/$everything"), &created).await;
    assert_eq!(status, 405, "{body}");
    assert!(outcome_text(&body).contains("$everything"), "{body}");
    let (status, body) = gw.get(&clinic, &format!("Patient/{id}/$validate")).await;
    assert_eq!(status, 405, "{body}");
    assert_outcome(&body);
    let (_, history) = gw.get(&clinic, &format!("Patient/{id}/_history")).await;
    assert_eq!(history["total"], 1, "validating stores nothing");

    let metadata: Value = gw.http.get(gw.url("metadata")).send().await.unwrap().json().await.unwrap();
    let patient_capability = metadata["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap().clone();
    let validate = patient_capability["operation"].as_array().unwrap().iter().find(|o| o["name"] == "validate").unwrap().clone();
    assert!(validate["documentation"].as_str().is_some_and(|d| d.contains("[id]/$validate")), "{validate}");
    assert_eq!(patient_capability["conditionalRead"], "full-support");
    gw.stop().await;
}
