//! Bulk Data `$export` (STU 3) and `Patient/[id]/$everything` through the real listener: kick-off → poll → download → every NDJSON line validated, each parameter, refusals, other clients' jobs, cancel, expiry, a restart in the middle of an export, and Part 2 records kept out.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};

use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys, patient, phq9};

/// Short settle time (the request timeout), quick polls, and room for the tests' own pacing.
const FAST: &str = "request_timeout_secs = 2\n[export]\nretry_after_secs = 1\n";

fn part2(mut resource: Value) -> Value {
    resource["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]});
    resource
}

/// What the tests store: two patients of the clinic, observations for each, an active enrollment of
/// the second, a Group holding the first, and a Part 2 observation another party (unit-a) wrote about the first.
struct Data {
    p1: String,
    p2: String,
    group: String,
    observations_p1: usize,
    observations_p2: usize,
}

async fn store_data(g: &Gateway) -> Data {
    let clinic = g.token("clinic").await;
    let (status, p1) = g.post(&clinic, "Patient", &patient("EXP-1")).await;
    assert_eq!(status, 201, "{p1}");
    let (_, p2) = g.post(&clinic, "Patient", &patient("EXP-2")).await;
    let (p1, p2) = (format!("Patient/{}", p1["id"].as_str().unwrap()), format!("Patient/{}", p2["id"].as_str().unwrap()));
    for (i, when) in ["2026-03-02T09:30:00Z", "2026-03-09T09:30:00Z", "2026-03-16T09:30:00Z"].iter().enumerate() {
        assert_eq!(g.post(&clinic, "Observation", &phq9(&p1, 10 + i as u32, when)).await.0, 201);
    }
    assert_eq!(g.post(&clinic, "Observation", &phq9(&p2, 4, "2026-03-03T09:30:00Z")).await.0, 201);
    let enrollment = json!({"resourceType": "EpisodeOfCare", "status": "active", "patient": {"reference": p2}, "managingOrganization": {"reference": "Organization/iop-program"}});
    assert_eq!(g.post(&clinic, "EpisodeOfCare", &enrollment).await.0, 201);
    let group = json!({"resourceType": "Group", "type": "person", "actual": true, "member": [{"entity": {"reference": p1}}]});
    let (status, group) = g.post(&clinic, "Group", &group).await;
    assert_eq!(status, 201, "{group}");
    let unit_a = g.token("unit-a").await;
    let (status, sud) = g.post(&unit_a, "Observation", &part2(phq9(&p1, 20, "2026-03-04T09:30:00Z"))).await;
    assert_eq!(status, 201, "{sud}");
    Data { p1, p2, group: group["id"].as_str().unwrap().to_string(), observations_p1: 3, observations_p2: 1 }
}

async fn kick_off(g: &Gateway, token: &str, path: &str, prefer: &str) -> reqwest::Response {
    g.http.get(g.url(path)).bearer_auth(token).header("accept", "application/fhir+json").header("prefer", prefer).send().await.unwrap()
}

/// Kicks off an export and returns its status URL.
async fn start(g: &Gateway, token: &str, path: &str) -> String {
    let response = kick_off(g, token, path, "respond-async").await;
    assert_eq!(response.status(), 202, "{path}: {}", response.text().await.unwrap());
    response.headers()["content-location"].to_str().unwrap().to_string()
}

/// Polls until the export completes; while it runs, every answer is 202 with X-Progress and Retry-After.
async fn manifest(g: &Gateway, token: &str, status_url: &str) -> (Value, reqwest::header::HeaderMap) {
    for _ in 0..600 {
        let response = g.http.get(status_url).bearer_auth(token).send().await.unwrap();
        match response.status().as_u16() {
            202 => {
                assert!(response.headers().contains_key("x-progress") && response.headers().contains_key("retry-after"), "{:?}", response.headers());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            200 => {
                assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
                let headers = response.headers().clone();
                return (response.json().await.unwrap(), headers);
            }
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
    }
    panic!("the export at {status_url} did not complete");
}

/// Downloads every output file, checks the counts, the types and that every line is a valid resource; lines by type.
async fn download(g: &Gateway, token: &str, manifest: &Value) -> BTreeMap<String, Vec<Value>> {
    let validator = iop_gateway::api::state::default_validator();
    let mut by_type: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in manifest["output"].as_array().unwrap() {
        let resource_type = file["type"].as_str().unwrap();
        let response = g.http.get(file["url"].as_str().unwrap()).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/fhir+ndjson");
        let text = response.text().await.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, file["count"].as_u64().unwrap(), "the manifest's count is the file's lines");
        for line in lines {
            let report = validator.validate_bytes(line.as_bytes(), &[]);
            assert!(report.is_valid(), "{line}: {:?}", report.issues);
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_eq!(resource["resourceType"], resource_type);
            by_type.entry(resource_type.to_string()).or_default().push(resource);
        }
    }
    by_type
}

async fn export(g: &Gateway, token: &str, path: &str) -> BTreeMap<String, Vec<Value>> {
    let status_url = start(g, token, path).await;
    let (manifest, _) = manifest(g, token, &status_url).await;
    download(g, token, &manifest).await
}

fn ids(resources: Option<&Vec<Value>>) -> HashSet<String> {
    resources.map(|r| r.iter().map(|x| format!("{}/{}", x["resourceType"].as_str().unwrap(), x["id"].as_str().unwrap())).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clinic_exports_what_it_may_read_at_every_level_and_with_every_parameter() {
    every_level_and_parameter(Gateway::start_with(FAST).await).await;
}

/// The same on PostgreSQL, whose export pages are read with a query of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_level_and_parameter_on_postgres() {
    let Some(url) = crate::need::postgres("server::export::every_level_and_parameter_on_postgres") else { return };
    let schema = super::postgres::schema_name("export");
    let dir = TempDir::new("pg-export");
    let keys = partner_keys();
    let text = config_text(&dir.0, &keys, FAST).replacen("[store]\n", &format!("[store]\nurl = \"{url}\"\nschema = \"{schema}\"\n"), 1);
    every_level_and_parameter(Gateway::start_loaded(load(&text, &dir.0), keys, dir).await).await;
    super::postgres::drop_schema(&schema).await;
}

async fn every_level_and_parameter(g: Gateway) {
    let data = store_data(&g).await;
    let clinic = g.token("clinic").await;

    // System level: the manifest as the IG shapes it, every line valid, the Part 2 record another party wrote left out.
    let status_url = start(&g, &clinic, "$export").await;
    assert!(status_url.starts_with(&format!("{}/$export-status/", g.base)));
    // A write after the kick-off is after the transaction time: it is not in this export.
    assert_eq!(g.post(&clinic, "Observation", &phq9(&data.p2, 9, "2026-03-20T09:30:00Z")).await.0, 201);
    let (manifest_json, headers) = manifest(&g, &clinic, &status_url).await;
    assert!(headers.contains_key("expires"));
    assert_eq!(manifest_json["request"], format!("{}/$export", g.base));
    assert_eq!(manifest_json["requiresAccessToken"], true);
    assert!(manifest_json["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(manifest_json["error"], json!([]));
    let all = download(&g, &clinic, &manifest_json).await;
    assert_eq!(all["Patient"].len(), 2);
    assert_eq!(all["Observation"].len(), data.observations_p1 + data.observations_p2, "the Part 2 record and the later write stay out");
    assert!(all["Observation"].iter().all(|o| o["meta"].get("security").is_none()));
    assert_eq!(all["Group"].len(), 1);
    assert_eq!(all["EpisodeOfCare"].len(), 1);

    // _type, _since (now: nothing changed after it) and _until, _typeFilter, _outputFormat's short names.
    let patients = export(&g, &clinic, "$export?_type=Patient&_outputFormat=ndjson").await;
    assert_eq!(patients.keys().collect::<Vec<_>>(), ["Patient"]);
    let later = export(&g, &clinic, "$export?_since=2999-01-01T00:00:00Z").await;
    assert!(later.is_empty());
    let earlier = export(&g, &clinic, "$export?_type=Patient,Observation&_until=2000-01-01T00:00:00Z&_outputFormat=application/ndjson").await;
    assert!(earlier.is_empty());
    let filtered = export(&g, &clinic, &format!("$export?_type=Observation&_typeFilter={}", urlencode(&format!("Observation?subject={}", data.p2)))).await;
    assert_eq!(filtered["Observation"].len(), 2, "p2's observation and the one written after the first kick-off");
    let either = export(&g, &clinic, &format!("$export?_type=Observation&_typeFilter={}&_typeFilter={}", urlencode(&format!("Observation?subject={}", data.p2)), urlencode("Observation?date=2026-03-02"))).await;
    assert_eq!(either["Observation"].len(), 3, "two _typeFilter queries for one type are ORed");

    // Patient level: every patient's compartment; POST with Parameters narrows it to the patients named.
    let compartment = export(&g, &clinic, "Patient/$export").await;
    assert_eq!(compartment["Patient"].len(), 2);
    assert!(!compartment.contains_key("Group") || compartment["Group"].len() == 1, "a Group with members is in their compartments");
    let parameters = json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference": {"reference": data.p1}}, {"name": "_type", "valueString": "Patient,Observation"}]});
    let response = g.http.post(g.url("Patient/$export")).bearer_auth(&clinic).header("prefer", "respond-async").header("content-type", "application/fhir+json").body(parameters.to_string()).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"].to_str().unwrap().to_string();
    let (posted_manifest, _) = manifest(&g, &clinic, &status_url).await;
    assert_eq!(posted_manifest["request"], format!("{}/Patient/$export", g.base), "a POST's request URL carries no parameters");
    let one = download(&g, &clinic, &posted_manifest).await;
    assert_eq!(ids(one.get("Patient")), HashSet::from([data.p1.clone()]));
    assert_eq!(one["Observation"].len(), data.observations_p1);

    // Group level: a stored Group's members, and the program's clients the gateway keeps as Groups.
    let grouped = export(&g, &clinic, &format!("Group/{}/$export", data.group)).await;
    assert_eq!(ids(grouped.get("Patient")), HashSet::from([data.p1.clone()]));
    assert_eq!(grouped["Observation"].len(), data.observations_p1);
    let enrolled = export(&g, &clinic, "Group/iop-active-enrollments/$export").await;
    assert_eq!(ids(enrolled.get("Patient")), HashSet::from([data.p2.clone()]));
    assert_eq!(enrolled["EpisodeOfCare"].len(), 1);
    let everyone = export(&g, &clinic, "Group/iop-all-clients/$export?_type=Patient").await;
    assert_eq!(ids(everyone.get("Patient")), HashSet::from([data.p2.clone()]), "only p2 was ever enrolled");

    // Another party sees only what it is party to: unit-a's export is its own Part 2 record (it owns it) and no one else's data.
    let unit_a = g.token("unit-a").await;
    let theirs = export(&g, &unit_a, "$export").await;
    assert_eq!(theirs.keys().collect::<Vec<_>>(), ["Observation"]);
    assert_eq!(theirs["Observation"].len(), 1);

    // Every export was audited with who, what types and how many resources.
    let ops = g.token("ops").await;
    let descriptions = |events: Value| -> Vec<String> { events["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["outcomeDesc"].as_str().map(str::to_string)).collect() };
    let (status, events) = g.get(&ops, "AuditEvent?altid=clinic&subtype=operation&_count=200").await;
    assert_eq!(status, 200);
    let completed = descriptions(events);
    assert!(completed.iter().any(|d| d.contains("bulk export") && d.contains("resources written (") && d.contains("Observation 4")), "{completed:?}");
    let (_, events) = g.get(&ops, "AuditEvent?altid=clinic&subtype=read&_count=200").await;
    let reads = descriptions(events);
    assert!(reads.iter().any(|d| d.contains("file Observation-1.ndjson: ")), "downloads are audited: {reads:?}");

    // The CapabilityStatement names the operations by the IG's canonicals.
    let metadata = g.http.get(g.url("metadata")).send().await.unwrap().text().await.unwrap();
    for canonical in ["bulkdata/OperationDefinition/export", "bulkdata/OperationDefinition/patient-export", "bulkdata/OperationDefinition/group-export", "OperationDefinition/Patient-everything"] {
        assert!(metadata.contains(canonical), "{canonical}");
    }
    g.stop().await;
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_parameters_are_refused_or_reported_and_jobs_are_private() {
    let g = Gateway::start_with(&format!("{FAST}retention_secs = 5\n")).await;
    store_data(&g).await;
    let clinic = g.token("clinic").await;
    for (path, prefer, named) in [
        ("$export", "", "respond-async"),
        ("$export?_outputFormat=application/fhir+json", "respond-async", "_outputFormat"),
        ("$export?_elements=id", "respond-async", "_elements"),
        ("$export?organizeOutputBy=Patient", "respond-async", "organizeOutputBy"),
        ("$export?includeAssociatedData=LatestProvenanceResources", "respond-async", "includeAssociatedData"),
        ("$export?patient=Patient/x", "respond-async", "patient"),
        ("$export?_since=yesterday", "respond-async", "_since"),
        ("$export?_type=Nonsense", "respond-async", "_type"),
        ("$export?_typeFilter=Observation%3F_sort%3Ddate", "respond-async", "_typeFilter"),
        ("$export?_typeFilter=Observation%3Fcolour%3Dred", "respond-async", "_typeFilter"),
        ("$export?_count=10", "respond-async", "_count"),
        ("Patient/$export?_type=Organization", "respond-async", "_type"),
    ] {
        let response = kick_off(&g, &clinic, path, prefer).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_outcome(&body);
        assert!(body["issue"][0]["diagnostics"].as_str().unwrap_or_default().contains(named) || body.to_string().contains(named), "{path}: {body}");
    }
    let response = g.http.get(g.url("Group/not-there/$export")).bearer_auth(&clinic).header("prefer", "respond-async").send().await.unwrap();
    assert_eq!(response.status(), 404);

    // Under handling=lenient the same parameters are ignored and reported in the manifest's error file.
    let response = kick_off(&g, &clinic, "$export?_type=Patient&_elements=id&organizeOutputBy=Patient", "respond-async, handling=lenient").await;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"].to_str().unwrap().to_string();

    // One running export per client: another kick-off waits.
    let busy = kick_off(&g, &clinic, "$export", "respond-async").await;
    assert_eq!(busy.status(), 429);
    assert!(busy.headers().contains_key("retry-after"));
    assert_outcome(&busy.json().await.unwrap());

    let (lenient, _) = manifest(&g, &clinic, &status_url).await;
    let errors = lenient["error"].as_array().unwrap();
    assert_eq!(errors.len(), 1);
    let text = g.http.get(errors[0]["url"].as_str().unwrap()).bearer_auth(&clinic).send().await.unwrap().text().await.unwrap();
    assert_eq!(text.lines().count(), 2);
    for line in text.lines() {
        let outcome: Value = serde_json::from_str(line).unwrap();
        assert_outcome(&outcome);
    }
    assert!(text.contains("_elements") && text.contains("organizeOutputBy"));
    let file_url = lenient["output"][0]["url"].as_str().unwrap().to_string();

    // No token, a token without read scopes, and another client's job (status, file, cancel): refused, and the job looks absent.
    let anonymous = g.http.get(g.url("$export")).header("prefer", "respond-async").send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let writer = g.token_for("clinic", "system/*.write").await;
    let refused = kick_off(&g, &writer, "$export", "respond-async").await;
    assert_eq!(refused.status(), 403);
    assert_outcome(&refused.json().await.unwrap());
    let unit_a = g.token("unit-a").await;
    for (method, url) in [(reqwest::Method::GET, &status_url), (reqwest::Method::GET, &file_url), (reqwest::Method::DELETE, &status_url)] {
        let response = g.http.request(method.clone(), url.as_str()).bearer_auth(&unit_a).send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {url}");
        assert_outcome(&response.json().await.unwrap());
    }
    assert_eq!(g.http.get(&file_url).bearer_auth(&clinic).send().await.unwrap().status(), 200, "still the clinic's");

    // Expiry: after retention_secs the files and the status are gone.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(g.http.get(&status_url).bearer_auth(&clinic).send().await.unwrap().status(), 404);
    assert_eq!(g.http.get(&file_url).bearer_auth(&clinic).send().await.unwrap().status(), 404);
    let job = status_url.rsplit('/').next().unwrap();
    assert!(!g._dir.0.join("data").join("exports").join(job).exists(), "the files were deleted");

    // Cancel: DELETE answers 202, the status is gone and so are the files.
    let status_url = start(&g, &clinic, "$export").await;
    let cancelled = g.http.delete(&status_url).bearer_auth(&clinic).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    assert_eq!(g.http.get(&status_url).bearer_auth(&clinic).send().await.unwrap().status(), 404);
    let job = status_url.rsplit('/').next().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!g._dir.0.join("data").join("exports").join(job).exists());
    // With the cancelled job gone, the client may start another.
    let again = start(&g, &clinic, "$export?_type=Patient").await;
    manifest(&g, &clinic, &again).await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_in_the_middle_of_an_export_resumes_it_without_duplicates() {
    let dir = TempDir::new("export-restart");
    let extra = "request_timeout_secs = 5\n[export]\npage_size = 1\nlease_secs = 2\nretry_after_secs = 1\n";
    let keys = partner_keys();
    let first = Gateway::start_loaded(load(&config_text(&dir.0, &keys, extra), &dir.0), keys, TempDir::new("export-restart-a")).await;
    let clinic = first.token("clinic").await;
    let (_, p) = first.post(&clinic, "Patient", &patient("EXP-R")).await;
    let reference = format!("Patient/{}", p["id"].as_str().unwrap());
    let entries: Vec<Value> = (0..300).map(|i| json!({"resource": phq9(&reference, i % 28, "2026-03-02T09:30:00Z"), "request": {"method": "POST", "url": "Observation"}})).collect();
    let (status, _) = first.post(&clinic, "", &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})).await;
    assert_eq!(status, 200);
    let status_url = start(&first, &clinic, "$export?_type=Observation").await;
    let job = status_url.rsplit('/').next().unwrap().to_string();
    // Stop the gateway once some pages are committed and the export is still running.
    let mut written = 0;
    for _ in 0..4000 {
        let response = first.http.get(&status_url).bearer_auth(&clinic).send().await.unwrap();
        assert_eq!(response.status(), 202, "the export finished before the gateway could be stopped");
        let progress = response.headers()["x-progress"].to_str().unwrap().to_string();
        written = progress.split(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        if written > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(written > 0 && written < 300, "{written}");
    first.stop().await;

    let keys = partner_keys();
    let second = Gateway::start_loaded(load(&config_text(&dir.0, &keys, extra), &dir.0), keys, TempDir::new("export-restart-b")).await;
    let clinic = second.token("clinic").await;
    let (manifest_json, _) = manifest(&second, &clinic, &second.url(&format!("$export-status/{job}"))).await;
    let exported = download(&second, &clinic, &manifest_json).await;
    let observations = &exported["Observation"];
    assert_eq!(observations.len(), 300);
    assert_eq!(ids(Some(observations)).len(), 300, "no resource was written twice");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_pages_through_the_compartment_the_caller_may_read() {
    let g = Gateway::start().await;
    let data = store_data(&g).await;
    let clinic = g.token("clinic").await;
    let id = data.p1.trim_start_matches("Patient/");
    let mut seen = HashSet::new();
    let mut next = Some(g.url(&format!("Patient/{id}/$everything?_count=2")));
    let mut pages = 0;
    while let Some(url) = next {
        let response = g.http.get(&url).bearer_auth(&clinic).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let bundle: Value = response.json().await.unwrap();
        assert_eq!(bundle["type"], "searchset");
        // The patient, its observations and the Group naming it; not unit-a's Part 2 observation.
        assert_eq!(bundle["total"], 1 + data.observations_p1 + 1);
        for entry in bundle["entry"].as_array().unwrap() {
            assert!(seen.insert(format!("{}/{}", entry["resource"]["resourceType"].as_str().unwrap(), entry["resource"]["id"].as_str().unwrap())));
        }
        next = bundle["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").map(|l| l["url"].as_str().unwrap().to_string());
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert!(seen.contains(&data.p1) && seen.contains(&format!("Group/{}", data.group)));
    let (status, observations) = g.get(&clinic, &format!("Patient/{id}/$everything?_type=Observation")).await;
    assert_eq!(status, 200);
    assert_eq!(observations["total"], data.observations_p1);
    let (_, later) = g.get(&clinic, &format!("Patient/{id}/$everything?_since=2999-01-01T00:00:00Z")).await;
    assert_eq!(later["total"], 0);
    let (status, body) = g.get(&clinic, &format!("Patient/{id}/$everything?_type=Organization")).await;
    assert_eq!(status, 400);
    assert_outcome(&body);
    // unit-b is party to none of it: the patient answers as if it did not exist.
    let unit_b = g.token("unit-b").await;
    let (status, body) = g.get(&unit_b, &format!("Patient/{id}/$everything")).await;
    assert_eq!(status, 404);
    assert_outcome(&body);
    g.stop().await;
}

/// `iop-gateway export`, the real binary, against the gateway: kick-off, polls, downloads, every
/// resource validated, the counts as the manifest says; run again, it finds everything already there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_export_command_downloads_validates_and_resumes() {
    let g = Gateway::start_with(FAST).await;
    let data = store_data(&g).await;
    let dir = TempDir::new("export-command");
    let key = dir.0.join("clinic.key.pem");
    std::fs::write(&key, &g.key("clinic").private_pem).unwrap();
    let out = dir.0.join("out");
    let args: Vec<String> = ["export", "--url", &g.base, "--client", "clinic", "--key", key.to_str().unwrap(), "--type", "Patient,Observation", "--out", out.to_str().unwrap(), "--validate"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let run = || {
        let args = args.clone();
        tokio::task::spawn_blocking(move || std::process::Command::new(env!("CARGO_BIN_EXE_iop-gateway")).args(&args).output().unwrap())
    };
    let first = run().await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&first.stdout), String::from_utf8_lossy(&first.stderr));
    assert!(first.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("validated 6 resources: all valid"), "{stdout}\n{stderr}");
    let lines = |name: &str| std::fs::read_to_string(out.join(name)).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(lines("Patient.001.ndjson"), 2);
    assert_eq!(lines("Observation.001.ndjson"), data.observations_p1 + data.observations_p2, "the Part 2 record another party wrote stays out");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
    let counted: u64 = state["manifest"]["output"].as_array().unwrap().iter().map(|o| o["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 6, "the manifest's counts are the lines");
    let again = run().await.unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stderr).matches("(already here)").count(), 2, "{}", String::from_utf8_lossy(&again.stderr));
    // A download cut off mid-line: the command keeps the complete lines and asks for the rest.
    let whole = std::fs::read(out.join("Observation.001.ndjson")).unwrap();
    std::fs::remove_file(out.join("Observation.001.ndjson")).unwrap();
    let cut = whole.iter().position(|b| *b == b'\n').unwrap() + 10;
    std::fs::write(out.join("Observation.001.ndjson.part"), &whole[..cut]).unwrap();
    let resumed = run().await.unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(std::fs::read(out.join("Observation.001.ndjson")).unwrap(), whole);
    // The gateway serves the rest of a file by Range, and says when a range is past its end.
    let url = state["manifest"]["output"].as_array().unwrap().iter().find(|o| o["type"] == "Observation").unwrap()["url"].as_str().unwrap().to_string();
    let token = g.token("clinic").await;
    let part = g.http.get(&url).bearer_auth(&token).header("range", "bytes=5-").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"].to_str().unwrap(), format!("bytes 5-{}/{}", whole.len() - 1, whole.len()));
    assert_eq!(part.bytes().await.unwrap().as_ref(), &whole[5..]);
    let past = g.http.get(&url).bearer_auth(&token).header("range", format!("bytes={}-", whole.len())).send().await.unwrap();
    assert_eq!(past.status(), 416);
    // Another server's export folder is not mixed into this one.
    let other: Vec<String> = args.iter().map(|a| if *a == g.base { "http://127.0.0.1:1".to_string() } else { a.clone() }).collect();
    let refused = tokio::task::spawn_blocking(move || std::process::Command::new(env!("CARGO_BIN_EXE_iop-gateway")).args(&other).output().unwrap()).await.unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("holds another export"));
}
