//! Verifying a SMART Backend Services client assertion: a JWT signed RS384 or ES384 with a key from the client's JWKS, `iss` = `sub` = client id, `aud` = the token URL, `exp` at most five minutes ahead, `nbf`/`iat` not in the future, and a `jti`.
//!
//! Replay of a `jti` is checked by the caller against the store (it must hold across instances).

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest time ahead a client assertion's `exp` may be (SMART Backend Services: "no more than five minutes in the future").
pub const MAX_ASSERTION_LIFETIME_SECS: u64 = 300;

/// A client's public keys, ready to verify signatures.
pub struct ClientKeys {
    keys: Vec<PublicKey>,
}

/// One usable key: its `kid` (if the JWKS gave one), its RFC 7638 thumbprint, what it verifies.
struct PublicKey {
    kid: Option<String>,
    thumbprint: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

impl PublicKey {
    /// Whether an assertion header's `kid` names this key: SMART has the `kid` name a key of the
    /// JWKS; many client libraries name their keys by thumbprint whatever the JWKS says.
    fn is_named(&self, kid: &str) -> bool {
        self.kid.as_deref() == Some(kid) || self.thumbprint.as_deref() == Some(kid)
    }
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKeys").field("keys", &self.keys.iter().map(|k| (&k.kid, k.algorithm)).collect::<Vec<_>>()).finish()
    }
}

/// Members that only a private (or symmetric) JWK has (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Shortest RSA modulus accepted, in bytes (2048 bits).
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// Why an assertion or a JWKS was refused. Messages never repeat the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the JWKS is not valid: {0}")]
    Jwks(String),
    #[error("the client assertion is not a well-formed JWT")]
    Malformed,
    #[error("the client assertion must be signed with RS384 or ES384")]
    Algorithm,
    #[error("the client assertion names no registered client in iss")]
    UnknownClient,
    #[error("no key of the client verifies the client assertion")]
    Signature,
    #[error("the client assertion has expired")]
    Expired,
    #[error("the client assertion's exp is more than five minutes ahead")]
    TooLong,
    #[error("the client assertion is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("the client assertion was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the client assertion's aud is not this token endpoint")]
    Audience,
    #[error("the client assertion's iss and sub must both be the client id")]
    Subject,
    #[error("the client assertion has no jti")]
    MissingJti,
    #[error("the client assertion lacks a required claim: {0}")]
    MissingClaim(String),
}

/// The claims the gateway reads from a verified assertion.
#[derive(Debug, Clone, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub exp: u64,
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
}

impl ClientKeys {
    /// Parses a registered JWKS (a file or inline text in the configuration, `clients add --jwks`):
    /// every key must be a public RSA (RS384) or EC P-384 (ES384) signing key; the error names the
    /// first that is not, and why.
    pub fn parse(jwks: &str) -> Result<ClientKeys, AssertionError> {
        let (keys, skipped) = read(jwks)?;
        if let Some(first) = skipped.into_iter().next() {
            return Err(AssertionError::Jwks(first));
        }
        Ok(keys)
    }

    /// Parses a JWKS a partner publishes at a URL: such a set often also holds keys for other
    /// algorithms or for encryption, which are left out (their reasons returned); a private key
    /// still refuses the whole set, and at least one key must be usable.
    pub fn parse_published(jwks: &str) -> Result<(ClientKeys, Vec<String>), AssertionError> {
        read(jwks)
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key of the set is named `kid` (by its `kid` or its thumbprint).
    pub fn names(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.is_named(kid))
    }

    /// Verifies `assertion` as coming from `client_id` for the token endpoint at one of `token_urls` (its `aud`).
    pub fn verify(&self, assertion: &str, client_id: &str, token_urls: &[&str], skew_secs: u64, now: u64) -> Result<AssertionClaims, AssertionError> {
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| AssertionError::Malformed)?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(AssertionError::Algorithm);
        }
        let mut validation = Validation::new(header.alg);
        validation.set_audience(token_urls);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_string());
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.leeway = skew_secs;
        let candidates = self.keys.iter().filter(|k| k.algorithm == header.alg && header.kid.as_deref().is_none_or(|kid| k.is_named(kid)));
        let mut last = AssertionError::Signature;
        for PublicKey { key, .. } in candidates {
            match jsonwebtoken::decode::<AssertionClaims>(assertion, key, &validation) {
                Ok(data) => {
                    let claims = data.claims;
                    if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + skew_secs {
                        return Err(AssertionError::TooLong);
                    }
                    // jsonwebtoken checks neither by default; an assertion minted for later use must not work now.
                    if claims.nbf.is_some_and(|nbf| nbf > now + skew_secs) {
                        return Err(AssertionError::NotYetValid);
                    }
                    if claims.iat.is_some_and(|iat| iat > now + skew_secs) {
                        return Err(AssertionError::IssuedInFuture);
                    }
                    match &claims.jti {
                        Some(jti) if !jti.is_empty() && jti.len() <= 256 => return Ok(claims),
                        _ => return Err(AssertionError::MissingJti),
                    }
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
                            AssertionError::Signature
                        }
                        ErrorKind::ExpiredSignature => AssertionError::Expired,
                        ErrorKind::InvalidAudience => AssertionError::Audience,
                        ErrorKind::InvalidIssuer | ErrorKind::InvalidSubject => AssertionError::Subject,
                        ErrorKind::MissingRequiredClaim(c) => AssertionError::MissingClaim(c.clone()),
                        _ => AssertionError::Malformed,
                    };
                    // A signature failure with one key may succeed with the next; any other failure
                    // happened after the signature verified, so it is the answer.
                    if last != AssertionError::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// The `iss` of an assertion, read before verification to find the client's keys.
pub fn unverified_issuer(assertion: &str) -> Result<String, AssertionError> {
    #[derive(Deserialize)]
    struct Issuer {
        iss: String,
    }
    let data = jsonwebtoken::dangerous::insecure_decode::<Issuer>(assertion).map_err(|_| AssertionError::Malformed)?;
    Ok(data.claims.iss)
}

/// The `kid` in an assertion's header, read before verification to find the key it names.
pub fn unverified_kid(assertion: &str) -> Result<Option<String>, AssertionError> {
    Ok(jsonwebtoken::decode_header(assertion).map_err(|_| AssertionError::Malformed)?.kid)
}

/// The usable keys of a JWKS and why each other key was left out; a private key anywhere, or no
/// usable key at all, is an error.
fn read(jwks: &str) -> Result<(ClientKeys, Vec<String>), AssertionError> {
    let set: serde_json::Value = serde_json::from_str(jwks).map_err(|e| AssertionError::Jwks(e.to_string()))?;
    let members = set.get("keys").and_then(serde_json::Value::as_array).ok_or_else(|| AssertionError::Jwks("a JWKS is an object with a \"keys\" array".into()))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in members.iter().enumerate() {
        let name = match raw.get("kid").and_then(serde_json::Value::as_str) {
            Some(kid) => format!("key {i} (kid \"{kid}\")"),
            None => format!("key {i}"),
        };
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| raw.get(**m).is_some()) {
            return Err(AssertionError::Jwks(format!("{name} holds private key material (\"{member}\"): register only the public half")));
        }
        match usable_key(raw) {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("{name} {why}")),
        }
    }
    if keys.is_empty() {
        let why = if skipped.is_empty() { "it holds no keys".to_string() } else { skipped.join("; ") };
        return Err(AssertionError::Jwks(format!("no usable key (RS384 or ES384 signing key): {why}")));
    }
    Ok((ClientKeys { keys }, skipped))
}

/// One JWK as a key that verifies RS384 or ES384 client assertions, or why it cannot be one.
fn usable_key(raw: &serde_json::Value) -> Result<PublicKey, String> {
    if let Some(usage) = raw.get("use").and_then(serde_json::Value::as_str)
        && usage != "sig"
    {
        return Err(format!("is for \"{usage}\", not for signatures"));
    }
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("is not a JWK the gateway reads: {e}"))?;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let modulus = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, rsa.n.trim_end_matches('=')).map_err(|_| "has an RSA modulus that is not base64url".to_string())?;
            if modulus.iter().skip_while(|b| **b == 0).count() < MIN_RSA_MODULUS_BYTES {
                return Err("is an RSA key shorter than 2048 bits".into());
            }
            Algorithm::RS384
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::EllipticCurve(_) => return Err("is an EC key on a curve other than P-384 (the gateway accepts ES384 and RS384)".into()),
        _ => return Err("is neither an RSA nor an EC P-384 key (the gateway accepts RS384 and ES384)".into()),
    };
    if let Some(declared) = raw.get("alg").and_then(serde_json::Value::as_str)
        && declared != format!("{algorithm:?}")
    {
        return Err(format!("is declared for {declared}; the gateway accepts {algorithm:?} for such a key"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("cannot be used: {e}"))?;
    Ok(PublicKey { kid: jwk.common.key_id.clone(), thumbprint: crate::auth::keys::thumbprint(&jwk), algorithm, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::{KeyPair, sign_assertion};

    const TOKEN_URL: &str = "https://gw.example/auth/token";

    fn keys() -> (KeyPair, ClientKeys) {
        let pair = KeyPair::generate_es384("k1").unwrap();
        let keys = ClientKeys::parse(&pair.jwks_json()).unwrap();
        (pair, keys)
    }

    #[test]
    fn a_correct_assertion_verifies() {
        let (pair, keys) = keys();
        let now = jsonwebtoken::get_current_timestamp();
        let jwt = sign_assertion(&pair, "unit-a", TOKEN_URL, "j1", now + 120).unwrap();
        let claims = keys.verify(&jwt, "unit-a", &[TOKEN_URL], 30, now).unwrap();
        assert_eq!(claims.jti.as_deref(), Some("j1"));
    }

    #[test]
    fn wrong_audience_issuer_lifetime_and_key_are_refused() {
        let (pair, keys) = keys();
        let now = jsonwebtoken::get_current_timestamp();
        let jwt = sign_assertion(&pair, "unit-a", "https://other/token", "j", now + 60).unwrap();
        assert_eq!(keys.verify(&jwt, "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Audience);
        let jwt = sign_assertion(&pair, "unit-a", TOKEN_URL, "j", now + 60).unwrap();
        assert_eq!(keys.verify(&jwt, "unit-b", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Subject);
        let jwt = sign_assertion(&pair, "unit-a", TOKEN_URL, "j", now + 3600).unwrap();
        assert_eq!(keys.verify(&jwt, "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::TooLong);
        let jwt = sign_assertion(&pair, "unit-a", TOKEN_URL, "j", now - 600).unwrap();
        assert_eq!(keys.verify(&jwt, "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Expired);
        let other = KeyPair::generate_es384("k1").unwrap();
        let jwt = sign_assertion(&other, "unit-a", TOKEN_URL, "j", now + 60).unwrap();
        assert_eq!(keys.verify(&jwt, "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Signature);
        assert_eq!(keys.verify("not.a.jwt", "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Malformed);
    }

    #[test]
    fn future_nbf_and_iat_are_refused_within_the_skew() {
        let (pair, keys) = keys();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"iss": "unit-a", "sub": "unit-a", "aud": TOKEN_URL, "exp": now + 120, "jti": "j"});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            crate::auth::keys::sign_claims(&pair, &c).unwrap()
        };
        assert_eq!(keys.verify(&claims(serde_json::json!({"nbf": now + 3600})), "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::NotYetValid);
        assert_eq!(keys.verify(&claims(serde_json::json!({"iat": now + 3600})), "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::IssuedInFuture);
        assert!(keys.verify(&claims(serde_json::json!({"nbf": now + 20, "iat": now + 20})), "unit-a", &[TOKEN_URL], 30, now).is_ok());
        assert!(keys.verify(&claims(serde_json::json!({"nbf": now - 60, "iat": now - 60})), "unit-a", &[TOKEN_URL], 30, now).is_ok());
    }

    #[test]
    fn symmetric_and_unsigned_tokens_are_refused() {
        let (_, keys) = keys();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"iss": "unit-a", "sub": "unit-a", "aud": TOKEN_URL, "exp": now + 60, "jti": "x"});
        let hs = jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(b"k")).unwrap();
        assert_eq!(keys.verify(&hs, "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Algorithm);
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!("{}.{}.", b64.encode(br#"{"alg":"none"}"#), b64.encode(claims.to_string()));
        assert!(keys.verify(&none, "unit-a", &[TOKEN_URL], 30, now).is_err());
    }

    #[test]
    fn a_kid_names_a_key_by_its_kid_or_its_thumbprint() {
        let (pair, keys) = keys();
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"iss": "unit-a", "sub": "unit-a", "aud": TOKEN_URL, "exp": now + 60, "jti": "j"});
        let signed = |kid: Option<&str>| {
            let mut header = jsonwebtoken::Header::new(Algorithm::ES384);
            header.kid = kid.map(str::to_string);
            jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ec_pem(pair.private_pem.as_bytes()).unwrap()).unwrap()
        };
        let thumbprint = crate::auth::keys::thumbprint(&pair.public_jwk().unwrap()).unwrap();
        assert_ne!(thumbprint, "k1");
        assert!(keys.names("k1") && keys.names(&thumbprint) && !keys.names("other"));
        assert!(keys.verify(&signed(Some("k1")), "unit-a", &[TOKEN_URL], 30, now).is_ok());
        assert!(keys.verify(&signed(Some(&thumbprint)), "unit-a", &[TOKEN_URL], 30, now).is_ok(), "named by its RFC 7638 thumbprint");
        assert!(keys.verify(&signed(None), "unit-a", &[TOKEN_URL], 30, now).is_ok(), "no kid: the client's keys are tried");
        assert_eq!(keys.verify(&signed(Some("other")), "unit-a", &[TOKEN_URL], 30, now).unwrap_err(), AssertionError::Signature, "a kid naming no key of the client");
        assert_eq!(unverified_kid(&signed(Some("k1"))).unwrap().as_deref(), Some("k1"));
    }

    #[test]
    fn registered_jwks_refuse_private_and_foreign_keys_by_name() {
        let pair = KeyPair::generate_es384("mine").unwrap();
        let public: serde_json::Value = serde_json::from_str(&pair.jwks_json()).unwrap();
        let with = |extra: serde_json::Value| {
            let mut key = public["keys"][0].clone();
            key.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::json!({"keys": [key]}).to_string()
        };
        let problem = |text: &str| ClientKeys::parse(text).unwrap_err().to_string();
        let private = problem(&with(serde_json::json!({"d": "AAAA"})));
        assert!(private.contains("key 0 (kid \"mine\")") && private.contains("private"), "{private}");
        let es256 = problem(&with(serde_json::json!({"alg": "ES256"})));
        assert!(es256.contains("kid \"mine\"") && es256.contains("ES256"), "{es256}");
        assert!(problem(&with(serde_json::json!({"use": "enc"}))).contains("\"enc\""));
        let p256 = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "p256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]});
        assert!(problem(&p256.to_string()).contains("P-384"));
        let short_rsa = serde_json::json!({"keys": [{"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"}]});
        assert!(problem(&short_rsa.to_string()).contains("2048"));

        // Published at a URL: foreign keys are left out with their reasons, a private key still refuses the set.
        let mixed = serde_json::json!({"keys": [p256["keys"][0].clone(), public["keys"][0].clone()]}).to_string();
        assert!(ClientKeys::parse(&mixed).is_err());
        let (keys, skipped) = ClientKeys::parse_published(&mixed).unwrap();
        assert!(keys.names("mine") && !keys.names("p256"));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].contains("p256"), "{skipped:?}");
        assert!(ClientKeys::parse_published(&with(serde_json::json!({"d": "AAAA"}))).is_err());
    }

    #[test]
    fn jwks_without_usable_keys_is_refused() {
        assert!(ClientKeys::parse("{\"keys\":[]}").is_err());
        assert!(ClientKeys::parse("{\"keys\":[{\"kty\":\"oct\",\"k\":\"AAAA\"}]}").is_err());
        assert!(ClientKeys::parse("not json").is_err());
    }
}
