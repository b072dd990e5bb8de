//! SMART system scopes, v1 (`system/Observation.read`, `.write`, `.*`) and v2 (`system/Observation.cruds`), as a set of permissions per resource type.

use std::collections::BTreeMap;
use std::fmt;

/// One permission letter of SMART v2 (`c`, `r`, `u`, `d`, `s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    const ALL: [Permission; 5] = [Permission::Create, Permission::Read, Permission::Update, Permission::Delete, Permission::Search];

    fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Permissions by resource type (`*` for all types); what a token grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeSet {
    by_type: BTreeMap<String, u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{scope}' is not a SMART system scope ({reason})")]
pub struct ScopeError {
    pub scope: String,
    pub reason: &'static str,
}

impl ScopeSet {
    /// Parses a space-separated scope string. Non-`system/` scopes are refused: this gateway serves backend services only.
    pub fn parse(text: &str) -> Result<ScopeSet, ScopeError> {
        let mut set = ScopeSet::default();
        for scope in text.split_ascii_whitespace() {
            let error = |reason| ScopeError { scope: scope.to_string(), reason };
            let rest = scope.strip_prefix("system/").ok_or_else(|| error("only system/ scopes are granted"))?;
            let (resource_type, access) = rest.split_once('.').ok_or_else(|| error("expected system/Type.access"))?;
            let valid_type = resource_type == "*"
                || (resource_type.len() <= 64 && resource_type.starts_with(|c: char| c.is_ascii_uppercase()) && resource_type.chars().all(|c| c.is_ascii_alphanumeric()));
            if !valid_type {
                return Err(error("unknown resource type"));
            }
            let bits = match access {
                "read" => Permission::Read.bit() | Permission::Search.bit(),
                "write" => Permission::Create.bit() | Permission::Update.bit() | Permission::Delete.bit(),
                "*" => Permission::ALL.iter().map(|p| p.bit()).fold(0, |a, b| a | b),
                letters => {
                    // v2 letters must appear at most once and in the order c r u d s.
                    let mut bits = 0u8;
                    let mut last = None;
                    for c in letters.chars() {
                        let permission = Permission::ALL.into_iter().find(|p| p.letter() == c).ok_or_else(|| error("unknown permission letter"))?;
                        if last.is_some_and(|l| l >= permission) {
                            return Err(error("permission letters must be in the order c, r, u, d, s"));
                        }
                        last = Some(permission);
                        bits |= permission.bit();
                    }
                    if bits == 0 {
                        return Err(error("no permissions"));
                    }
                    bits
                }
            };
            *set.by_type.entry(resource_type.to_string()).or_default() |= bits;
        }
        Ok(set)
    }

    /// What a token request's `scope` may be granted from: the SMART system scopes it names on
    /// resource types that exist (`is_type`), and the scopes it names that are left out (other kinds
    /// such as `launch/patient` or `openid`, unknown types, malformed ones). OAuth lets a server grant
    /// less than was asked and say so in the answer's `scope`; refusing the whole request for one
    /// scope breaks clients that always ask for a few extra.
    pub fn parse_requested(text: &str, is_type: impl Fn(&str) -> bool) -> (ScopeSet, Vec<String>) {
        let mut set = ScopeSet::default();
        let mut declined = Vec::new();
        for scope in text.split_ascii_whitespace() {
            match ScopeSet::parse(scope) {
                Ok(one) if one.by_type.keys().all(|t| t == "*" || is_type(t)) => {
                    for (resource_type, bits) in one.by_type {
                        *set.by_type.entry(resource_type).or_default() |= bits;
                    }
                }
                _ => declined.push(scope.to_string()),
            }
        }
        (set, declined)
    }

    /// Whether `permission` on `resource_type` is granted.
    pub fn allows(&self, resource_type: &str, permission: Permission) -> bool {
        let bits = self.by_type.get(resource_type).copied().unwrap_or(0) | self.by_type.get("*").copied().unwrap_or(0);
        bits & permission.bit() != 0
    }

    /// Whether any permission at all is granted on `resource_type`.
    pub fn touches(&self, resource_type: &str) -> bool {
        Permission::ALL.into_iter().any(|p| self.allows(resource_type, p))
    }

    /// The permissions both sets grant.
    pub fn intersect(&self, other: &ScopeSet) -> ScopeSet {
        let mut out = ScopeSet::default();
        let types: Vec<&String> = self.by_type.keys().chain(other.by_type.keys()).collect();
        for resource_type in types {
            let bits = Permission::ALL
                .into_iter()
                .filter(|p| self.allows(resource_type, *p) && other.allows(resource_type, *p))
                .fold(0u8, |a, p| a | p.bit());
            // A concrete type fully covered by `*` on both sides adds nothing.
            if bits != 0 {
                *out.by_type.entry(resource_type.clone()).or_default() |= bits;
            }
        }
        out.simplify();
        out
    }

    fn simplify(&mut self) {
        let star = self.by_type.get("*").copied().unwrap_or(0);
        self.by_type.retain(|t, bits| t == "*" || *bits & !star != 0);
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }
}

impl fmt::Display for ScopeSet {
    /// Writes v2 scopes (`system/Task.cruds`), the form granted tokens carry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (resource_type, bits) in &self.by_type {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            let letters: String = Permission::ALL.into_iter().filter(|p| bits & p.bit() != 0).map(Permission::letter).collect();
            write!(f, "system/{resource_type}.{letters}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_scopes_mean_the_same_permissions() {
        let v1 = ScopeSet::parse("system/Observation.read system/Observation.write").unwrap();
        let v2 = ScopeSet::parse("system/Observation.cruds").unwrap();
        assert_eq!(v1, v2);
        assert!(v1.allows("Observation", Permission::Search));
        assert!(!v1.allows("Patient", Permission::Read));
    }

    #[test]
    fn wildcard_types_cover_every_type() {
        let s = ScopeSet::parse("system/*.rs").unwrap();
        assert!(s.allows("Task", Permission::Read));
        assert!(!s.allows("Task", Permission::Create));
    }

    #[test]
    fn user_and_patient_scopes_and_bad_letters_are_refused() {
        for bad in ["user/Patient.read", "patient/*.read", "system/Patient", "system/Patient.x", "system/Patient.rc", "system/Patient.rr", "system/pat.read"] {
            assert!(ScopeSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_request_keeps_the_system_scopes_on_known_types_and_names_the_rest() {
        let (set, declined) = ScopeSet::parse_requested("launch/patient system/Patient.rs openid system/Foo.read system/*.r system/Task.x", |t| t == "Patient" || t == "Task");
        assert_eq!(set.to_string(), "system/*.r system/Patient.rs");
        assert_eq!(declined, ["launch/patient", "openid", "system/Foo.read", "system/Task.x"]);
        assert!(ScopeSet::parse_requested("openid", |_| true).0.is_empty());
    }

    #[test]
    fn grants_are_the_intersection_of_requested_and_allowed() {
        let allowed = ScopeSet::parse("system/Task.cruds system/ServiceRequest.cruds").unwrap();
        let requested = ScopeSet::parse("system/*.read system/Claim.write").unwrap();
        let granted = requested.intersect(&allowed);
        assert_eq!(granted.to_string(), "system/ServiceRequest.rs system/Task.rs");
        assert!(!granted.allows("Claim", Permission::Create));
    }
}
