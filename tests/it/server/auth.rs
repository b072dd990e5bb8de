//! SMART Backend Services and partner authorization: the token endpoint's refusals, 401/403 on FHIR endpoints, the authorization matrix across partners and their data, and the audit trail.

use serde_json::{Value, json};

use iop_gateway::auth::keys::{KeyPair, sign_assertion};

use super::support::{Gateway, assert_outcome, patient, referral};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_refuses_forged_expired_replayed_and_overreaching_requests() {
    let gw = Gateway::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    let url = gw.token_url();
    let error = |r: reqwest::Response| async move { (r.status().as_u16(), r.json::<Value>().await.unwrap()["error"].as_str().unwrap_or_default().to_string()) };

    let forged = sign_assertion(&KeyPair::generate_es384("unit-a-1").unwrap(), "unit-a", &url, "f1", now + 60).unwrap();
    assert_eq!(error(gw.token_response(&forged, "system/Patient.rs").await).await, (401, "invalid_client".into()));
    let expired = sign_assertion(gw.key("unit-a"), "unit-a", &url, "e1", now - 600).unwrap();
    assert_eq!(error(gw.token_response(&expired, "system/Patient.rs").await).await, (401, "invalid_client".into()));
    let too_long = sign_assertion(gw.key("unit-a"), "unit-a", &url, "l1", now + 3600).unwrap();
    assert_eq!(error(gw.token_response(&too_long, "system/Patient.rs").await).await, (401, "invalid_client".into()));
    let wrong_audience = sign_assertion(gw.key("unit-a"), "unit-a", "https://elsewhere/token", "a1", now + 60).unwrap();
    assert_eq!(error(gw.token_response(&wrong_audience, "system/Patient.rs").await).await, (401, "invalid_client".into()));
    let unknown = sign_assertion(gw.key("unit-a"), "nobody", &url, "u1", now + 60).unwrap();
    assert_eq!(error(gw.token_response(&unknown, "system/Patient.rs").await).await, (401, "invalid_client".into()));

    let good = sign_assertion(gw.key("unit-a"), "unit-a", &url, "once", now + 60).unwrap();
    assert_eq!(gw.token_response(&good, "system/Patient.rs").await.status(), 200);
    assert_eq!(error(gw.token_response(&good, "system/Patient.rs").await).await, (401, "invalid_client".into()), "a replayed jti is refused");

    let payer = gw.assertion("payer-x");
    assert_eq!(error(gw.token_response(&payer, "system/Observation.rs").await).await, (400, "invalid_scope".into()));
    assert_eq!(error(gw.token_response(&gw.assertion("unit-a"), "user/Patient.read").await).await, (400, "invalid_scope".into()));
    let v1 = gw.token_response(&gw.assertion("unit-a"), "system/ServiceRequest.read system/Claim.write").await;
    let granted: Value = v1.json().await.unwrap();
    assert_eq!(granted["scope"], "system/ServiceRequest.rs");
    assert_eq!(granted["token_type"], "bearer");
    assert!(granted["expires_in"].as_i64().unwrap() <= 300);
    let form = gw.http.post(&url).form(&[("grant_type", "password")]).send().await.unwrap();
    assert_eq!(form.status(), 400);
    let metrics = gw.http.get(gw.url("metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("iop_token_denials_total{reason=\"invalid_client\"} 6"), "{metrics}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_grants_what_it_may_of_what_was_asked_and_says_so() {
    let gw = Gateway::start().await;
    let grant = |scope: Option<&'static str>| {
        let assertion = gw.assertion("unit-a");
        let url = gw.token_url();
        let http = gw.http.clone();
        async move {
            let mut form = vec![("grant_type", "client_credentials"), ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")];
            form.push(("client_assertion", assertion.as_str()));
            if let Some(scope) = scope {
                form.push(("scope", scope));
            }
            let response = http.post(&url).form(&form).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    // Python fhirclient adds launch/patient; other kinds and unknown types are left out, the rest granted.
    let (status, granted) = grant(Some("launch/patient openid system/Foo.read system/ServiceRequest.read")).await;
    assert_eq!((status, granted["scope"].as_str()), (200, Some("system/ServiceRequest.rs")), "{granted}");
    // Medplum's JWT assertion login sends no scope: the client's registered scopes.
    let (status, registered) = grant(None).await;
    assert_eq!(status, 200, "{registered}");
    assert!(registered["scope"].as_str().unwrap().contains("system/ServiceRequest."), "{registered}");
    assert!(!registered["scope"].as_str().unwrap().contains("Foo"));
    // Nothing grantable is still invalid_scope.
    let (status, refused) = grant(Some("system/Foo.read launch/patient")).await;
    assert_eq!((status, refused["error"].as_str()), (400, Some("invalid_scope")), "{refused}");

    // A bad token is invalid_token in the challenge; no token at all is a bare challenge.
    let bad = gw.http.get(gw.url("Patient")).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(bad.status(), 401);
    let challenge = bad.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Bearer ") && challenge.contains("error=\"invalid_token\""), "{challenge}");
    let none = gw.http.get(gw.url("Patient")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert!(!none.headers()["www-authenticate"].to_str().unwrap().contains("error="));

    // Discovery as SMART 2 and older clients read it.
    let smart: Value = gw.http.get(gw.url(".well-known/smart-configuration")).send().await.unwrap().json().await.unwrap();
    assert_eq!(smart["code_challenge_methods_supported"], json!([]));
    let metadata: Value = gw.http.get(gw.url("metadata")).send().await.unwrap().json().await.unwrap();
    let oauth = metadata["rest"][0]["security"]["extension"].as_array().unwrap().iter().find(|e| e["url"].as_str().unwrap().ends_with("/oauth-uris")).cloned().expect("oauth-uris");
    let uri = |name: &str| oauth["extension"].as_array().unwrap().iter().find(|e| e["url"] == name).map(|e| e["valueUri"].as_str().unwrap().to_string());
    assert_eq!(uri("token"), Some(gw.token_url()));
    let authorize = gw.http.get(uri("authorize").expect("authorize, which the extension requires")).send().await.unwrap();
    assert_eq!(authorize.status(), 400);
    assert_eq!(authorize.json::<Value>().await.unwrap()["error"], "unsupported_response_type");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs384_client_keys_are_accepted() {
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let pair = KeyPair::from_pem(&rsa.serialize_pem(), "rsa-1").unwrap();
    assert_eq!(pair.algorithm, jsonwebtoken::Algorithm::RS384);
    let dir = super::support::TempDir::new("rsa");
    let mut keys = super::support::partner_keys();
    keys[0].1 = pair;
    let text = super::support::config_text(&dir.0, &keys, "");
    let gw = Gateway::start_loaded(super::support::load(&text, &dir.0), keys, dir).await;
    let token = gw.token("unit-a").await;
    assert_eq!(gw.get(&token, "Patient").await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_endpoints_need_a_valid_token_and_the_right_scope() {
    let gw = Gateway::start().await;
    let (status, body) = {
        let r = gw.http.get(gw.url("Patient")).send().await.unwrap();
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 401);
    assert_outcome(&body);
    assert_eq!(gw.get("not-a-token", "Patient").await.0, 401);
    let read_only = gw.token_for("unit-a", "system/Patient.rs").await;
    assert_eq!(gw.get(&read_only, "Patient").await.0, 200);
    let (status, body) = gw.post(&read_only, "Patient", &patient("MRN-RO")).await;
    assert_eq!(status, 403);
    assert_outcome(&body);
    assert_eq!(gw.get(&read_only, "Task").await.0, 403);
    gw.stop().await;
}

/// Who sees what: each partner × endpoint × own/other partner's data → status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_across_partners() {
    let gw = Gateway::start().await;
    let mut tokens = std::collections::HashMap::new();
    for client in ["unit-a", "unit-b", "payer-x", "payer-y", "clinic", "ops"] {
        tokens.insert(client, gw.token(client).await);
    }
    // unit-a refers a client; the program answers with a Task addressed to unit-a; the program asks payer-x for authorization.
    let (status, tx) = gw.post(&tokens["unit-a"], "", &referral("MRN-M")).await;
    assert_eq!(status, 200, "{tx}");
    let patient_ref = format!("Patient/{}", tx["entry"][0]["resource"]["id"].as_str().unwrap());
    let sr_ref = format!("ServiceRequest/{}", tx["entry"][1]["resource"]["id"].as_str().unwrap());
    let reply = json!({"resourceType": "Task", "status": "accepted", "intent": "order", "basedOn": [{"reference": sr_ref}],
        "for": {"reference": patient_ref}, "owner": {"reference": "Organization/unit-a"}});
    let (status, reply) = gw.post(&tokens["clinic"], "Task", &reply).await;
    assert_eq!(status, 201);
    let reply_ref = format!("Task/{}", reply["id"].as_str().unwrap());
    let claim = json!({"resourceType": "Claim", "status": "active", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "preauthorization", "patient": {"reference": patient_ref}, "created": "2026-03-02", "insurer": {"reference": "Organization/payer-x"},
        "provider": {"reference": "Organization/iop-program"}, "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": "Coverage on file"}}]});
    let (status, claim) = gw.post(&tokens["clinic"], "Claim", &claim).await;
    assert_eq!(status, 201, "{claim}");
    let claim_ref = format!("Claim/{}", claim["id"].as_str().unwrap());

    let matrix: &[(&str, &str, u16)] = &[
        ("unit-a", &sr_ref, 200),
        ("unit-a", &patient_ref, 200),
        ("unit-a", &reply_ref, 200),
        ("unit-a", &claim_ref, 403),
        ("unit-b", &sr_ref, 404),
        ("unit-b", &patient_ref, 404),
        ("unit-b", &reply_ref, 404),
        ("payer-x", &claim_ref, 200),
        ("payer-x", &sr_ref, 403),
        ("payer-y", &claim_ref, 404),
        ("clinic", &sr_ref, 200),
        ("clinic", &claim_ref, 200),
        ("ops", &sr_ref, 403),
        ("ops", &claim_ref, 403),
    ];
    for (client, path, expected) in matrix {
        let (status, body) = gw.get(&tokens[client], path).await;
        assert_eq!(status, *expected, "{client} GET {path}: {body}");
        if status >= 400 {
            assert_outcome(&body);
        }
    }
    let searches: &[(&str, &str, u16, usize)] = &[
        ("unit-a", "ServiceRequest", 200, 1),
        ("unit-b", "ServiceRequest", 200, 0),
        ("unit-a", "Task", 200, 2),
        ("unit-b", "Task", 200, 0),
        ("payer-x", "Claim", 200, 1),
        ("payer-y", "Claim", 200, 0),
        ("clinic", "Task", 200, 2),
        ("ops", "AuditEvent", 200, usize::MAX),
        ("unit-a", "AuditEvent", 403, 0),
        ("clinic", "AuditEvent", 403, 0),
    ];
    for (client, path, expected, count) in searches {
        let (status, body) = gw.get(&tokens[client], path).await;
        assert_eq!(status, *expected, "{client} GET {path}: {body}");
        if status == 200 && *count != usize::MAX {
            assert_eq!(body["total"], *count as u64, "{client} GET {path}: {body}");
        }
    }
    // Writes to another partner's resource do not reveal it (the answer to a free id: partners do not choose ids); writes to one's own succeed.
    let mut sr = gw.get(&tokens["unit-a"], &sr_ref).await.1;
    sr["priority"] = json!("routine");
    assert_eq!(gw.put(&tokens["unit-b"], &sr_ref, &sr).await.0, 405);
    assert_eq!(gw.put(&tokens["unit-a"], &sr_ref, &sr).await.0, 200);
    // Including a resource the caller may not see leaves it out.
    let (_, tasks) = gw.get(&tokens["payer-x"], "Task?_include=Task:based-on").await;
    assert!(tasks.get("entry").is_none(), "{tasks}");

    // Denials are audited, and the admin can find them.
    let (status, audit) = gw.get(&tokens["ops"], "AuditEvent?altid=unit-b&outcome=4").await;
    assert_eq!(status, 200);
    assert!(audit["total"].as_u64().unwrap() >= 3, "{audit}");
    let (_, reads) = gw.get(&tokens["ops"], &format!("AuditEvent?entity={sr_ref}&subtype=read")).await;
    assert!(reads["total"].as_u64().unwrap() >= 3, "{reads}");
    let event = &reads["entry"][0]["resource"];
    assert_eq!(event["resourceType"], "AuditEvent");
    let event_id = event["id"].as_str().unwrap();
    assert_eq!(gw.get(&tokens["ops"], &format!("AuditEvent/{event_id}")).await.0, 200);
    let (_, today) = gw.get(&tokens["ops"], "AuditEvent?date=ge2000-01-01&_count=1").await;
    assert_eq!(today["entry"].as_array().unwrap().len(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part2_records_reach_only_their_author_or_consented_clients() {
    let gw = Gateway::start().await;
    let unit = gw.token("unit-a").await;
    let clinic = gw.token("clinic").await;
    let mut sud = json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, "code": {"text": "Alcohol use disorder"}});
    sud["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}]});
    let (status, created) = gw.post(&unit, "Condition", &sud).await;
    assert_eq!(status, 201, "{created}");
    let path = format!("Condition/{}", created["id"].as_str().unwrap());
    assert_eq!(gw.get(&unit, &path).await.0, 200);
    assert_eq!(gw.get(&clinic, &path).await.0, 404);
    assert_eq!(gw.get(&clinic, "Condition").await.1.get("entry"), None);
    gw.stop().await;
}
