//! Partners' keys at the real token endpoint: assertions naming their key by RFC 7638 thumbprint or by no `kid`, and keys published at a JWKS URL (a wiremock server as the partner): rotation, a flood of unknown key ids, and the URL going down.

use std::time::Duration;

use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use iop_gateway::auth::keys::{KeyPair, sign_assertion, thumbprint};

use super::support::{Gateway, TempDir, config_text, load, partner_keys};

/// A client assertion of `client` signed with `pair`, whose header names `kid` (or no key).
fn assertion(pair: &KeyPair, client: &str, token_url: &str, kid: Option<&str>) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({"iss": client, "sub": client, "aud": token_url, "exp": now + 120, "jti": uuid::Uuid::new_v4().to_string()});
    let mut header = jsonwebtoken::Header::new(pair.algorithm);
    header.kid = kid.map(str::to_string);
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pair.private_pem.as_bytes()).unwrap()).unwrap()
}

async fn status_of(gw: &Gateway, assertion: &str) -> u16 {
    gw.token_response(assertion, "system/Patient.rs").await.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_named_by_its_thumbprint_or_by_no_kid_is_accepted() {
    let gw = Gateway::start().await;
    let url = gw.token_url();
    let key = gw.key("unit-a");
    assert_eq!(key.kid, "unit-a-1", "registered under another key id than its thumbprint");
    let print = thumbprint(&key.public_jwk().unwrap()).unwrap();
    assert_eq!(status_of(&gw, &assertion(key, "unit-a", &url, Some(&print))).await, 200, "kid = the RFC 7638 thumbprint of a registered key");
    assert_eq!(status_of(&gw, &assertion(key, "unit-a", &url, None)).await, 200, "no kid: the client's keys are tried");
    assert_eq!(status_of(&gw, &assertion(key, "unit-a", &url, Some("unit-a-1"))).await, 200);
    assert_eq!(status_of(&gw, &assertion(key, "unit-a", &url, Some("no-such-key"))).await, 401, "a kid naming none of the client's keys");
    let other = thumbprint(&gw.key("unit-b").public_jwk().unwrap()).unwrap();
    assert_eq!(status_of(&gw, &assertion(key, "unit-a", &url, Some(&other))).await, 401, "another client's key is not unit-a's");
    gw.stop().await;
}

/// A gateway whose client `remote` publishes its keys at `jwks_url`; `auth` holds `[auth]` keys.
async fn gateway_with_published_keys(jwks_url: &str, auth: &str) -> Gateway {
    let dir = TempDir::new("jwks-url");
    let keys = partner_keys();
    let mut text = config_text(&dir.0, &keys, "");
    text.push_str(&format!("[[clients]]\nid = \"remote\"\nrole = \"inpatient-unit\"\njwks_url = \"{jwks_url}\"\n[auth]\n{auth}\n"));
    Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
}

fn jwks(pairs: &[&KeyPair]) -> String {
    let keys: Vec<Value> = pairs.iter().map(|p| serde_json::to_value(p.public_jwk().unwrap()).unwrap()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

async fn publish(server: &MockServer, body: String, cache_control: &str) {
    server.reset().await;
    Mock::given(method("GET")).and(path("/jwks")).respond_with(ResponseTemplate::new(200).insert_header("cache-control", cache_control).set_body_string(body)).mount(server).await;
}

async fn fetches(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_accepted_once_the_published_set_names_it() {
    let partner = MockServer::start().await;
    let first = KeyPair::generate_thumbprinted().unwrap();
    let second = KeyPair::generate_thumbprinted().unwrap();
    publish(&partner, jwks(&[&first]), "max-age=3600").await;
    let gw = gateway_with_published_keys(&format!("{}/jwks", partner.uri()), "jwks_refresh_min_secs = 1").await;
    let url = gw.token_url();
    assert_eq!(status_of(&gw, &assertion(&first, "remote", &url, Some(&first.kid))).await, 200);
    assert_eq!(status_of(&gw, &assertion(&first, "remote", &url, Some(&first.kid))).await, 200);
    assert_eq!(fetches(&partner).await, 1, "the set is cached for its max-age");

    // The partner rotates: the new key appears in its set; an assertion naming it makes the gateway look again.
    publish(&partner, jwks(&[&first, &second]), "max-age=3600").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status_of(&gw, &assertion(&second, "remote", &url, Some(&second.kid))).await, 200, "the new kid after a refresh");
    assert_eq!(fetches(&partner).await, 1);
    assert_eq!(status_of(&gw, &assertion(&second, "remote", &url, None)).await, 200);
    assert_eq!(status_of(&gw, &assertion(&first, "remote", &url, Some(&first.kid))).await, 200, "the old key while it is still published");
    assert_eq!(fetches(&partner).await, 1, "known kids need no fetch");
    let token: Value = gw.token_response(&assertion(&second, "remote", &url, Some(&second.kid)), "system/Patient.rs").await.json().await.unwrap();
    assert_eq!(gw.get(token["access_token"].as_str().unwrap(), "Patient").await.0, 200, "its token works");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_kids_fetches_the_set_at_most_once_per_interval() {
    let partner = MockServer::start().await;
    let key = KeyPair::generate_thumbprinted().unwrap();
    publish(&partner, jwks(&[&key]), "max-age=3600").await;
    let gw = gateway_with_published_keys(&format!("{}/jwks", partner.uri()), "jwks_refresh_min_secs = 600\njwks_cache_secs = 3600").await;
    let url = gw.token_url();
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200);
    // Two waves of concurrent assertions, each within the anonymous budget (32 at once).
    for wave in 0..2 {
        let mut flood = tokio::task::JoinSet::new();
        for n in 0..25 {
            let (http, url, assertion) = (gw.http.clone(), url.clone(), assertion(&key, "remote", &url, Some(&format!("made-up-{wave}-{n}"))));
            flood.spawn(async move { http.post(&url).form(&iop_gateway::auth::token_request_form(&assertion, "system/Patient.rs")).send().await.unwrap().status().as_u16() });
        }
        while let Some(status) = flood.join_next().await {
            assert_eq!(status.unwrap(), 401, "a kid the published set does not name is refused");
        }
    }
    assert_eq!(fetches(&partner).await, 1, "no fetch within jwks_refresh_min_secs of the last one");
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200, "the real key still works");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_work_while_the_jwks_url_is_down() {
    let partner = MockServer::start().await;
    let key = KeyPair::generate_thumbprinted().unwrap();
    // max-age=0 is raised to jwks_refresh_min_secs: the set goes stale after a second.
    publish(&partner, jwks(&[&key]), "no-cache").await;
    let jwks_url = format!("{}/jwks", partner.uri());
    let gw = gateway_with_published_keys(&jwks_url, "jwks_refresh_min_secs = 1").await;
    let url = gw.token_url();
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200);
    assert_eq!(fetches(&partner).await, 1);

    partner.reset().await;
    Mock::given(method("GET")).and(path("/jwks")).respond_with(ResponseTemplate::new(503)).mount(&partner).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200, "a failing URL: the cached keys");
    assert_eq!(fetches(&partner).await, 1, "the stale set was asked for again");
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200);
    assert_eq!(fetches(&partner).await, 1, "and not again within jwks_refresh_min_secs");

    drop(partner);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 200, "a URL that does not answer at all: the cached keys");
    assert_eq!(status_of(&gw, &assertion(&KeyPair::generate_thumbprinted().unwrap(), "remote", &url, None)).await, 401, "other keys still fail");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_url_never_answered_is_refused_like_a_wrong_key() {
    let partner = MockServer::start().await;
    Mock::given(method("GET")).and(path("/jwks")).respond_with(ResponseTemplate::new(404)).mount(&partner).await;
    let gw = gateway_with_published_keys(&format!("{}/jwks", partner.uri()), "jwks_refresh_min_secs = 600\njwks_cache_secs = 600").await;
    let key = KeyPair::generate_thumbprinted().unwrap();
    let url = gw.token_url();
    let response = gw.token_response(&assertion(&key, "remote", &url, Some(&key.kid)), "system/Patient.rs").await;
    assert_eq!(response.status(), 401);
    let unknown = gw.token_response(&sign_assertion(&key, "nobody", &url, "j", jsonwebtoken::get_current_timestamp() + 60).unwrap(), "system/Patient.rs").await;
    let (a, b): (Value, Value) = (response.json().await.unwrap(), unknown.json().await.unwrap());
    assert_eq!(a, b, "the same answer as for a client that does not exist");
    assert_eq!(status_of(&gw, &assertion(&key, "remote", &url, Some(&key.kid))).await, 401);
    assert_eq!(fetches(&partner).await, 1, "a failed fetch is not repeated within jwks_refresh_min_secs");
    gw.stop().await;
}

fn cli(cwd: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_iop-gateway")).current_dir(cwd).args(args).output().expect("run iop-gateway");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `clients add --config ../site/gateway.toml` run from another folder writes the keys beside that
/// configuration, `check-config` finds them (and names a broken one by its key), and the gateway
/// started from it grants tokens to assertions signed the way the `token` command signs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_add_writes_keys_beside_the_configuration_it_edits() {
    let base = TempDir::new("clients-add");
    let (site, elsewhere) = (base.0.join("site"), base.0.join("elsewhere"));
    std::fs::create_dir_all(&site).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = "../site/gateway.toml";
    let (code, out, err) = cli(&elsewhere, &["clients", "add", "riverside", "--role", "inpatient-unit", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    let keys_dir = site.join("data/clients");
    let pem = std::fs::read_to_string(keys_dir.join("riverside.key.pem")).expect("the private key beside the configuration");
    assert!(!elsewhere.join("data").exists(), "nothing is written under the current folder");
    let text = std::fs::read_to_string(site.join("gateway.toml")).unwrap();
    assert!(text.contains("jwks_file = \"data/clients/riverside.jwks.json\""), "relative to the configuration: {text}");
    let jwks: Value = serde_json::from_str(&std::fs::read_to_string(keys_dir.join("riverside.jwks.json")).unwrap()).unwrap();
    let riverside = KeyPair::from_pem_thumbprinted(&pem).unwrap();
    assert_eq!(jwks["keys"][0]["kid"], riverside.kid.as_str(), "the generated key is named by its RFC 7638 thumbprint");

    // A partner that brings its own key registers its public JWKS; a private key is refused by name.
    let own = KeyPair::generate_es384("northside-2026").unwrap();
    std::fs::write(base.0.join("northside.jwks.json"), own.jwks_json()).unwrap();
    let mut private: Value = serde_json::from_str(&own.jwks_json()).unwrap();
    private["keys"][0]["d"] = Value::String("AAAA".into());
    std::fs::write(base.0.join("leaked.jwks.json"), private.to_string()).unwrap();
    let (code, _, err) = cli(&elsewhere, &["clients", "add", "leaky", "--role", "payer", "--config", config, "--jwks", "../leaked.jwks.json"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kid \"northside-2026\"") && err.contains("private"), "{err}");
    let (code, out, err) = cli(&elsewhere, &["clients", "add", "northside", "--role", "clinic", "--config", config, "--jwks", "../northside.jwks.json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("private key"), "no key pair is generated for it: {out}");
    let text = std::fs::read_to_string(site.join("gateway.toml")).unwrap();
    assert!(!text.contains("leaky") && text.contains("jwks_file = \"data/clients/northside.jwks.json\""), "{text}");

    let (code, out, err) = cli(&elsewhere, &["check-config", "--config", config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("riverside (inpatient-unit") && out.contains("northside (clinic"), "{out}");

    let overrides = iop_gateway::config::Overrides { listen: Some("127.0.0.1:0".into()), data_dir: None };
    let loaded = iop_gateway::config::Config::load(Some(&site.join("gateway.toml")), &[], &overrides).unwrap();
    let keys = vec![("riverside".to_string(), riverside), ("northside".to_string(), own)];
    let gw = Gateway::start_loaded(loaded, keys, base).await;
    assert_eq!(gw.get(&gw.token("riverside").await, "Patient").await.0, 200);
    assert_eq!(gw.get(&gw.token("northside").await, "Patient").await.0, 200, "the partner's own key, under its own kid");
    let (token_cwd, base_url) = (elsewhere.clone(), gw.base.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&token_cwd, &["token", "--client", "riverside", "--config", config, "--url", &base_url])).await.unwrap();
    assert_eq!(code, 0, "the token command finds the key beside the configuration: {out}{err}");
    assert_eq!(gw.get(out.trim(), "Patient").await.0, 200);

    std::fs::write(keys_dir.join("riverside.jwks.json"), "{\"keys\": [").unwrap();
    let (code, _, err) = cli(&elsewhere, &["check-config", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("clients[0] (riverside).jwks_file:"), "{err}");
    std::fs::remove_file(keys_dir.join("riverside.jwks.json")).unwrap();
    let (code, _, err) = cli(&elsewhere, &["check-config", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("clients[0] (riverside).jwks_file: cannot read"), "{err}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_add_checks_a_jwks_url_before_registering_it() {
    let partner = MockServer::start().await;
    let key = KeyPair::generate_thumbprinted().unwrap();
    publish(&partner, jwks(&[&key]), "max-age=60").await;
    let dir = TempDir::new("clients-add-url");
    let config = dir.0.join("gateway.toml");
    let config = config.to_str().unwrap();
    let (code, out, err) = cli(&dir.0, &["clients", "add", "remote", "--role", "payer", "--config", config, "--jwks-url", &format!("{}/jwks", partner.uri())]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 usable key"), "{out}");
    assert_eq!(fetches(&partner).await, 1, "fetched once to check it");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("jwks_url = \"{}/jwks\"", partner.uri())), "{text}");

    let mut private: Value = serde_json::from_str(&jwks(&[&key])).unwrap();
    private["keys"][0]["d"] = Value::String("AAAA".into());
    publish(&partner, private.to_string(), "max-age=60").await;
    let (code, _, err) = cli(&dir.0, &["clients", "add", "leaky", "--role", "payer", "--config", config, "--jwks-url", &format!("{}/jwks", partner.uri())]);
    assert_eq!(code, 2);
    assert!(err.contains("private"), "{err}");
    let (code, _, err) = cli(&dir.0, &["clients", "add", "plain", "--role", "payer", "--config", config, "--jwks-url", "http://keys.example/jwks"]);
    assert_eq!(code, 2);
    assert!(err.contains("https"), "{err}");
    assert!(!std::fs::read_to_string(&config).unwrap().contains("leaky"));
}
