//! Verifying a SMART Backend Services client assertion: a JWT signed RS384 or ES384 with a key from the client's JWKS, `iss` = `sub` = client id, `aud` = the token URL, `exp` at most five minutes ahead, `nbf`/`iat` not in the future, and a `jti`.
//!
//! Replay of a `jti` is checked by the caller against the store (it must hold across instances).

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Longest time ahead a client assertion's `exp` may be (SMART Backend Services: "no more than five minutes in the future").
pub const MAX_ASSERTION_LIFETIME_SECS: u64 = 300;

/// A client's public keys, ready to verify signatures.
pub struct ClientKeys {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKeys").field("keys", &self.keys.iter().map(|(kid, alg, _)| (kid, alg)).collect::<Vec<_>>()).finish()
    }
}

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
    /// Parses a JWKS; only RSA keys and P-384 EC keys are usable (RS384, ES384).
    pub fn parse(jwks: &str) -> Result<ClientKeys, AssertionError> {
        let set: JwkSet = serde_json::from_str(jwks).map_err(|e| AssertionError::Jwks(e.to_string()))?;
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let Some(algorithm) = usable_algorithm(jwk) else {
                return Err(AssertionError::Jwks(format!("key {i} is neither RSA nor EC P-384")));
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| AssertionError::Jwks(format!("key {i}: {e}")))?;
            keys.push((jwk.common.key_id.clone(), algorithm, key));
        }
        if keys.is_empty() {
            return Err(AssertionError::Jwks("no keys".into()));
        }
        Ok(ClientKeys { keys })
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
        let candidates = self.keys.iter().filter(|(kid, alg, _)| *alg == header.alg && (header.kid.is_none() || header.kid == *kid));
        let mut last = AssertionError::Signature;
        for (_, _, key) in candidates {
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

fn usable_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS384),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => Some(Algorithm::ES384),
        _ => None,
    }
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
    fn jwks_without_usable_keys_is_refused() {
        assert!(ClientKeys::parse("{\"keys\":[]}").is_err());
        assert!(ClientKeys::parse("{\"keys\":[{\"kty\":\"oct\",\"k\":\"AAAA\"}]}").is_err());
        assert!(ClientKeys::parse("not json").is_err());
    }
}
