//! TLS and mutual TLS with certificates generated at test time: HTTPS works with the gateway's CA, plain HTTP does not, and with a client CA only clients holding one of its certificates get through.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use super::support::{Gateway, TempDir, config_text, load, partner_keys};

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Pki { ca_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate and key (PEM) for the given DNS names.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

async fn tls_gateway(server: &Pki, client_ca: Option<&Pki>) -> Gateway {
    let dir = TempDir::new("tls");
    let (cert, key) = server.leaf(&["gateway.test"]);
    std::fs::write(dir.0.join("server.crt"), cert).unwrap();
    std::fs::write(dir.0.join("server.key"), key).unwrap();
    let mut extra = "[server.tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n".to_string();
    if let Some(ca) = client_ca {
        std::fs::write(dir.0.join("clients-ca.crt"), &ca.ca_pem).unwrap();
        extra.push_str("client_ca = \"clients-ca.crt\"\n");
    }
    let keys = partner_keys();
    let mut text = config_text(&dir.0, &keys, &extra);
    text = text.replacen("[server]\n", "[server]\nbase_url = \"https://gateway.test\"\n", 1);
    Gateway::start_loaded(load(&text, &dir.0), keys, dir).await
}

fn client(gw: &Gateway, ca: &Pki, identity: Option<(String, String)>) -> reqwest::Client {
    let addr = gw.running.as_ref().unwrap().local_addr;
    let mut builder = reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap()]).resolve("gateway.test", addr);
    if let Some((cert, key)) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn url(gw: &Gateway, path: &str) -> String {
    let port = gw.running.as_ref().unwrap().local_addr.port();
    format!("https://gateway.test:{port}/{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_fhir_and_refuses_plain_http_and_unknown_cas() {
    let pki = Pki::new("test server CA");
    let gw = tls_gateway(&pki, None).await;
    let https = client(&gw, &pki, None);
    let response = https.get(url(&gw, "metadata")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let plain = reqwest::Client::new().get(format!("http://{}/metadata", gw.running.as_ref().unwrap().local_addr)).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP must not be served on a TLS port");
    let other = Pki::new("someone else");
    assert!(client(&gw, &other, None).get(url(&gw, "metadata")).send().await.is_err(), "a client that does not trust the CA cannot connect");
    assert_eq!(https.get(url(&gw, "healthz")).send().await.unwrap().status(), 200, "the server is still up after failed handshakes");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let server_pki = Pki::new("test server CA");
    let partners = Pki::new("partner CA");
    let gw = tls_gateway(&server_pki, Some(&partners)).await;
    let trusted = client(&gw, &server_pki, Some(partners.leaf(&["unit-a.partner.test"])));
    assert_eq!(trusted.get(url(&gw, "metadata")).send().await.unwrap().status(), 200);
    let no_cert = client(&gw, &server_pki, None);
    assert!(no_cert.get(url(&gw, "metadata")).send().await.is_err(), "no client certificate");
    let stranger = Pki::new("stranger CA");
    let wrong_cert = client(&gw, &server_pki, Some(stranger.leaf(&["x.test"])));
    assert!(wrong_cert.get(url(&gw, "metadata")).send().await.is_err(), "a certificate from another CA");
    assert_eq!(trusted.get(url(&gw, "healthz")).send().await.unwrap().status(), 200);
    gw.stop().await;
}
