//! Partner key pairs: generating an ES384 key (PKCS#8 PEM) with its public JWKS, loading a private key, naming a key by its RFC 7638 thumbprint, and signing a client assertion with it.

use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A partner's private key with the id it is published under.
pub struct KeyPair {
    pub kid: String,
    pub algorithm: Algorithm,
    /// PKCS#8 PEM text of the private key.
    pub private_pem: String,
    key: EncodingKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("kid", &self.kid).field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed")]
    Generate,
    #[error("the private key is neither an EC P-384 nor an RSA PEM key: {0}")]
    Pem(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl KeyPair {
    /// A fresh ECDSA P-384 key pair named by its thumbprint, the key id several SMART client
    /// libraries give a key they generate.
    pub fn generate_thumbprinted() -> Result<KeyPair, KeyError> {
        KeyPair::generate_es384("")?.named_by_thumbprint()
    }

    /// A private key from PEM, named by its thumbprint.
    pub fn from_pem_thumbprinted(pem: &str) -> Result<KeyPair, KeyError> {
        KeyPair::from_pem(pem, "")?.named_by_thumbprint()
    }

    /// The same key under the key id `thumbprint(public half)`.
    fn named_by_thumbprint(mut self) -> Result<KeyPair, KeyError> {
        self.kid = thumbprint(&self.public_jwk()?).ok_or_else(|| KeyError::Pem("the key has no RFC 7638 thumbprint".into()))?;
        Ok(self)
    }

    /// A fresh ECDSA P-384 key pair.
    pub fn generate_es384(kid: &str) -> Result<KeyPair, KeyError> {
        use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).map_err(|_| KeyError::Generate)?;
        let der = pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
        let pem = pem_encode("PRIVATE KEY", der.as_ref());
        KeyPair::from_pem(&pem, kid)
    }

    /// Loads a PEM private key: EC P-384 keys sign ES384, RSA keys RS384.
    pub fn from_pem(pem: &str, kid: &str) -> Result<KeyPair, KeyError> {
        let (key, algorithm) = match EncodingKey::from_ec_pem(pem.as_bytes()) {
            Ok(key) => (key, Algorithm::ES384),
            Err(ec) => match EncodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(key) => (key, Algorithm::RS384),
                Err(_) => return Err(KeyError::Pem(ec.to_string())),
            },
        };
        Ok(KeyPair { kid: kid.to_string(), algorithm, private_pem: pem.to_string(), key })
    }

    /// The public half as a JWK with `kid` and `alg`.
    pub fn public_jwk(&self) -> Result<Jwk, KeyError> {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.algorithm).map_err(|e| KeyError::Pem(e.to_string()))?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.key_algorithm = Some(if self.algorithm == Algorithm::ES384 { KeyAlgorithm::ES384 } else { KeyAlgorithm::RS384 });
        Ok(jwk)
    }

    /// A JWKS holding only this key's public half, as JSON text.
    pub fn jwks_json(&self) -> String {
        let keys = self.public_jwk().map(|k| vec![k]).unwrap_or_default();
        serde_json::to_string_pretty(&JwkSet { keys }).unwrap_or_default()
    }
}

/// The RFC 7638 thumbprint of a public key: base64url SHA-256 of the canonical JSON of its
/// required members (`crv,kty,x,y` for EC, `e,kty,n` for RSA). `None` for other key types.
pub fn thumbprint(jwk: &Jwk) -> Option<String> {
    use jsonwebtoken::jwk::AlgorithmParameters;
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::RSA(_) => jwk.thumbprint(ThumbprintHash::SHA256).ok(),
        _ => None,
    }
}

/// Signs a SMART Backend Services client assertion.
pub fn sign_assertion(pair: &KeyPair, client_id: &str, token_url: &str, jti: &str, exp: u64) -> Result<String, KeyError> {
    sign_claims(pair, &serde_json::json!({ "iss": client_id, "sub": client_id, "aud": token_url, "exp": exp, "jti": jti }))
}

/// Signs any claims as a JWT with the pair's key and kid (tests use it for assertions with `nbf`/`iat`).
pub fn sign_claims(pair: &KeyPair, claims: &serde_json::Value) -> Result<String, KeyError> {
    let mut header = Header::new(pair.algorithm);
    header.kid = Some(pair.kid.clone());
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(&header, claims, &pair.key).map_err(|e| KeyError::Sign(e.to_string()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem_and_publish_p384() {
        let pair = KeyPair::generate_es384("k").unwrap();
        assert!(pair.private_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = KeyPair::from_pem(&pair.private_pem, "k").unwrap();
        assert_eq!(again.algorithm, Algorithm::ES384);
        let jwks: serde_json::Value = serde_json::from_str(&pair.jwks_json()).unwrap();
        assert_eq!(jwks["keys"][0]["crv"], "P-384");
        assert_eq!(jwks["keys"][0]["kid"], "k");
        assert!(jwks["keys"][0].get("d").is_none(), "the JWKS must not carry the private key");
    }

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 7638 §3.1: the example RSA key and its thumbprint; optional members do not count.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let jwk: Jwk = serde_json::from_value(serde_json::json!({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"})).unwrap();
        assert_eq!(thumbprint(&jwk).as_deref(), Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"));

        let pair = KeyPair::generate_thumbprinted().unwrap();
        let public = pair.public_jwk().unwrap();
        assert_eq!(pair.kid, thumbprint(&public).unwrap());
        assert_eq!(pair.kid.len(), 43, "base64url of 32 bytes, unpadded");
        // The same canonical form by hand: members in lexical order, no whitespace.
        let jwks: serde_json::Value = serde_json::from_str(&pair.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        let canonical = format!(r#"{{"crv":"P-384","kty":"EC","x":{},"y":{}}}"#, key["x"], key["y"]);
        use sha2::Digest as _;
        let by_hand = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&sha2::Sha256::digest(canonical.as_bytes())[..]);
        assert_eq!(pair.kid, by_hand);
        assert_eq!(key["kid"], by_hand.as_str());
        assert_eq!(KeyPair::from_pem_thumbprinted(&pair.private_pem).unwrap().kid, pair.kid, "the key id follows from the key");
    }
}
