//! The FHIR REST API over a real socket: CRUD, versions, ETags, validation on write, search, conditional operations, transactions, batches, `$validate`, `$process-message` and the CapabilityStatement.

use serde_json::{Value, json};

use super::support::{Gateway, assert_outcome, patient, phq9, referral};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_read_update_vread_history_with_etags() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let response = gw.send(reqwest::Method::POST, &token, "Patient", &patient("MRN-1")).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(response.headers()["etag"], "W/\"1\"");
    assert!(location.starts_with(&format!("{}/Patient/", gw.base)) && location.ends_with("/_history/1"), "{location}");
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");

    let (status, read) = gw.get(&token, &format!("Patient/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(read, created);

    let mut changed = read.clone();
    changed["gender"] = json!("female");
    let stale = gw.http.put(gw.url(&format!("Patient/{id}"))).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-match", "W/\"7\"").body(changed.to_string()).send().await.unwrap();
    assert_eq!(stale.status(), 412);
    assert_outcome(&stale.json().await.unwrap());
    let ok = gw.http.put(gw.url(&format!("Patient/{id}"))).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-match", "W/\"1\"").body(changed.to_string()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["etag"], "W/\"2\"");

    let (status, v1) = gw.get(&token, &format!("Patient/{id}/_history/1")).await;
    assert_eq!(status, 200);
    assert_eq!(v1["gender"], "other");
    let (status, history) = gw.get(&token, &format!("Patient/{id}/_history")).await;
    assert_eq!(status, 200);
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 2);
    assert_eq!(history["entry"][0]["resource"]["meta"]["versionId"], "2");
    assert_eq!(history["entry"][1]["response"]["status"], "201 Created");
    let (status, missing) = gw.get(&token, &format!("Patient/{id}/_history/9")).await;
    assert_eq!(status, 404);
    assert_outcome(&missing);

    // Update-as-create with a client id, and Prefer: return=minimal / OperationOutcome.
    let mut own = patient("MRN-2");
    own["id"] = json!("client-chosen-1");
    let minimal = gw.http.put(gw.url("Patient/client-chosen-1")).bearer_auth(&token).header("content-type", "application/fhir+json").header("prefer", "return=minimal").body(own.to_string()).send().await.unwrap();
    assert_eq!(minimal.status(), 201);
    assert!(minimal.bytes().await.unwrap().is_empty());
    let oo = gw.http.post(gw.url("Patient")).bearer_auth(&token).header("content-type", "application/fhir+json").header("prefer", "return=OperationOutcome").body(patient("MRN-3").to_string()).send().await.unwrap();
    assert_eq!(oo.status(), 201);
    assert_outcome(&oo.json().await.unwrap());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_get_422_and_nothing_is_stored() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let mut bad = phq9("Patient/x", 3, "2026-03-02T09:30:00Z");
    bad["status"] = json!("done");
    let (status, body) = gw.post(&token, "Observation", &bad).await;
    assert_eq!(status, 422);
    assert_outcome(&body);
    assert!(body.to_string().contains("Observation.status"), "{body}");
    let (_, found) = gw.get(&token, "Observation").await;
    assert_eq!(found["total"], 0);

    // A transaction with one invalid entry stores none of its entries.
    let mut bundle = referral("MRN-T");
    bundle["entry"][1]["resource"]["status"] = json!("sent");
    let (status, body) = gw.post(&token, "", &bundle).await;
    assert_eq!(status, 422, "{body}");
    for t in ["Patient", "ServiceRequest", "Task"] {
        let (_, found) = gw.get(&token, t).await;
        assert_eq!(found["total"], 0, "{t}");
    }
    assert!(gw.running.as_ref().unwrap().metrics.render().contains("iop_validation_failures_total 2"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_pages_sorts_and_includes() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let (_, p) = gw.post(&token, "Patient", &patient("MRN-S")).await;
    let pref = format!("Patient/{}", p["id"].as_str().unwrap());
    for (day, score) in [(2, 14), (9, 11), (16, 7), (23, 5)] {
        let (status, _) = gw.post(&token, "Observation", &phq9(&pref, score, &format!("2026-03-{day:02}T09:30:00-05:00"))).await;
        assert_eq!(status, 201);
    }
    let (_, all) = gw.get(&token, &format!("Observation?patient={pref}&code=http://loinc.org|44261-6")).await;
    assert_eq!(all["total"], 4);
    let (_, later) = gw.get(&token, "Observation?date=ge2026-03-10&_sort=-date").await;
    assert_eq!(later["total"], 2);
    assert_eq!(later["entry"][0]["resource"]["valueInteger"], 5);
    let (_, page) = gw.get(&token, "Observation?_count=3&_sort=date").await;
    assert_eq!(page["entry"].as_array().unwrap().len(), 3);
    assert_eq!(page["entry"][0]["resource"]["valueInteger"], 14);
    let next = page["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"].as_str().unwrap().to_string();
    let (_, page2) = gw.get(&token, next.trim_start_matches(&gw.base)).await;
    assert_eq!(page2["entry"].as_array().unwrap().len(), 1);
    let (_, by_id) = gw.get(&token, &format!("Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-S&_id={}", p["id"].as_str().unwrap())).await;
    assert_eq!(by_id["total"], 1);
    let (_, none) = gw.get(&token, "Patient?identifier=urn:other|MRN-S").await;
    assert_eq!(none["total"], 0);
    let (_, updated) = gw.get(&token, "Observation?_lastUpdated=gt2000-01-01").await;
    assert_eq!(updated["total"], 4);
    let (_, with_patient) = gw.get(&token, "Observation?_count=1&_include=Observation:patient").await;
    let modes: Vec<&str> = with_patient["entry"].as_array().unwrap().iter().map(|e| e["search"]["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["match", "include"]);

    let (status, _) = gw.post(&token, "", &referral("MRN-R")).await;
    assert_eq!(status, 200);
    let (_, tasks) = gw.get(&token, "Task?status=requested&_include=Task:based-on").await;
    let entries = tasks["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{tasks}");
    assert_eq!(entries[1]["resource"]["resourceType"], "ServiceRequest");
    let (status, body) = gw.get(&token, "Observation?unknown-param=1").await;
    assert_eq!(status, 400);
    assert_outcome(&body);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_create_and_update_by_identifier() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let criteria = "identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-C";
    let first = gw.http.post(gw.url("Patient")).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-none-exist", criteria).body(patient("MRN-C").to_string()).send().await.unwrap();
    assert_eq!(first.status(), 201);
    let second = gw.http.post(gw.url("Patient")).bearer_auth(&token).header("content-type", "application/fhir+json").header("if-none-exist", criteria).body(patient("MRN-C").to_string()).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let (_, found) = gw.get(&token, &format!("Patient?{criteria}")).await;
    assert_eq!(found["total"], 1);
    let id = found["entry"][0]["resource"]["id"].as_str().unwrap().to_string();

    let mut changed = patient("MRN-C");
    changed["gender"] = json!("male");
    let (status, updated) = gw.put(&token, &format!("Patient?{criteria}"), &changed).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["meta"]["versionId"], "2");
    let (status, created) = gw.put(&token, "Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-NEW", &patient("MRN-NEW")).await;
    assert_eq!(status, 201, "{created}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_resolve_references_and_batches_answer_per_entry() {
    let gw = Gateway::start().await;
    let token = gw.token("unit-a").await;
    let (status, response) = gw.post(&token, "", &referral("MRN-TX")).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["type"], "transaction-response");
    let patient_id = response["entry"][0]["resource"]["id"].as_str().unwrap();
    let sr = &response["entry"][1]["resource"];
    assert_eq!(sr["subject"]["reference"], format!("Patient/{patient_id}"));
    let task = &response["entry"][2]["resource"];
    assert_eq!(task["basedOn"][0]["reference"], format!("ServiceRequest/{}", sr["id"].as_str().unwrap()));

    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("MRN-B1"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "nonsense"}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": format!("Patient/{patient_id}")}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}}
    ]});
    let (status, response) = gw.post(&token, "", &batch).await;
    assert_eq!(status, 200, "{response}");
    let statuses: Vec<&str> = response["entry"].as_array().unwrap().iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["201 Created", "422 Unprocessable Entity", "200 OK", "404 Not Found"]);
    assert_eq!(response["entry"][1]["response"]["outcome"]["resourceType"], "OperationOutcome");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_us_core_and_pas_profiles_are_enforced_with_the_compiled_in_packages() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let us_core = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
    // US Core 6.1.0 needs an identifier; plain R4 does not, so only the compiled-in package can refuse this.
    let mut claimed = patient("MRN-U");
    claimed["meta"] = json!({"profile": [us_core]});
    claimed.as_object_mut().unwrap().remove("identifier");
    let (status, body) = gw.post(&token, "Patient", &claimed).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("Patient.identifier") && !body.to_string().contains("is not loaded"), "{body}");
    let mut conformant = patient("MRN-U");
    conformant["meta"] = json!({"profile": [us_core]});
    let (status, body) = gw.post(&token, "Patient", &conformant).await;
    assert_eq!(status, 201, "{body}");
    // $validate against PAS by name: a Claim without items is no PAS Claim.
    let claim = json!({"resourceType": "Claim", "status": "active", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
        "use": "preauthorization", "patient": {"reference": "Patient/p"}, "created": "2026-03-02", "provider": {"reference": "Organization/o"},
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"reference": "Coverage/c"}}]});
    let (status, outcome) = gw.post(&token, "Claim/$validate?profile=http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim", &claim).await;
    assert_eq!(status, 200);
    assert!(outcome["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error" && i.to_string().contains("Claim.item")), "{outcome}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_operation_answers_with_an_outcome_and_stores_nothing() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let (status, ok) = gw.post(&token, "Observation/$validate", &phq9("Patient/p", 4, "2026-03-02")).await;
    assert_eq!(status, 200);
    assert!(ok["issue"].as_array().unwrap().iter().all(|i| i["severity"] != "error"), "{ok}");
    let mut bad = phq9("Patient/p", 4, "2026-03-02");
    bad["valueString"] = json!("x");
    let params = json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad}]});
    let (status, invalid) = gw.post(&token, "Observation/$validate", &params).await;
    assert_eq!(status, 200);
    assert!(invalid["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error"), "{invalid}");
    let (_, unknown_profile) = gw.post(&token, "Observation/$validate?profile=http://example.org/StructureDefinition/nope", &phq9("Patient/p", 4, "2026-03-02")).await;
    assert!(unknown_profile["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error"), "{unknown_profile}");
    let (_, found) = gw.get(&token, "Observation").await;
    assert_eq!(found["total"], 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_processed_once_per_bundle_and_header_id() {
    let gw = Gateway::start().await;
    let token = gw.token("unit-a").await;
    let message = json!({"resourceType": "Bundle", "id": "msg-0001", "type": "message", "timestamp": "2026-03-01T10:00:00Z", "entry": [
        {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-000000000001", "resource": {"resourceType": "MessageHeader", "id": "hdr-0001",
            "eventCoding": {"system": "http://hl7.org/fhir/us/bser/CodeSystem/bser-event", "code": "bser-referral-request"},
            "source": {"endpoint": "https://unit-a.example/fhir"},
            "destination": [{"endpoint": "https://gateway.example/fhir", "receiver": {"display": "IOP program"}}],
            "focus": [{"reference": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-000000000002"}]}},
        {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-000000000002", "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "code": {"text": "IOP referral"}, "subject": {"reference": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-000000000003"}}},
        {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-000000000003", "resource": patient("MRN-MSG")}
    ]});
    let (status, first) = gw.post(&token, "$process-message", &message).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["type"], "message");
    assert_eq!(first["entry"][0]["resource"]["response"]["identifier"], "hdr-0001");
    assert_eq!(first["entry"][0]["resource"]["response"]["code"], "ok");
    let (status, again) = gw.post(&token, "$process-message", &message).await;
    assert_eq!(status, 200);
    assert_eq!(again, first, "a resend gets the recorded response");
    let mut same_header = message.clone();
    same_header["id"] = json!("msg-0002");
    let (_, third) = gw.post(&token, "$process-message", &same_header).await;
    assert_eq!(third, first, "the same MessageHeader.id is the same message");
    let (_, requests) = gw.get(&token, "ServiceRequest").await;
    assert_eq!(requests["total"], 1);
    let sr = &requests["entry"][0]["resource"];
    assert!(sr["subject"]["reference"].as_str().unwrap().starts_with("Patient/"), "{sr}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_discovery_need_no_token_and_tell_the_truth() {
    let gw = Gateway::start().await;
    let metadata: Value = gw.http.get(gw.url("metadata")).send().await.unwrap().json().await.unwrap();
    assert_eq!(metadata["resourceType"], "CapabilityStatement");
    let rest = &metadata["rest"][0];
    let task = rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Task").unwrap();
    assert!(task["searchInclude"].as_array().unwrap().contains(&json!("Task:based-on:ServiceRequest")));
    let audit = rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == "AuditEvent").unwrap();
    assert_eq!(audit["interaction"], json!([{"code": "read"}, {"code": "search-type"}]));
    assert_eq!(rest["security"]["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert!(rest["security"]["description"].as_str().unwrap().contains(&gw.token_url()));
    let smart: Value = gw.http.get(gw.url(".well-known/smart-configuration")).send().await.unwrap().json().await.unwrap();
    assert_eq!(smart["token_endpoint"], gw.token_url());
    assert_eq!(smart["token_endpoint_auth_signing_alg_values_supported"], json!(["RS384", "ES384"]));
    for path in ["healthz", "readyz"] {
        assert_eq!(gw.http.get(gw.url(path)).send().await.unwrap().status(), 200);
    }
    let token = gw.token("clinic").await;
    let _ = gw.get(&token, "Patient").await;
    let metrics = gw.http.get(gw.url("metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("iop_http_request_duration_seconds_count{route=\"/{type}\",method=\"GET\",status=\"200\"} 1"), "{metrics}");
    assert!(metrics.contains("iop_token_grants_total 1"));
    assert!(metrics.contains("iop_store_operation_duration_seconds_count{operation=\"search\"}"));
    gw.stop().await;
}
