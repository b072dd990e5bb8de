//! Search leniency and features, history across resources and batches (issue 15, items 4 and 8), each through the real listener and each checked against a second partner's data.

use serde_json::{Value, json};

use super::support::{Gateway, assert_outcome, patient, phq9};

const SUBSETTED: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Creates a resource and returns its id.
async fn create(gw: &Gateway, token: &str, resource_type: &str, body: &Value) -> String {
    let (status, created) = gw.post(token, resource_type, body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"].as_array().cloned().unwrap_or_default()
}

/// `Type/id` of every entry with a given search mode.
fn references(bundle: &Value, mode: &str) -> Vec<String> {
    entries(bundle)
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| format!("{}/{}", e["resource"]["resourceType"].as_str().unwrap(), e["resource"]["id"].as_str().unwrap()))
        .collect()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"].as_array()?.iter().find(|l| l["relation"] == relation).and_then(|l| l["url"].as_str()).map(str::to_string)
}

fn is_subsetted(resource: &Value) -> bool {
    resource["meta"]["tag"].as_array().is_some_and(|tags| tags.iter().any(|t| t["system"] == SUBSETTED && t["code"] == "SUBSETTED"))
}

/// Two partners with a patient and PHQ-9 scores each; unit-b also writes an Observation about unit-a's patient.
struct World {
    gw: Gateway,
    unit_a: String,
    unit_b: String,
    patient_a: String,
    patient_b: String,
    observations_a: Vec<String>,
    observation_b_about_a: String,
}

async fn world() -> World {
    let gw = Gateway::start().await;
    let (unit_a, unit_b) = (gw.token("unit-a").await, gw.token("unit-b").await);
    let mut with_text = patient("MRN-S-A");
    with_text["text"] = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Sam Testperson</div>"});
    let patient_a = create(&gw, &unit_a, "Patient", &with_text).await;
    let patient_b = create(&gw, &unit_b, "Patient", &patient("MRN-S-B")).await;
    let mut observations_a = Vec::new();
    for (score, when) in [(14, "2026-03-02"), (9, "2026-03-09"), (9, "2026-03-16")] {
        observations_a.push(create(&gw, &unit_a, "Observation", &phq9(&format!("Patient/{patient_a}"), score, when)).await);
    }
    create(&gw, &unit_b, "Observation", &phq9(&format!("Patient/{patient_b}"), 20, "2026-03-03")).await;
    let observation_b_about_a = create(&gw, &unit_b, "Observation", &phq9(&format!("Patient/{patient_a}"), 27, "2026-03-04")).await;
    World { gw, unit_a, unit_b, patient_a, patient_b, observations_a, observation_b_about_a }
}

/// `_summary` (count, true, text, data, false), `_elements` and `_total`, on search and on read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_elements_and_totals() {
    let w = world().await;
    let (gw, unit_a) = (&w.gw, &w.unit_a);
    let (status, count) = gw.get(unit_a, "Observation?_summary=count").await;
    assert_eq!(status, 200, "{count}");
    assert_eq!(count["total"], 3, "only unit-a's own Observations count: {count}");
    assert!(count.get("entry").is_none(), "{count}");
    let (_, counted_for_b) = gw.get(&w.unit_b, "Observation?_summary=count").await;
    assert_eq!(counted_for_b["total"], 2);

    let (_, summary) = gw.get(unit_a, "Observation?_summary=true").await;
    assert_eq!(summary["total"], 3);
    for entry in entries(&summary) {
        let resource = &entry["resource"];
        assert!(is_subsetted(resource), "{resource}");
        assert!(resource.get("category").is_none() && resource["code"].is_object() && resource["valueInteger"].is_number(), "{resource}");
    }
    let (_, elements) = gw.get(unit_a, "Observation?_elements=subject").await;
    let first = &entries(&elements)[0]["resource"];
    assert!(is_subsetted(first) && first["subject"].is_object() && first["status"] == "final", "mandatory elements stay: {first}");
    assert!(first.get("valueInteger").is_none() && first.get("effectiveDateTime").is_none(), "{first}");
    assert!(link(&elements, "self").unwrap().contains("_elements=subject"));
    let (_, untotalled) = gw.get(unit_a, "Observation?_total=none").await;
    assert!(untotalled.get("total").is_none() && entries(&untotalled).len() == 3, "{untotalled}");
    let (_, accurate) = gw.get(unit_a, "Observation?_total=accurate&_summary=false").await;
    assert_eq!(accurate["total"], 3);
    assert!(!is_subsetted(&entries(&accurate)[0]["resource"]));
    assert_eq!(gw.get(unit_a, "Observation?_summary=all").await.0, 400);
    assert_eq!(gw.get(unit_a, "Observation?_total=maybe").await.0, 400);

    let path = format!("Patient/{}", w.patient_a);
    let (status, data) = gw.get(unit_a, &format!("{path}?_summary=data")).await;
    assert_eq!(status, 200, "{data}");
    assert!(data.get("text").is_none() && data["birthDate"] == "1991-04-02" && is_subsetted(&data), "{data}");
    let (_, text) = gw.get(unit_a, &format!("{path}?_summary=text")).await;
    assert!(text["text"]["div"].is_string() && text.get("birthDate").is_none() && text["id"] == w.patient_a, "{text}");
    let (_, gender) = gw.get(unit_a, &format!("{path}?_elements=gender")).await;
    assert!(gender["gender"] == "other" && gender.get("name").is_none() && is_subsetted(&gender), "{gender}");
    assert_eq!(gw.get(unit_a, &format!("{path}?_summary=count")).await.0, 400, "a count is a search's");
    assert_eq!(gw.get(&w.unit_b, &format!("{path}?_summary=true")).await.0, 404, "a subset discloses no more than a read");
    w.gw.stop().await;
}

/// `Prefer: handling=lenient`: what cannot be honoured is left out and named; strict stays the default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_handling_names_what_it_left_out() {
    let w = world().await;
    let (gw, unit_a) = (&w.gw, &w.unit_a);
    let path = "Observation?status=final&frobnicate=yes&code:text=phq";
    let (status, strict) = gw.get(unit_a, path).await;
    assert_eq!(status, 400, "{strict}");
    assert!(strict["issue"][0]["details"]["text"].as_str().unwrap().contains("'frobnicate'"), "{strict}");
    let strict_again = gw.http.get(gw.url(path)).bearer_auth(unit_a).header("prefer", "handling=strict").send().await.unwrap();
    assert_eq!(strict_again.status(), 400);

    let response = gw.http.get(gw.url(path)).bearer_auth(unit_a).header("prefer", "handling=lenient").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let lenient: Value = response.json().await.unwrap();
    assert_eq!(lenient["total"], 3, "status=final still filters, and only unit-a's: {lenient}");
    assert_eq!(references(&lenient, "match").len(), 3);
    let outcomes: Vec<Value> = entries(&lenient).into_iter().filter(|e| e["search"]["mode"] == "outcome").collect();
    assert_eq!(outcomes.len(), 1, "{lenient}");
    let outcome = &outcomes[0]["resource"];
    assert_outcome(outcome);
    let text = outcome.to_string();
    assert!(text.contains("'frobnicate'") && text.contains("'code:text'"), "{text}");
    let own = link(&lenient, "self").unwrap();
    assert!(own.contains("status=final") && !own.contains("frobnicate") && !own.contains("code"), "{own}");
    w.gw.stop().await;
}

/// `_revinclude=Provenance:target` and `Task:focus`: what points at the matches, never what the caller cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revincludes_bring_provenance_and_tasks_through_disclosure() {
    let w = world().await;
    let (gw, unit_a, unit_b) = (&w.gw, &w.unit_a, &w.unit_b);
    let clinic = gw.token("clinic").await;
    let target = format!("Patient/{}", w.patient_a);
    let provenance = json!({"resourceType": "Provenance", "target": [{"reference": target}], "recorded": "2026-03-02T10:00:00Z",
        "agent": [{"who": {"reference": "Organization/iop-program"}}]});
    let task = json!({"resourceType": "Task", "status": "requested", "intent": "order", "focus": {"reference": target}, "authoredOn": "2026-03-02T10:00:00Z"});
    let provenance_id = create(gw, &clinic, "Provenance", &provenance).await;
    let own_task = create(gw, unit_a, "Task", &task).await;
    // unit-b points its own Task at unit-a's patient: unit-a must not be shown it.
    let foreign_task = create(gw, unit_b, "Task", &task).await;
    let search = format!("Patient?_id={}&_revinclude=Provenance:target&_revinclude=Task:focus", w.patient_a);

    let (status, for_clinic) = gw.get(&clinic, &search).await;
    assert_eq!(status, 200, "{for_clinic}");
    assert_eq!(references(&for_clinic, "match"), [target.clone()]);
    let mut included = references(&for_clinic, "include");
    included.sort();
    let mut expected = vec![format!("Provenance/{provenance_id}"), format!("Task/{own_task}"), format!("Task/{foreign_task}")];
    expected.sort();
    assert_eq!(included, expected, "the program is party to all of them: {for_clinic}");

    let (status, for_a) = gw.get(unit_a, &format!("Patient?_id={}&_revinclude=Task:focus", w.patient_a)).await;
    assert_eq!(status, 200, "{for_a}");
    assert_eq!(references(&for_a, "include"), [format!("Task/{own_task}")], "not unit-b's Task: {for_a}");
    // Provenance is not in an inpatient unit's scopes: refused, or named and left out under lenient handling.
    let (status, refused) = gw.get(unit_a, &search).await;
    assert_eq!(status, 403, "{refused}");
    let lenient: Value = gw.http.get(gw.url(&search)).bearer_auth(unit_a).header("prefer", "handling=lenient").send().await.unwrap().json().await.unwrap();
    assert_eq!(references(&lenient, "include"), [format!("Task/{own_task}")], "{lenient}");
    assert!(!lenient.to_string().contains(&provenance_id) && lenient.to_string().contains("Provenance:target"), "{lenient}");
    assert!(!link(&lenient, "self").unwrap().contains("Provenance"), "{lenient}");
    // unit-b asking about the same patient sees neither the patient nor anything through it.
    let (_, for_b) = gw.get(unit_b, &format!("Patient?_id={}&_revinclude=Task:focus", w.patient_a)).await;
    assert_eq!(for_b["total"], 0);
    assert!(for_b.get("entry").is_none(), "{for_b}");
    assert_eq!(gw.get(unit_a, "Patient?_revinclude=Task:nothing").await.0, 400);
    w.gw.stop().await;
}

/// `GET /Patient/{id}/{type}`: the compartment of a patient the caller can read, narrowed by the type's own parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compartment_search_needs_a_visible_patient() {
    let w = world().await;
    let (gw, unit_a, unit_b) = (&w.gw, &w.unit_a, &w.unit_b);
    let (status, found) = gw.get(unit_a, &format!("Patient/{}/Observation", w.patient_a)).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 3, "unit-b's Observation about the same patient is not unit-a's to see: {found}");
    assert!(!found.to_string().contains(&w.observation_b_about_a));
    let mut ids: Vec<String> = references(&found, "match").into_iter().map(|r| r.trim_start_matches("Observation/").to_string()).collect();
    ids.sort();
    let mut expected = w.observations_a.clone();
    expected.sort();
    assert_eq!(ids, expected);
    let (_, narrowed) = gw.get(unit_a, &format!("Patient/{}/Observation?date=ge2026-03-09&_count=1", w.patient_a)).await;
    assert_eq!(narrowed["total"], 2);
    assert!(link(&narrowed, "next").unwrap().contains(&format!("/Patient/{}/Observation?", w.patient_a)), "{narrowed}");
    let (_, none_of_b) = gw.get(unit_a, &format!("Patient/{}/Observation", w.patient_b)).await;
    assert_eq!(gw.get(unit_a, &format!("Patient/{}/Observation", w.patient_b)).await.0, 404, "{none_of_b}");
    assert_eq!(gw.get(unit_b, &format!("Patient/{}/Observation", w.patient_a)).await.0, 404, "nor does unit-b learn unit-a's patient exists");
    assert_eq!(gw.get(unit_a, "Patient/no-such-patient/Observation").await.0, 404);
    let (status, task) = gw.get(unit_a, &format!("Patient/{}/Task", w.patient_a)).await;
    assert_eq!(status, 400, "Task is not in R4's Patient compartment: {task}");
    assert_eq!(gw.get(unit_a, &format!("Patient/{}/Observation?frobnicate=1", w.patient_a)).await.0, 400);
    w.gw.stop().await;
}

/// `GET /{type}/_history` and `GET /_history` (`_since`, `_count`, paging): only versions of what the caller can read, in entries and totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_and_system_history_disclose_every_version() {
    let w = world().await;
    let (gw, unit_a, unit_b) = (&w.gw, &w.unit_a, &w.unit_b);
    let path = format!("Patient/{}", w.patient_a);
    let (_, mut current) = gw.get(unit_a, &path).await;
    current["gender"] = json!("female");
    assert_eq!(gw.put(unit_a, &path, &current).await.0, 200);

    let (status, patients) = gw.get(unit_a, "Patient/_history").await;
    assert_eq!(status, 200, "{patients}");
    assert_eq!(patients["type"], "history");
    assert_eq!(patients["total"], 2, "unit-a's patient in two versions, not unit-b's: {patients}");
    let versions: Vec<String> = entries(&patients).iter().map(|e| e["resource"]["meta"]["versionId"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions, ["2", "1"], "newest first");
    assert_eq!(entries(&patients)[0]["request"]["url"], path);
    let (_, for_b) = gw.get(unit_b, "Patient/_history").await;
    assert_eq!(for_b["total"], 1);
    assert!(!for_b.to_string().contains(&w.patient_a));

    let (status, all) = gw.get(unit_a, "_history?_count=2").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total"], 5, "two Patient versions and three Observations: {all}");
    assert_eq!(entries(&all).len(), 2);
    let next = link(&all, "next").unwrap();
    let rest: Value = gw.http.get(&next).bearer_auth(unit_a).send().await.unwrap().json().await.unwrap();
    assert_eq!(entries(&rest).len(), 2, "{rest}");
    let text = format!("{all}{rest}");
    assert!(!text.contains(&w.patient_b) && !text.contains(&w.observation_b_about_a));
    let (_, later) = gw.get(unit_a, "_history?_since=2999-01-01T00:00:00Z").await;
    assert_eq!(later["total"], 0);
    assert_eq!(gw.get(unit_a, "_history?_since=yesterday").await.0, 400);
    assert_eq!(gw.get(unit_a, "Patient/_history?frobnicate=1").await.0, 400);
    w.gw.stop().await;
}

/// `_sort` with several keys, on `_lastUpdated`, `_id` and the type's parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorting_by_several_keys() {
    let w = world().await;
    let (gw, unit_a) = (&w.gw, &w.unit_a);
    let (status, found) = gw.get(unit_a, "Observation?_sort=-date,_id").await;
    assert_eq!(status, 200, "{found}");
    let dates: Vec<String> = entries(&found).iter().map(|e| e["resource"]["effectiveDateTime"].as_str().unwrap().to_string()).collect();
    assert_eq!(dates, ["2026-03-16", "2026-03-09", "2026-03-02"]);
    let ids = |bundle: &Value| entries(bundle).iter().map(|e| e["resource"]["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (_, newest) = gw.get(unit_a, "Observation?code=http://loinc.org|44261-6&_sort=-_lastUpdated&_sort=_id").await;
    let updated: Vec<String> = entries(&newest).iter().map(|e| e["resource"]["meta"]["lastUpdated"].as_str().unwrap().to_string()).collect();
    assert!(updated.len() == 3 && updated.windows(2).all(|p| p[0] >= p[1]), "{updated:?}");
    let (_, by_id) = gw.get(unit_a, "Observation?_sort=_id").await;
    let mut sorted = w.observations_a.clone();
    sorted.sort();
    assert_eq!(ids(&by_id), sorted);
    let (_, by_status) = gw.get(unit_a, "Observation?_sort=status,-date").await;
    assert_eq!(entries(&by_status)[0]["resource"]["effectiveDateTime"], "2026-03-16");
    let (status, refused) = gw.get(unit_a, "Observation?_sort=frobnicate").await;
    assert_eq!(status, 400);
    assert!(refused.to_string().contains("frobnicate"), "{refused}");
    w.gw.stop().await;
}

/// `GET /?_type=…`: a search across types with the common parameters, within what the caller sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_search_by_type() {
    let w = world().await;
    let (gw, unit_a) = (&w.gw, &w.unit_a);
    let (status, found) = gw.get(unit_a, "?_type=Patient,Observation&_sort=-_lastUpdated").await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 4, "{found}");
    assert_eq!(references(&found, "match")[0], format!("Observation/{}", w.observations_a[2]), "newest first");
    assert!(!found.to_string().contains(&w.patient_b));
    assert!(link(&found, "self").unwrap().contains("_type=Patient%2CObservation"), "{found}");
    let (_, counted) = gw.get(unit_a, &format!("?_type=Patient&_id={}&_summary=count", w.patient_a)).await;
    assert_eq!(counted["total"], 1);
    assert_eq!(gw.get(&w.unit_b, &format!("?_type=Patient&_id={}", w.patient_a)).await.1["total"], 0);
    assert_eq!(gw.get(unit_a, "?_type=Patient,Observation&status=final").await.0, 400, "only parameters common to every type");
    assert_eq!(gw.get(unit_a, "?_type=Frobnicator").await.0, 404);
    w.gw.stop().await;
}

/// A batch runs every interaction that works alone, each entry answered on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_answer_every_interaction_per_entry() {
    let w = world().await;
    let (gw, unit_a) = (&w.gw, &w.unit_a);
    let pa = &w.patient_a;
    let conditional = patient("MRN-S-COND");
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Observation?patient={pa}&_sort=date")}},
        {"request": {"method": "GET", "url": format!("Patient/{pa}/_history")}},
        {"request": {"method": "GET", "url": format!("Patient/{pa}/_history/1")}},
        {"request": {"method": "GET", "url": format!("Patient/{}", w.patient_b)}},
        {"request": {"method": "GET", "url": format!("Patient/{pa}/Observation?_summary=count")}},
        {"request": {"method": "GET", "url": "Patient/_history"}},
        {"resource": phq9(&format!("Patient/{pa}"), 5, "2026-03-23"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": conditional, "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-S-A"}},
        {"resource": patient("MRN-S-A"), "request": {"method": "PUT", "url": "Patient?identifier=urn:oid:2.16.840.1.113883.3.9999.1|MRN-S-A"}},
        {"resource": patient("MRN-S-V"), "request": {"method": "POST", "url": "Patient/$validate"}},
        {"request": {"method": "GET", "url": "Observation?frobnicate=1"}},
        {"request": {"method": "DELETE", "url": format!("Patient/{pa}")}},
        {"request": {"method": "GET", "url": format!("Patient/{pa}"), "ifNoneMatch": "W/\"2\""}}
    ]});
    let (status, response) = gw.post(unit_a, "", &batch).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["type"], "batch-response");
    let answers = entries(&response);
    let statuses: Vec<&str> = answers.iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["200 OK", "200 OK", "200 OK", "404 Not Found", "200 OK", "200 OK", "201 Created", "200 OK", "200 OK", "200 OK", "400 Bad Request", "405 Method Not Allowed", "304 Not Modified"],
        "{response}"
    );
    assert_eq!(answers[0]["resource"]["type"], "searchset");
    assert_eq!(answers[0]["resource"]["total"], 3, "the search entry sees only unit-a's: {}", answers[0]);
    assert_eq!(answers[1]["resource"]["type"], "history");
    assert_eq!(answers[2]["resource"]["meta"]["versionId"], "1");
    assert_eq!(answers[2]["response"]["etag"], "W/\"1\"");
    assert_eq!(answers[2]["fullUrl"], format!("{}/Patient/{pa}", gw.base));
    assert_outcome(&answers[3]["response"]["outcome"]);
    assert!(answers[3].get("resource").is_none() && !answers[3].to_string().contains("MRN-S-B"), "unit-b's patient stays unknown");
    assert_eq!(answers[4]["resource"]["total"], 3, "{}", answers[4]);
    assert_eq!(answers[5]["resource"]["total"], 1);
    let created = &answers[6]["response"];
    assert!(created["location"].as_str().unwrap().starts_with("Observation/") && created["lastModified"].is_string(), "{created}");
    assert_eq!(answers[7]["resource"]["id"], pa.as_str(), "the conditional create found unit-a's patient");
    assert_eq!(answers[8]["resource"]["id"], pa.as_str(), "the conditional update wrote it");
    assert_eq!(answers[8]["resource"]["meta"]["versionId"], "2");
    assert_eq!(answers[9]["resource"]["resourceType"], "OperationOutcome");
    assert!(answers[10]["response"]["outcome"].to_string().contains("frobnicate"));
    assert_outcome(&answers[11]["response"]["outcome"]);
    assert!(answers[12].get("resource").is_none());

    // A withheld resource answers in a batch exactly as alone, and a Bundle in a batch is refused on its own.
    let (_, for_b) = gw.post(&w.unit_b, "", &json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{pa}/_history")}},
        {"request": {"method": "GET", "url": format!("Patient/{pa}/Observation")}},
        {"request": {"method": "GET", "url": format!("Observation?patient={pa}")}},
        {"resource": {"resourceType": "Bundle", "type": "batch"}, "request": {"method": "POST", "url": ""}}
    ]})).await;
    let statuses: Vec<String> = entries(&for_b).iter().map(|e| e["response"]["status"].as_str().unwrap().to_string()).collect();
    assert_eq!(statuses, ["404 Not Found", "404 Not Found", "200 OK", "405 Method Not Allowed"], "{for_b}");
    assert_eq!(entries(&for_b)[2]["resource"]["total"], 1, "only unit-b's own Observation about the patient");
    w.gw.stop().await;
}

/// The CapabilityStatement says what the server now does, and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_statement_lists_these_features() {
    let gw = Gateway::start().await;
    let statement: Value = gw.http.get(gw.url("metadata")).send().await.unwrap().json().await.unwrap();
    let rest = &statement["rest"][0];
    let codes = |v: &Value| v.as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(codes(&rest["interaction"]), ["transaction", "batch", "search-system", "history-system"]);
    assert_eq!(rest["compartment"][0], "http://hl7.org/fhir/CompartmentDefinition/patient");
    let patient = rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").unwrap();
    assert!(codes(&patient["interaction"]).contains(&"history-type".to_string()));
    assert!(!codes(&patient["interaction"]).contains(&"delete".to_string()));
    let revincludes = patient["searchRevInclude"].as_array().unwrap();
    assert!(revincludes.contains(&json!("Provenance:target")) && revincludes.contains(&json!("Task:focus")), "{patient}");
    gw.stop().await;
}

/// A version labelled 42 CFR Part 2 neither shows nor counts in another client's type and system
/// history (the label test runs in SQL), on SQLite and on PostgreSQL; search across types and several sort keys run on both.
async fn part2_versions_stay_out_of_history(gw: &Gateway) {
    let (unit_a, clinic) = (gw.token("unit-a").await, gw.token("clinic").await);
    let patient_id = create(gw, &unit_a, "Patient", &patient("MRN-S-P2")).await;
    let mut screen = phq9(&format!("Patient/{patient_id}"), 3, "2026-03-05");
    screen["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]});
    let labelled = create(gw, &unit_a, "Observation", &screen).await;
    let plain = create(gw, &unit_a, "Observation", &phq9(&format!("Patient/{patient_id}"), 8, "2026-03-06")).await;
    let (_, own) = gw.get(&unit_a, "Observation/_history").await;
    assert_eq!(own["total"], 2, "the owner sees its own Part 2 record: {own}");
    for path in ["Observation/_history", "_history"] {
        let (status, seen) = gw.get(&clinic, path).await;
        assert_eq!(status, 200, "{seen}");
        assert_eq!(seen["total"].as_u64().unwrap() as usize, entries(&seen).len(), "{path}: the total counts only what is served: {seen}");
        assert!(!seen.to_string().contains(&labelled) && seen.to_string().contains(&plain), "{path}: {seen}");
    }
    let (_, across) = gw.get(&clinic, "?_type=Patient,Observation&_sort=-_lastUpdated,_id&_lastUpdated=ge2026").await;
    assert_eq!(across["total"], 2, "{across}");
    let (_, compartment) = gw.get(&clinic, &format!("Patient/{patient_id}/Observation?_sort=-date,status")).await;
    assert_eq!(references(&compartment, "match"), [format!("Observation/{plain}")], "{compartment}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part2_versions_stay_out_of_history_on_sqlite() {
    let gw = Gateway::start().await;
    part2_versions_stay_out_of_history(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part2_versions_stay_out_of_history_on_postgres() {
    let Some(url) = crate::need::postgres("server::search::part2_versions_stay_out_of_history_on_postgres") else { return };
    let schema = super::postgres::schema_name("search");
    let dir = super::support::TempDir::new("pg-search");
    let keys = super::support::partner_keys();
    let text = super::support::config_text(&dir.0, &keys, "").replacen("[store]\n", &format!("[store]\nurl = \"{url}\"\nschema = \"{schema}\"\n"), 1);
    let gw = Gateway::start_loaded(super::support::load(&text, &dir.0), keys, dir).await;
    part2_versions_stay_out_of_history(&gw).await;
    gw.stop().await;
    super::postgres::drop_schema(&schema).await;
}

/// `_lastUpdated` with every prefix at the stored instant's own millisecond and second, matched
/// on the resource's `last_updated` (no index row): the instant covers its millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_updated_prefixes_at_the_instant_itself() {
    let gw = Gateway::start().await;
    let unit_a = gw.token("unit-a").await;
    let patient_a = create(&gw, &unit_a, "Patient", &patient("MRN-LU")).await;
    let (status, created) = gw.post(&unit_a, "Observation", &phq9(&format!("Patient/{patient_a}"), 5, "2026-03-02")).await;
    assert_eq!(status, 201, "{created}");
    let (id, at) = (created["id"].as_str().unwrap().to_string(), created["meta"]["lastUpdated"].as_str().unwrap().to_string());
    let second = &at[..19];
    let next_ms = {
        let t = time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).unwrap() + time::Duration::milliseconds(1);
        format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond())
    };
    let cases = [
        (format!("eq{at}"), true),
        (format!("ne{at}"), false),
        (format!("eq{second}Z"), true),
        (format!("ge{at}"), true),
        (format!("gt{at}"), false),
        (format!("le{at}"), true),
        (format!("lt{at}"), false),
        (format!("sa{at}"), false),
        (format!("eb{at}"), false),
        (format!("eq{next_ms}"), false),
        (format!("lt{next_ms}"), true),
        (format!("eb{next_ms}"), true),
        (format!("gt2026-01-01"), true),
        (format!("lt2026-01-01"), false),
    ];
    for (value, found) in cases {
        let (status, bundle) = gw.get(&unit_a, &format!("Observation?_id={id}&_lastUpdated={}", value.replace('+', "%2B"))).await;
        assert_eq!(status, 200, "{value}: {bundle}");
        assert_eq!(references(&bundle, "match") == vec![format!("Observation/{id}")], found, "_lastUpdated={value}: {bundle}");
    }
    gw.stop().await;
}
