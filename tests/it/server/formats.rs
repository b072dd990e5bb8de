//! FHIR XML and JSON over a real socket (`_format`, `Accept` with q-values, XML bodies on every write, one 406 for what cannot be produced), and links made from the address the client used.

use std::sync::OnceLock;

use iop_gateway::definitions::Definitions;
use serde_json::{Value, json};

use super::support::{Gateway, TempDir, assert_outcome, config_text, load, partner_keys, patient, referral};

const XML: &str = "application/fhir+xml";

fn definitions() -> &'static Definitions {
    static DEFINITIONS: OnceLock<std::sync::Arc<Definitions>> = OnceLock::new();
    DEFINITIONS.get_or_init(Definitions::base)
}

/// Reads an XML body with the gateway's own reader, which must find nothing wrong with it.
fn from_xml(text: &str) -> Value {
    let (json, issues) = iop_gateway::xml::parse_resource(text.as_bytes(), definitions()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(issues.is_empty(), "{issues:?}\n{text}");
    serde_json::from_str(&json.to_string_compact()).unwrap()
}

fn to_xml(value: &Value) -> String {
    iop_gateway::xml::write_resource(&iop_gateway::json::Json::from(value), definitions()).expect("a resource")
}

/// A request with optional `Accept`, XML body and `Host`; answers status, content type and body text.
async fn call(gw: &Gateway, method: reqwest::Method, token: Option<&str>, path: &str, accept: Option<&str>, xml_body: Option<String>) -> (u16, String, String) {
    let mut request = gw.http.request(method, gw.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    if let Some(body) = xml_body {
        request = request.header("content-type", XML).body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (status, content_type, response.text().await.unwrap())
}

fn assert_xml(content_type: &str, body: &str) -> Value {
    assert!(content_type.starts_with(XML), "{content_type}: {body}");
    from_xml(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_searches_and_errors_come_in_the_format_asked_for() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let (status, created) = gw.post(&token, "Patient", &patient("MRN-XML-1")).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (_, as_json) = gw.get(&token, &format!("Patient/{id}")).await;
    let get = reqwest::Method::GET;
    let (status, content_type, body) = call(&gw, get.clone(), Some(&token), &format!("Patient/{id}"), Some(XML), None).await;
    assert_eq!(status, 200);
    assert_eq!(assert_xml(&content_type, &body), as_json, "the XML read is the JSON read");
    for (path, accept) in [(format!("Patient/{id}?_format=xml"), None), (format!("Patient/{id}/_history/1"), Some("application/xml")), (format!("Patient/{id}?_format=application/fhir%2Bxml"), Some("application/fhir+json"))] {
        let (status, content_type, body) = call(&gw, get.clone(), Some(&token), &path, accept, None).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(assert_xml(&content_type, &body)["id"], json!(id), "{path}");
    }
    let (status, content_type, body) = call(&gw, get.clone(), Some(&token), "Patient?identifier=MRN-XML-1&_format=xml", None, None).await;
    assert_eq!(status, 200);
    let bundle = assert_xml(&content_type, &body);
    assert_eq!((bundle["type"].as_str(), bundle["total"].as_u64()), (Some("searchset"), Some(1)));
    assert_eq!(bundle["entry"][0]["resource"], as_json);
    assert!(bundle["link"][0]["url"].as_str().unwrap().contains("_format=xml"), "paging links keep the format: {bundle}");
    let (_, content_type, body) = call(&gw, get.clone(), Some(&token), &format!("Patient/{id}/_history"), Some(XML), None).await;
    assert_eq!(assert_xml(&content_type, &body)["type"], "history");
    // Errors are OperationOutcomes in the format asked for, whoever refuses.
    for (token, path, expected) in [(Some(token.as_str()), "Patient/unknown", 404), (None, "Patient", 401), (Some(token.as_str()), "Observation?_sort=body", 400), (Some(token.as_str()), "Frobnicator", 404)] {
        let (status, content_type, body) = call(&gw, get.clone(), token, path, Some(XML), None).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert_outcome(&assert_xml(&content_type, &body));
    }
    // q-values choose; `_format` wins over Accept; what cannot be produced never wins.
    for (accept, xml) in [
        ("application/fhir+xml;q=0.5, application/fhir+json;q=0.9", false),
        ("application/fhir+json;q=0, application/fhir+xml", true),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", true),
        ("application/fhir+json; fhirVersion=4.0", false),
        ("application/fhir+xml; fhirVersion=4.0, application/fhir+json; fhirVersion=3.0", true),
        ("text/turtle, */*;q=0.1", false),
    ] {
        let (status, content_type, _) = call(&gw, get.clone(), Some(&token), &format!("Patient/{id}"), Some(accept), None).await;
        assert_eq!(status, 200, "{accept}");
        assert_eq!(content_type.starts_with(XML), xml, "{accept}: {content_type}");
        assert!(xml || content_type.starts_with("application/fhir+json"), "{accept}: {content_type}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_takes_an_xml_body() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let post = reqwest::Method::POST;
    // Create: answered in JSON unless asked otherwise.
    let (status, content_type, body) = call(&gw, post.clone(), Some(&token), "Patient", None, Some(to_xml(&patient("MRN-XML-2")))).await;
    assert_eq!(status, 201, "{body}");
    assert!(content_type.starts_with("application/fhir+json"), "{content_type}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["identifier"][0]["value"], "MRN-XML-2");
    // Update, answered in XML.
    let mut changed = created.clone();
    changed["gender"] = json!("female");
    let (status, content_type, body) = call(&gw, reqwest::Method::PUT, Some(&token), &format!("Patient/{id}"), Some(XML), Some(to_xml(&changed))).await;
    assert_eq!(status, 200, "{body}");
    let updated = assert_xml(&content_type, &body);
    assert_eq!((updated["gender"].as_str(), updated["meta"]["versionId"].as_str()), (Some("female"), Some("2")));
    // Conditional create and conditional update find it.
    let (status, _, body) = call(&gw, post.clone(), Some(&token), "Patient?identifier=MRN-XML-2", None, Some(to_xml(&patient("MRN-XML-2")))).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = call(&gw, reqwest::Method::PUT, Some(&token), "Patient?identifier=MRN-XML-2", None, Some(to_xml(&changed))).await;
    assert_eq!(status, 200, "{body}");
    // A transaction.
    let (status, content_type, body) = call(&gw, post.clone(), Some(&token), "", Some(XML), Some(to_xml(&referral("MRN-XML-3")))).await;
    assert_eq!(status, 200, "{body}");
    let response = assert_xml(&content_type, &body);
    assert_eq!(response["type"], "transaction-response");
    assert!(response["entry"].as_array().unwrap().iter().all(|e| e["response"]["status"] == "201 Created"), "{response}");
    // $validate: the report in XML, with problems only XML can have; a write refuses them (422).
    let scrambled = to_xml(&patient("MRN-XML-4")).replacen("<gender value=\"other\"/>", "", 1).replacen("<identifier>", "<gender value=\"other\"/><identifier>", 1);
    let (status, content_type, body) = call(&gw, post.clone(), Some(&token), "Patient/$validate", Some(XML), Some(scrambled.clone())).await;
    assert_eq!(status, 200, "{body}");
    let report = assert_xml(&content_type, &body);
    assert!(report["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error" && i["details"]["text"].as_str().is_some_and(|d| d.contains("out of order"))), "{report}");
    let (status, _, body) = call(&gw, post.clone(), Some(&token), "Patient", None, Some(scrambled)).await;
    assert_eq!(status, 422, "{body}");
    let (status, _, body) = call(&gw, post.clone(), Some(&token), "Patient/$validate", None, Some(to_xml(&patient("MRN-XML-5")))).await;
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&body).unwrap();
    assert!(!report["issue"].as_array().unwrap().iter().any(|i| i["severity"] == "error"), "{report}");
    // A FHIR message.
    let message = json!({"resourceType": "Bundle", "id": "msg-xml-1", "type": "message", "timestamp": "2026-03-01T10:00:00Z", "entry": [
        {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-0000000000a1", "resource": {"resourceType": "MessageHeader", "id": "hdr-xml-1",
            "eventCoding": {"system": "http://hl7.org/fhir/us/bser/CodeSystem/bser-event", "code": "bser-referral-request"},
            "source": {"endpoint": "https://unit-a.example/fhir"},
            "focus": [{"reference": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-0000000000a2"}]}},
        {"fullUrl": "urn:uuid:6a1f0d64-8a55-4a63-9b1c-0000000000a2", "resource": patient("MRN-XML-6")}
    ]});
    let unit = gw.token("unit-a").await;
    let (status, content_type, body) = call(&gw, post.clone(), Some(&unit), "$process-message", Some(XML), Some(to_xml(&message))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(assert_xml(&content_type, &body)["type"], "message");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_statement_lists_exactly_the_formats_and_406_is_the_same_everywhere() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let get = reqwest::Method::GET;
    let (status, _, body) = call(&gw, get.clone(), None, "metadata", None, None).await;
    assert_eq!(status, 200);
    let statement: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(statement["format"], json!(["application/fhir+json", "json", "application/fhir+xml", "xml"]));
    let (status, content_type, body) = call(&gw, get.clone(), None, "metadata", Some(XML), None).await;
    assert_eq!(status, 200);
    let in_xml = assert_xml(&content_type, &body);
    assert_eq!((in_xml["format"].clone(), in_xml["rest"].clone()), (statement["format"].clone(), statement["rest"].clone()));
    // Each format the statement names can be asked for.
    for format in statement["format"].as_array().unwrap() {
        let path = format!("metadata?_format={}", format.as_str().unwrap().replace('+', "%2B"));
        let (status, content_type, _) = call(&gw, get.clone(), None, &path, None, None).await;
        assert_eq!(status, 200, "{path}");
        assert!(content_type.starts_with(if format.as_str().unwrap().contains("xml") { XML } else { "application/fhir+json" }), "{path}: {content_type}");
    }
    let refusals: &[(&str, Option<&str>)] = &[
        ("?_format=turtle", None),
        ("?_format=application/fhir%2Bjson;fhirVersion=3.0", None),
        ("", Some("text/turtle")),
        ("", Some("application/fhir+json; fhirVersion=3.0")),
        ("", Some("application/fhir+xml; fhirVersion=5.0, application/fhir+json;q=0")),
    ];
    for path in ["metadata", "Patient", "Patient/x", "Patient/x/_history", "Patient/$validate", ""] {
        for (query, accept) in refusals {
            let method = if path.ends_with("$validate") || path.is_empty() { reqwest::Method::POST } else { get.clone() };
            let (status, content_type, body) = call(&gw, method, Some(&token), &format!("{path}{query}"), *accept, Some(to_xml(&patient("MRN-406")))).await;
            assert_eq!(status, 406, "{path}{query} {accept:?}: {body}");
            assert!(content_type.starts_with("application/fhir+json"), "{content_type}");
            assert_outcome(&serde_json::from_str(&body).unwrap());
        }
    }
    // SMART discovery is JSON by its own specification, whatever is asked.
    let (status, content_type, _) = call(&gw, get.clone(), None, ".well-known/smart-configuration", Some(XML), None).await;
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    gw.stop().await;
}

/// A GET with a chosen `Host` and extra headers; answers status, headers and JSON body.
async fn get_as(gw: &Gateway, token: Option<&str>, path: &str, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = gw.http.get(gw.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap_or(Value::Null))
}

/// The links a search answers with, and the discovery document's token endpoint, for a request with these headers.
async fn links(gw: &Gateway, token: &str, headers: &[(&str, &str)]) -> (String, String, String) {
    let (status, _, bundle) = get_as(gw, Some(token), "Patient?identifier=MRN-LINK", headers).await;
    assert_eq!(status, 200, "{bundle}");
    let (_, _, smart) = get_as(gw, None, ".well-known/smart-configuration", headers).await;
    (bundle["link"][0]["url"].as_str().unwrap().to_string(), bundle["entry"][0]["fullUrl"].as_str().unwrap().to_string(), smart["token_endpoint"].as_str().unwrap().to_string())
}

fn port(gw: &Gateway) -> u16 {
    gw.running.as_ref().unwrap().local_addr.port()
}

/// Posts an assertion of `clinic` signed for `audience` to the token endpoint (at the address the
/// gateway listens on), with extra headers such as `Host`.
async fn token_request(gw: &Gateway, audience: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let now = jsonwebtoken::get_current_timestamp();
    let assertion = iop_gateway::auth::keys::sign_assertion(gw.key("clinic"), "clinic", audience, &uuid::Uuid::new_v4().to_string(), now + 120).unwrap();
    let mut request = gw.http.post(format!("http://127.0.0.1:{}/auth/token", port(gw))).form(&iop_gateway::auth::token_request_form(&assertion, "system/*.cruds"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn token_status(gw: &Gateway, audience: &str, headers: &[(&str, &str)]) -> u16 {
    token_request(gw, audience, headers).await.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_follow_the_host_the_client_used_and_untrusted_forwarding_is_ignored() {
    let gw = Gateway::start().await;
    let token = gw.token("clinic").await;
    let port = port(&gw);
    let localhost = format!("localhost:{port}");
    let response = gw.http.post(gw.url("Patient")).bearer_auth(&token).header("host", &localhost).header("content-type", "application/fhir+json").body(patient("MRN-LINK").to_string()).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&format!("http://localhost:{port}/Patient/")), "{location}");
    let (link, full_url, token_endpoint) = links(&gw, &token, &[("host", &localhost)]).await;
    assert!(link.starts_with(&format!("http://localhost:{port}/Patient?")), "{link}");
    assert!(full_url.starts_with(&format!("http://localhost:{port}/Patient/")), "{full_url}");
    assert_eq!(token_endpoint, format!("http://localhost:{port}/auth/token"));
    let (_, _, statement) = get_as(&gw, None, "metadata", &[("host", &localhost)]).await;
    assert!(statement.to_string().contains(&format!("\"valueUri\":\"http://localhost:{port}/auth/token\"")), "{statement}");
    // Forwarding headers from a peer that is not a trusted proxy change nothing.
    let forged = [("host", localhost.as_str()), ("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "https"), ("x-forwarded-prefix", "/x"), ("forwarded", "proto=https;host=evil.example")];
    let (link, _, token_endpoint) = links(&gw, &token, &forged).await;
    assert!(link.starts_with(&format!("http://localhost:{port}/")) && token_endpoint.starts_with(&format!("http://localhost:{port}/")), "{link} {token_endpoint}");
    // A Host that is not a plain host[:port] falls back to the address the connection reached.
    let (link, _, _) = links(&gw, &token, &[("host", "user@evil.example")]).await;
    assert!(link.starts_with(&format!("http://127.0.0.1:{port}/")), "{link}");
    // The token audience: the bound address and what the connection reached, never a name the client wrote.
    assert_eq!(token_status(&gw, &format!("http://localhost:{port}/auth/token"), &[("host", &localhost)]).await, 200);
    assert_eq!(token_status(&gw, &format!("http://127.0.0.1:{port}/auth/token"), &[("host", &localhost)]).await, 200);
    assert_eq!(token_status(&gw, &format!("http://evil.example:{port}/auth/token"), &[("host", &format!("evil.example:{port}"))]).await, 401);
    let other_port = format!("localhost:{}", port.wrapping_add(1));
    assert_eq!(token_status(&gw, &format!("http://{other_port}/auth/token"), &[("host", &other_port)]).await, 401);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_believed_and_a_configured_base_url_wins() {
    let gw = Gateway::start_with("trusted_proxies = [\"127.0.0.0/8\"]").await;
    let token = gw.token("clinic").await;
    gw.post(&token, "Patient", &patient("MRN-LINK")).await;
    let (link, full_url, token_endpoint) = links(&gw, &token, &[("x-forwarded-proto", "https"), ("x-forwarded-host", "fhir.example"), ("x-forwarded-prefix", "/r4/")]).await;
    assert!(link.starts_with("https://fhir.example/r4/Patient?") && full_url.starts_with("https://fhir.example/r4/Patient/"), "{link} {full_url}");
    assert_eq!(token_endpoint, "https://fhir.example/r4/auth/token");
    let (link, _, _) = links(&gw, &token, &[("forwarded", "for=192.0.2.60;proto=https;host=\"gw.example:8443\"")]).await;
    assert!(link.starts_with("https://gw.example:8443/Patient?"), "{link}");
    // A forwarded name is believed for links, not as a token audience (see ARCHITECTURE.md).
    let forwarded = [("x-forwarded-proto", "https"), ("x-forwarded-host", "fhir.example"), ("x-forwarded-prefix", "/r4")];
    assert_eq!(token_status(&gw, "https://fhir.example/r4/auth/token", &forwarded).await, 401);
    assert_eq!(token_status(&gw, &format!("http://127.0.0.1:{}/auth/token", port(&gw)), &forwarded).await, 200);
    gw.stop().await;

    let gw = Gateway::start_with("base_url = \"https://configured.example/fhir\"\ntrusted_proxies = [\"127.0.0.1\"]").await;
    let port = port(&gw);
    let direct = |path: &str| format!("http://127.0.0.1:{port}/{path}");
    let response = token_request(&gw, "https://configured.example/fhir/auth/token", &[]).await;
    assert_eq!(response.status(), 200);
    let token = response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_string();
    let created = gw.http.post(direct("Patient")).bearer_auth(&token).header("host", format!("localhost:{port}")).header("content-type", "application/fhir+json").body(patient("MRN-LINK").to_string()).send().await.unwrap();
    assert!(created.headers()["location"].to_str().unwrap().starts_with("https://configured.example/fhir/Patient/"));
    let bundle: Value = gw.http.get(direct("Patient?identifier=MRN-LINK")).bearer_auth(&token).header("host", format!("localhost:{port}")).header("x-forwarded-host", "fhir.example").send().await.unwrap().json().await.unwrap();
    assert!(bundle["link"][0]["url"].as_str().unwrap().starts_with("https://configured.example/fhir/Patient?"), "{bundle}");
    // With a configured base, its token URL is the one audience.
    assert_eq!(token_status(&gw, &format!("http://localhost:{port}/auth/token"), &[("host", &format!("localhost:{port}"))]).await, 401);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_wildcard_address_links_never_name_the_wildcard() {
    let dir = TempDir::new("wildcard");
    let keys = partner_keys();
    let text = config_text(&dir.0, &keys, "allow_plain_http = true").replacen("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"", 1);
    let loaded = load(&text, &dir.0);
    assert!(loaded.base_url_warning().is_some());
    let mut gw = Gateway::start_loaded(loaded, keys, dir).await;
    let port = port(&gw);
    gw.base = format!("http://127.0.0.1:{port}");
    let token = gw.token("clinic").await;
    gw.post(&token, "Patient", &patient("MRN-LINK")).await;
    let (link, _, token_endpoint) = links(&gw, &token, &[("host", &format!("localhost:{port}"))]).await;
    assert!(link.starts_with(&format!("http://localhost:{port}/")), "{link}");
    assert_eq!(token_endpoint, format!("http://localhost:{port}/auth/token"));
    // An HTTP/1.0 request without Host gets the address its connection reached.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket.write_all(b"GET /.well-known/smart-configuration HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), socket.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.contains(&format!("\"token_endpoint\":\"http://127.0.0.1:{port}/auth/token\"")), "{answer}");
    assert!(!answer.contains("0.0.0.0"), "{answer}");
    gw.stop().await;
}
