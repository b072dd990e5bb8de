//! Deterministic resource ids: a name-based UUID (RFC 9562 version 8, from SHA-256) of a namespace, the resource type and the identity text a mapping renders from source identifiers.
//!
//! Re-sending a record yields the same ids, so Bundle entries are PUTs that update instead of
//! duplicating. The namespace is a per-deployment value: clinic identifiers such as MRNs are few
//! enough to guess, and without a secret namespace a hash of one could be reversed by trying them all.

use sha2::{Digest, Sha256};

/// The namespace used when the deployment sets none.
pub const DEFAULT_NAMESPACE: &str = "iop-gateway";

/// The id of the resource of `resource_type` whose identity is `identity` (e.g. `client:C-1001`).
pub fn resource_id(namespace: &str, resource_type: &str, identity: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [namespace, resource_type, identity] {
        // Length prefixes keep ("a|b", "c") and ("a", "b|c") apart.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_distinct_and_valid_fhir_ids() {
        let a = resource_id(DEFAULT_NAMESPACE, "Patient", "client:C-1001");
        assert_eq!(a, resource_id(DEFAULT_NAMESPACE, "Patient", "client:C-1001"));
        assert_ne!(a, resource_id(DEFAULT_NAMESPACE, "Patient", "client:C-1002"));
        assert_ne!(a, resource_id(DEFAULT_NAMESPACE, "Observation", "client:C-1001"));
        assert_ne!(a, resource_id("other-clinic", "Patient", "client:C-1001"));
        assert_ne!(resource_id("a", "Patient", "b|c"), resource_id("a|b", "Patient", "c"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8", "version 8 UUID: {a}");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
    }
}
