//! Who may do what: role and scope checks per resource type, the parties a stored resource belongs to, and [`Principal::disclosure`], the one check every resource leaving the gateway passes.
//!
//! The model: every stored resource records the Organizations that are party to it (its author's,
//! the program's, and any Organization it is addressed to: requester, performer, owner, insurer,
//! …; for a transaction or message, the union over all its entries). A partner sees a resource
//! when its Organization is a party. A resource labelled 42 CFR Part 2 is further disclosed only
//! to its author or to clients configured as allowed to receive it — this is where a Consent
//! check plugs in.

use super::{Permission, Role, ScopeSet};

/// The security label that marks a 42 CFR Part 2 record (`meta.security`).
pub const PART2_LABEL: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode|42CFRPart2";

/// Resource types a payer may touch: prior-authorization data.
const PAYER_TYPES: &[&str] = &["Claim", "ClaimResponse", "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "Task", "Communication", "Patient"];

/// The authenticated client behind a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub client_id: String,
    pub role: Role,
    /// `Organization/<id>` the client acts for.
    pub organization: String,
    /// What its access token grants.
    pub scopes: ScopeSet,
    pub part2_disclosure: bool,
}

/// What the gateway knows about a stored resource when deciding whether it may leave.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub resource_type: &'a str,
    pub parties: &'a [String],
    /// `meta.security` codings as `system|code`.
    pub labels: &'a [String],
    pub created_by: &'a str,
}

/// The answer of the disclosure check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disclosure {
    Allow,
    /// The client may not see this resource; callers answer as if it did not exist.
    Deny(&'static str),
}

impl Principal {
    /// Whether the client may perform `permission` on `resource_type` at all (scope and role);
    /// the error is the reason, for a 403 that reveals nothing about any particular resource.
    pub fn may(&self, resource_type: &str, permission: Permission) -> Result<(), String> {
        let role_allows = match self.role {
            Role::Admin => resource_type == "AuditEvent",
            _ if resource_type == "AuditEvent" => false,
            Role::Payer => PAYER_TYPES.contains(&resource_type),
            Role::InpatientUnit | Role::Clinic => true,
        };
        if !role_allows {
            return Err(format!("a {} client may not access {resource_type}", self.role));
        }
        if !self.scopes.allows(resource_type, permission) {
            return Err(format!("the access token does not grant {permission:?} on {resource_type}"));
        }
        Ok(())
    }

    /// The disclosure check: may this stored resource be sent to this client?
    pub fn disclosure(&self, facts: Facts<'_>) -> Disclosure {
        if self.may(facts.resource_type, Permission::Read).is_err() && self.may(facts.resource_type, Permission::Search).is_err() {
            return Disclosure::Deny("resource type not permitted");
        }
        if facts.resource_type == "AuditEvent" {
            return if self.role == Role::Admin { Disclosure::Allow } else { Disclosure::Deny("audit is for administrators") };
        }
        if !facts.parties.contains(&self.organization) {
            return Disclosure::Deny("not a party to this resource");
        }
        if facts.labels.iter().any(|l| l == PART2_LABEL) && facts.created_by != self.client_id && !self.part2_disclosure {
            return Disclosure::Deny("42 CFR Part 2 record without consent to disclose");
        }
        Disclosure::Allow
    }

    /// Whether this client's role sees everything party to its organization in searches; admins search only audit.
    pub fn search_party(&self) -> &str {
        &self.organization
    }
}

/// The parties of a resource being written: its author's organization, the program's, the
/// Organizations it (or its transaction) is addressed to, and every earlier party (an update
/// never takes a resource away from anyone who could see it).
pub fn parties_for_write(author: &Principal, program: &str, addressed: &[String], previous: &[String]) -> Vec<String> {
    let mut parties: Vec<String> = Vec::new();
    for p in previous.iter().map(String::as_str).chain([author.organization.as_str(), program]).chain(addressed.iter().map(String::as_str)) {
        if !parties.iter().any(|q| q == p) {
            parties.push(p.to_string());
        }
    }
    parties
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(role: Role, org: &str) -> Principal {
        Principal { client_id: org.to_lowercase(), role, organization: format!("Organization/{org}"), scopes: role.default_scopes(), part2_disclosure: false }
    }

    #[test]
    fn roles_limit_types_before_scopes() {
        let payer = principal(Role::Payer, "payer");
        assert!(payer.may("Claim", Permission::Create).is_ok());
        assert!(payer.may("Observation", Permission::Read).is_err());
        let admin = principal(Role::Admin, "ops");
        assert!(admin.may("AuditEvent", Permission::Search).is_ok());
        assert!(admin.may("Patient", Permission::Read).is_err());
        let clinic = principal(Role::Clinic, "program");
        assert!(clinic.may("AuditEvent", Permission::Read).is_err(), "clinical clients never read audit");
    }

    #[test]
    fn only_parties_see_a_resource_and_part2_needs_consent() {
        let unit = principal(Role::InpatientUnit, "unit-a");
        let other = principal(Role::InpatientUnit, "unit-b");
        let parties = parties_for_write(&unit, "Organization/program", &[], &[]);
        let facts = Facts { resource_type: "ServiceRequest", parties: &parties, labels: &[], created_by: "unit-a" };
        assert_eq!(unit.disclosure(facts), Disclosure::Allow);
        assert!(matches!(other.disclosure(facts), Disclosure::Deny(_)));
        let clinic = principal(Role::Clinic, "program");
        assert_eq!(clinic.disclosure(facts), Disclosure::Allow);
        let labels = vec![PART2_LABEL.to_string()];
        let part2 = Facts { labels: &labels, created_by: "unit-a", ..facts };
        assert_eq!(unit.disclosure(part2), Disclosure::Allow, "the author always sees its own record");
        assert!(matches!(clinic.disclosure(part2), Disclosure::Deny(_)));
        let consented = Principal { part2_disclosure: true, ..clinic };
        assert_eq!(consented.disclosure(part2), Disclosure::Allow);
    }

    #[test]
    fn updates_never_remove_a_party() {
        let unit = principal(Role::InpatientUnit, "unit-a");
        let previous = vec!["Organization/payer-x".to_string()];
        let parties = parties_for_write(&unit, "Organization/program", &["Organization/unit-a".into()], &previous);
        assert_eq!(parties, ["Organization/payer-x", "Organization/unit-a", "Organization/program"]);
    }
}
