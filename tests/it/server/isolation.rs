//! Partner isolation against a hostile partner (issue 10, items 1–6 and 10): ownership of resources and ids, parties per version, existence and version leaks, label spellings, ids in Bundle URLs, and the write matrix.

use serde_json::{Value, json};

use super::support::{Gateway, assert_outcome, patient, phq9};

const MRN_SYSTEM: &str = "urn:oid:2.16.840.1.113883.3.9999.1";

/// The first issue's text of an OperationOutcome.
fn message(body: &Value) -> String {
    body["issue"][0]["details"]["text"].as_str().unwrap_or_default().to_string()
}

async fn put_if_match(gw: &Gateway, token: &str, path: &str, body: &Value, version: u32) -> (u16, Value) {
    let response = gw
        .http
        .put(gw.url(path))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .header("if-match", format!("W/\"{version}\""))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn with_id(mut resource: Value, id: &str) -> Value {
    resource["id"] = json!(id);
    resource
}

fn part2(mut resource: Value) -> Value {
    resource["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]});
    resource
}

fn drug_screen(patient_ref: &str, result: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "19295-5"}], "text": "Opiates urine screen"},
        "subject": {"reference": patient_ref}, "effectiveDateTime": "2026-03-03", "valueString": result})
}

/// Item 1: a partner cannot take an id the clinic (or another partner) will use, and cannot tell a taken id from a free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_cannot_be_squatted_and_a_taken_id_looks_free() {
    let gw = Gateway::start().await;
    let (unit_a, unit_b, clinic) = (gw.token("unit-a").await, gw.token("unit-b").await, gw.token("clinic").await);
    let id = "6f1c2a52-3d1e-5b7a-9a51-0c0ffee00001";
    let path = format!("Patient/{id}");
    let squat = with_id(patient("MRN-SQUAT"), id);
    let (free_status, free_body) = gw.put(&unit_b, &path, &squat).await;
    assert_eq!(free_status, 405, "{free_body}");
    assert_outcome(&free_body);
    let (free_if_match, free_if_match_body) = put_if_match(&gw, &unit_b, &path, &squat, 1).await;
    assert_eq!(gw.put(&unit_a, &path, &squat).await.0, 405, "no partner chooses the program's ids");

    // The clinic's mapping writes its client at the computed id: a create, owned by the program.
    let mut record = with_id(patient("MRN-CLINIC"), id);
    record["telecom"] = json!([{"system": "phone", "value": "555-0100"}]);
    let (status, created) = gw.put(&clinic, &path, &record).await;
    assert_eq!(status, 201, "{created}");
    let (taken_status, taken_body) = gw.put(&unit_b, &path, &squat).await;
    assert_eq!((taken_status, message(&taken_body)), (free_status, message(&free_body)), "a taken id answers as a free one");
    let (taken_if_match, taken_if_match_body) = put_if_match(&gw, &unit_b, &path, &squat, 1).await;
    assert_eq!((taken_if_match, message(&taken_if_match_body)), (free_if_match, message(&free_if_match_body)));
    assert_eq!(gw.get(&unit_b, &path).await.0, 404);
    assert_eq!(gw.get(&clinic, &path).await.1["telecom"][0]["value"], "555-0100");

    // The same for a Part 2 drug screen the clinic writes at its own id.
    let screen_path = "Observation/6f1c2a52-3d1e-5b7a-9a51-0c0ffee00002";
    let screen = with_id(part2(drug_screen(&path, "positive opioids")), "6f1c2a52-3d1e-5b7a-9a51-0c0ffee00002");
    assert_eq!(gw.put(&unit_b, screen_path, &screen).await.0, 405);
    assert_eq!(gw.put(&clinic, screen_path, &screen).await.0, 201);
    let (status, body) = gw.get(&unit_b, screen_path).await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.to_string().contains("opioids"));
    gw.stop().await;
}

/// Item 2: a conditional operation matches only what the caller may write, so a planted identifier catches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_identifier_does_not_capture_the_clinics_write() {
    let gw = Gateway::start().await;
    let (unit_b, clinic) = (gw.token("unit-b").await, gw.token("clinic").await);
    let (status, planted) = gw.post(&unit_b, "Patient", &patient("MRN-0420")).await;
    assert_eq!(status, 201);
    let planted_path = format!("Patient/{}", planted["id"].as_str().unwrap());
    let mut record = patient("MRN-0420");
    record["name"] = json!([{"family": "Realperson", "given": ["Alex"]}]);
    let (status, written) = gw.put(&clinic, &format!("Patient?identifier={MRN_SYSTEM}|MRN-0420"), &record).await;
    assert_eq!(status, 201, "a new resource, not the planted one: {written}");
    assert_ne!(written["id"], planted["id"]);
    let (status, again) = gw.put(&clinic, &format!("Patient?identifier={MRN_SYSTEM}|MRN-0420"), &record).await;
    assert_eq!((status, &again["id"]), (200, &written["id"]), "the clinic's own resource is matched from then on");
    let (_, planted_now) = gw.get(&unit_b, &planted_path).await;
    assert_eq!(planted_now["name"][0]["family"], "Testperson", "the planted resource is untouched");
    assert_eq!(gw.get(&unit_b, &format!("Patient/{}", written["id"].as_str().unwrap())).await.0, 404);
    // Conditional create alike: the planted resource is not "the one that exists".
    let response = gw
        .http
        .post(gw.url("Patient"))
        .bearer_auth(&unit_b)
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", format!("identifier={MRN_SYSTEM}|MRN-0420"))
        .body(patient("MRN-0420").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "unit-b's own planted Patient is its match");
    let (_, search) = gw.get(&unit_b, &format!("Patient?identifier={MRN_SYSTEM}|MRN-0420")).await;
    assert_eq!(search["total"], 1, "unit-b sees only its own: {search}");
    gw.stop().await;
}

/// Item 3: parties come from the current version alone; a Task's owner may move its status and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parties_follow_the_current_version_and_a_task_owner_only_moves_status() {
    let gw = Gateway::start().await;
    let (clinic, payer, unit_b) = (gw.token("clinic").await, gw.token("payer-x").await, gw.token("unit-b").await);
    let task = json!({"resourceType": "Task", "status": "requested", "intent": "order", "description": "Send the discharge summary",
        "owner": {"reference": "Organization/unit-b"}, "authoredOn": "2026-03-02T09:00:00Z"});
    let (status, created) = gw.post(&clinic, "Task", &task).await;
    assert_eq!(status, 201, "{created}");
    let path = format!("Task/{}", created["id"].as_str().unwrap());
    let (status, seen) = gw.get(&unit_b, &path).await;
    assert_eq!(status, 200, "the owner sees the Task addressed to it");

    let mut accepted = seen.clone();
    accepted["status"] = json!("accepted");
    accepted["businessStatus"] = json!({"text": "summary requested from records"});
    let (status, body) = gw.put(&unit_b, &path, &accepted).await;
    assert_eq!(status, 200, "{body}");
    let mut rewritten = body.clone();
    rewritten["description"] = json!("Send everything you have");
    let (status, refused) = gw.put(&unit_b, &path, &rewritten).await;
    assert_eq!(status, 403, "{refused}");
    assert!(message(&refused).contains("'description' differs"), "{refused}");
    let mut handed_on = body.clone();
    handed_on["owner"] = json!({"reference": "Organization/payer-x"});
    assert_eq!(gw.put(&unit_b, &path, &handed_on).await.0, 403, "the performer cannot hand the Task to someone else");

    // The program hands the Task to the payer: unit-b stops being a party, to every version.
    let (_, mut current) = gw.get(&clinic, &path).await;
    current["owner"] = json!({"reference": "Organization/payer-x"});
    let (status, body) = gw.put(&clinic, &path, &current).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.get(&payer, &path).await.0, 200);
    assert_eq!(gw.get(&unit_b, &path).await.0, 404, "unit-b is no longer a party");
    assert_eq!(gw.get(&unit_b, &format!("{path}/_history/1")).await.0, 404, "nor to the versions it once saw");
    assert_eq!(gw.get(&unit_b, &format!("{path}/_history")).await.0, 404);
    let (_, tasks) = gw.get(&unit_b, "Task").await;
    assert_eq!(tasks["total"], 0, "{tasks}");
    gw.stop().await;
}

/// Item 4: read, vread, history and PUT answer alike for a withheld resource and a missing one; search totals count only what is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existence_does_not_leak_on_any_path() {
    let gw = Gateway::start().await;
    let (unit_a, unit_b, clinic) = (gw.token("unit-a").await, gw.token("unit-b").await, gw.token("clinic").await);
    let (_, own) = gw.post(&unit_a, "Patient", &patient("MRN-E1")).await;
    let id = own["id"].as_str().unwrap().to_string();
    let mut changed = own.clone();
    changed["gender"] = json!("female");
    assert_eq!(gw.put(&unit_a, &format!("Patient/{id}"), &changed).await.0, 200);
    let missing = "0b5e0c3e-0000-4000-8000-000000000000";
    let normalise = |body: &Value, id: &str| message(body).replace(id, "ID");
    for suffix in ["", "/_history", "/_history/1", "/_history/2", "/_history/3", "/_history/x"] {
        let (taken, taken_body) = gw.get(&unit_b, &format!("Patient/{id}{suffix}")).await;
        let (free, free_body) = gw.get(&unit_b, &format!("Patient/{missing}{suffix}")).await;
        assert_eq!((taken, normalise(&taken_body, &id)), (free, normalise(&free_body, missing)), "GET Patient/…{suffix}");
        assert_eq!(taken, 404);
    }
    for version in [1, 2, 9] {
        let (taken, taken_body) = put_if_match(&gw, &unit_b, &format!("Patient/{id}"), &with_id(patient("X"), &id), version).await;
        let (free, free_body) = put_if_match(&gw, &unit_b, &format!("Patient/{missing}"), &with_id(patient("X"), missing), version).await;
        assert_eq!((taken, normalise(&taken_body, &id)), (free, normalise(&free_body, missing)), "PUT If-Match {version}");
    }
    // Search totals count only what the caller is served.
    let patient_ref = format!("Patient/{id}");
    for (i, labelled) in [false, true, false].into_iter().enumerate() {
        let observation = phq9(&patient_ref, 10 + i as u32, "2026-03-04");
        let observation = if labelled { part2(observation) } else { observation };
        assert_eq!(gw.post(&unit_a, "Observation", &observation).await.0, 201);
    }
    let (_, found) = gw.get(&clinic, "Observation").await;
    assert_eq!(found["total"], 2, "{found}");
    assert_eq!(found["entry"].as_array().unwrap().len(), 2);
    let (_, found) = gw.get(&unit_a, "Observation").await;
    assert_eq!(found["total"], 3, "the owner is served all three");
    gw.stop().await;
}

/// Item 5: a Part 2 label on the current version withholds every earlier version too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_part2_label_covers_the_whole_history() {
    let gw = Gateway::start().await;
    let (unit_a, clinic) = (gw.token("unit-a").await, gw.token("clinic").await);
    let (_, first) = gw.post(&unit_a, "Observation", &drug_screen("Patient/p1", "positive opioids")).await;
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(gw.get(&clinic, &format!("Observation/{id}/_history/1")).await.0, 200, "unlabelled, it is disclosed");
    let labelled = part2(with_id(drug_screen("Patient/p1", "positive opioids"), &id));
    assert_eq!(gw.put(&unit_a, &format!("Observation/{id}"), &labelled).await.0, 200);
    for path in [format!("Observation/{id}"), format!("Observation/{id}/_history/1"), format!("Observation/{id}/_history/2"), format!("Observation/{id}/_history")] {
        let (status, body) = gw.get(&clinic, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.to_string().contains("opioids"));
    }
    assert_eq!(gw.get(&unit_a, &format!("Observation/{id}/_history/1")).await.0, 200, "its owner still reads its history");
    gw.stop().await;
}

/// Item 6: every spelling of the Part 2 label, in `meta.tag` too, and on the enclosing Bundle only, is recognised and stored canonically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_part2_withholds_the_record() {
    let gw = Gateway::start().await;
    let (unit_a, clinic) = (gw.token("unit-a").await, gw.token("clinic").await);
    let spellings = [
        json!({"security": [{"system": "urn:oid:2.16.840.1.113883.5.4", "code": "42CFRPart2"}]}),
        json!({"security": [{"system": "http://hl7.org/fhir/v3/ActCode", "code": "42CFRPart2"}]}),
        json!({"security": [{"code": "42CFRPart2"}]}),
        json!({"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]}),
        json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"},
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "ETH"}]}),
    ];
    for meta in spellings {
        let mut screen = drug_screen("Patient/p1", "positive opioids");
        screen["meta"] = meta.clone();
        let (status, created) = gw.post(&unit_a, "Observation", &screen).await;
        assert_eq!(status, 201, "{meta}: {created}");
        let path = format!("Observation/{}", created["id"].as_str().unwrap());
        assert_eq!(gw.get(&clinic, &path).await.0, 404, "{meta}");
        let codes: Vec<String> = created["meta"]["security"].as_array().unwrap().iter().map(|c| format!("{}|{}", c["system"].as_str().unwrap_or(""), c["code"].as_str().unwrap())).collect();
        assert!(codes.contains(&"http://terminology.hl7.org/CodeSystem/v3-ActCode|42CFRPart2".to_string()), "{meta}: {codes:?}");
    }
    let transaction = json!({"resourceType": "Bundle", "type": "transaction",
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]},
        "entry": [{"fullUrl": "urn:uuid:0d0c7a3b-1111-4222-8333-444455556666", "resource": drug_screen("Patient/p1", "positive opioids"), "request": {"method": "POST", "url": "Observation"}}]});
    let (status, response) = gw.post(&unit_a, "", &transaction).await;
    assert_eq!(status, 200, "{response}");
    let location = response["entry"][0]["response"]["location"].as_str().unwrap();
    let path = location.split("/_history").next().unwrap().rsplitn(3, '/').take(2).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("/");
    assert_eq!(gw.get(&clinic, &path).await.0, 404, "the Bundle's label reached its entry ({path})");
    assert_eq!(gw.get(&unit_a, &path).await.0, 200);
    let (_, found) = gw.get(&clinic, "Observation").await;
    assert_eq!(found["total"], 0, "{found}");
    gw.stop().await;
}

/// Item 10: an id that appears only in a transaction's or batch's `request.url` is checked like an id in a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_in_bundle_urls_are_validated() {
    let gw = Gateway::start().await;
    let clinic = gw.token("clinic").await;
    let long = "a".repeat(5000);
    for bad in ["..", "%2e%2e", "\u{420}atient-1", "abc\u{202e}fed", "a b <script>", long.as_str()] {
        let mut resource = patient("MRN-URL");
        resource["id"] = json!(bad);
        let entry = json!({"resource": resource, "request": {"method": "PUT", "url": format!("Patient/{bad}")}});
        let (status, body) = gw.post(&clinic, "", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry.clone()]})).await;
        assert!(status == 400 || status == 422, "{bad:?}: {status} {body}");
        assert_outcome(&body);
        let mut without_body_id = entry.clone();
        without_body_id["resource"].as_object_mut().unwrap().remove("id");
        let (status, body) = gw.post(&clinic, "", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [without_body_id.clone()]})).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert!(message(&body).contains("Bundle.entry[0]"), "{body}");
        let (status, body) = gw.post(&clinic, "", &json!({"resourceType": "Bundle", "type": "batch", "entry": [without_body_id]})).await;
        assert!(status == 400 || body["entry"][0]["response"]["status"].as_str().is_some_and(|s| s.starts_with("400")), "{bad:?}: {status} {body}");
    }
    let (_, found) = gw.get(&clinic, "Patient").await;
    assert_eq!(found["total"], 0, "nothing was stored: {found}");
    gw.stop().await;
}

/// A resource of `resource_type` with the business identifier `mrn`: a client for most partners, a prior-authorization Claim for a payer.
fn record(resource_type: &str, mrn: &str) -> Value {
    match resource_type {
        "Claim" => json!({"resourceType": "Claim", "identifier": [{"system": MRN_SYSTEM, "value": mrn}], "status": "active",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
            "use": "preauthorization", "patient": {"reference": "Patient/p1"}, "created": "2026-03-02", "insurer": {"reference": "Organization/payer-y"},
            "provider": {"reference": "Organization/iop-program"}, "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
            "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "Coverage on file"}}]}),
        _ => patient(mrn),
    }
}

/// How one write form reaches a resource at `id` (with identifier `mrn`); the status seen for that resource, and the outcome's text.
async fn write_by(gw: &Gateway, token: &str, form: &str, resource_type: &str, id: &str, mrn: &str) -> (u16, String) {
    let body = with_id(record(resource_type, mrn), id);
    let path = format!("{resource_type}/{id}");
    let entry = json!({"resource": body.clone(), "request": {"method": "PUT", "url": path.clone()}});
    let (status, response) = match form {
        // A create ignores the id in the body: the gateway assigns one.
        "create" => gw.post(token, resource_type, &body).await,
        "put" => gw.put(token, &path, &body).await,
        "put-if-match" => put_if_match(gw, token, &path, &body, 1).await,
        "conditional-update" => {
            let mut without_id = body.clone();
            without_id.as_object_mut().unwrap().remove("id");
            gw.put(token, &format!("{resource_type}?identifier={MRN_SYSTEM}|{mrn}"), &without_id).await
        }
        "conditional-create" => {
            let mut without_id = body.clone();
            without_id.as_object_mut().unwrap().remove("id");
            let response = gw
                .http
                .post(gw.url(resource_type))
                .bearer_auth(token)
                .header("content-type", "application/fhir+json")
                .header("if-none-exist", format!("identifier={MRN_SYSTEM}|{mrn}"))
                .body(without_id.to_string())
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
        }
        "transaction" => {
            let (status, response) = gw.post(token, "", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [entry]})).await;
            match status {
                200 => (response["entry"][0]["response"]["status"].as_str().unwrap()[..3].parse().unwrap(), Value::Null),
                _ => (status, response),
            }
        }
        "batch" => {
            let (_, response) = gw.post(token, "", &json!({"resourceType": "Bundle", "type": "batch", "entry": [entry]})).await;
            let status = response["entry"][0]["response"]["status"].as_str().unwrap()[..3].parse().unwrap();
            (status, response["entry"][0]["response"]["outcome"].clone())
        }
        "message" => {
            let message = json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "message", "timestamp": "2026-03-01T10:00:00Z", "entry": [
                {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-00000000aa01", "resource": {"resourceType": "MessageHeader", "id": uuid::Uuid::new_v4().to_string(),
                    "eventCoding": {"system": "http://hl7.org/fhir/us/bser/CodeSystem/bser-event", "code": "bser-referral-request"},
                    "source": {"endpoint": "https://partner.example/fhir"}, "focus": [{"reference": path.clone()}]}},
                {"fullUrl": format!("{}/{path}", gw.base), "resource": body}]});
            gw.post(token, "$process-message", &message).await
        }
        other => panic!("unknown form {other}"),
    };
    (status, message(&response).replace(id, "ID"))
}

/// The authorization matrix for writes: every client × write form × own / another party's / free id. A partner cannot tell another party's id from a free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_matrix_own_other_free() {
    let gw = Gateway::start().await;
    let clients = ["unit-a", "unit-b", "payer-x", "clinic"];
    let mut tokens = std::collections::HashMap::new();
    for client in clients.iter().chain(&["ops"]) {
        tokens.insert(*client, gw.token(client).await);
    }
    let forms = ["create", "put", "put-if-match", "conditional-update", "conditional-create", "transaction", "batch", "message"];
    // (client, form) → expected status for (own, other's, free).
    let expected = |client: &str, form: &str| -> (u16, u16, u16) {
        let program = client == "clinic";
        match form {
            "create" => (201, 201, 201),
            "put" | "put-if-match" | "transaction" | "batch" if program => (200, 403, if form == "put-if-match" { 412 } else { 201 }),
            "put" | "put-if-match" | "transaction" | "batch" => (200, 405, 405),
            "conditional-update" => (200, 201, 201),
            "conditional-create" => (200, 201, 201),
            // A payer exchanges prior-authorization data, not messages; for others a message always creates anew.
            "message" if client == "payer-x" => (403, 403, 403),
            "message" => (200, 200, 200),
            _ => unreachable!(),
        }
    };
    for (n, client) in clients.iter().enumerate() {
        let token = &tokens[client];
        // Another party's resource the client cannot see: unit-a's client (Part 2, so hidden from the
        // program too), or for a payer another payer's Claim the program wrote.
        let (resource_type, other) = match *client {
            "payer-x" => ("Claim", "clinic"),
            "unit-a" => ("Patient", "unit-b"),
            _ => ("Patient", "unit-a"),
        };
        for (f, form) in forms.iter().enumerate() {
            let mrn = |kind: &str| format!("M-{n}-{f}-{kind}");
            let (_, own) = gw.post(token, resource_type, &record(resource_type, &mrn("own"))).await;
            let own_id = own["id"].as_str().unwrap_or_else(|| panic!("{client}: {own}")).to_string();
            let (_, theirs) = gw.post(&tokens[other], resource_type, &part2(record(resource_type, &mrn("other")))).await;
            let other_id = theirs["id"].as_str().unwrap().to_string();
            let free_id = uuid::Uuid::new_v4().to_string();
            let (own_status, _) = write_by(&gw, token, form, resource_type, &own_id, &mrn("own")).await;
            let (other_status, other_message) = write_by(&gw, token, form, resource_type, &other_id, &mrn("other")).await;
            let (free_status, free_message) = write_by(&gw, token, form, resource_type, &free_id, &mrn("free")).await;
            let want = expected(client, form);
            assert_eq!((own_status, other_status, free_status), want, "{client} × {form}: own / other / free");
            if *client != "clinic" {
                assert_eq!(other_message, free_message, "{client} × {form}: another party's id must look free");
            }
            // Whatever the form, the other party's resource is unchanged.
            let (status, theirs_now) = gw.get(&tokens[other], &format!("{resource_type}/{other_id}")).await;
            assert_eq!((status, &theirs_now["meta"]["versionId"]), (200, &json!("1")), "{client} × {form} changed {other}'s resource");
        }
    }
    // The admin writes no clinical data at all.
    let (status, body) = gw.post(&tokens["ops"], "Patient", &patient("M-ops")).await;
    assert_eq!(status, 403, "{body}");
    gw.stop().await;
}
