//! Who may do what: role and scope checks per resource type, who owns and may write a resource, the parties a stored version belongs to, and [`Principal::disclosure`], the one check every resource leaving the gateway passes.
//!
//! The model:
//! - **Owner.** The Organization whose client created a resource owns it, in every version. Only
//!   its owner writes it; the one exception is a Task, whose `owner` (the performer) may move its
//!   status and outputs but nothing else. Conditional operations match only what the caller may write.
//! - **Client-chosen ids.** Only the program's own clients may create a resource at an id they
//!   choose (update as create: the mappings' deterministic ids). Partners create with POST and get
//!   a server id, so no partner can take an id the program (or another partner) is going to use.
//! - **Parties.** Each version records the Organizations party to it, computed from that version
//!   alone: its owner's, the program's, the writer's, and any Organization it is addressed to
//!   (requester, performer, owner, insurer, …). A partner sees a resource when its Organization is
//!   a party to the current version; dropping an address drops the party.
//! - **Part 2.** A resource labelled 42 CFR Part 2 (in its current or the served version) goes
//!   to anyone but its owner only when the patient's consent permits that recipient, the client's
//!   purpose of use and the resource's labels now ([`consent::decide`]); the owner's own access is
//!   not a disclosure. There is no override.

use super::consent::{self, Purpose};
use super::labels::{self, PART2_LABEL};
use super::{Permission, Role, ScopeSet};
use crate::json::Json;
use crate::store::Visibility;

/// Resource types a payer may touch: prior-authorization data.
const PAYER_TYPES: &[&str] = &["Claim", "ClaimResponse", "Coverage", "CoverageEligibilityRequest", "CoverageEligibilityResponse", "Task", "Communication", "Patient", "Subscription"];

/// Resource types an outpatient provider may touch: what a step-down referral message carries, and the feedback it sends.
const OUTPATIENT_PROVIDER_TYPES: &[&str] = &["Task", "ServiceRequest", "Patient", "Coverage", "Consent", "Bundle", "Organization", "PractitionerRole", "MessageHeader"];

/// The authenticated client behind a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub client_id: String,
    pub role: Role,
    /// `Organization/<id>` the client acts for.
    pub organization: String,
    /// What its access token grants.
    pub scopes: ScopeSet,
    /// Why the client receives data (configured, else by role); `None` for the gateway's own work,
    /// which discloses nothing.
    pub purpose: Option<Purpose>,
}

/// What the gateway knows about a stored resource when deciding whether it may leave.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub resource_type: &'a str,
    pub parties: &'a [String],
    /// Security labels as stored (canonical `system|code`).
    pub labels: &'a [String],
    /// `Organization/<id>` that owns the resource.
    pub owner: &'a str,
    /// The consent rules of the patients the resource is about (empty when not looked up: then
    /// Part 2 data goes to its owner only).
    pub consents: &'a [consent::Rule],
    /// Now, in seconds (the moment of disclosure consents are checked at).
    pub at: i64,
}

/// The answer of the disclosure check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disclosure {
    Allow,
    /// Part 2 data the patient's consent (`Consent/<id>`) lets go to this client: a disclosure to account for.
    Consented { consent: String, patient: String },
    /// The client may not see this resource; callers answer as if it did not exist.
    Deny(&'static str),
}

impl Disclosure {
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Disclosure::Deny(_))
    }
}

impl Principal {
    /// Whether the client may perform `permission` on `resource_type` at all (scope and role);
    /// the error is the reason, for a 403 that reveals nothing about any particular resource.
    pub fn may(&self, resource_type: &str, permission: Permission) -> Result<(), String> {
        let role_allows = match self.role {
            Role::Admin => resource_type == "AuditEvent",
            _ if resource_type == "AuditEvent" => false,
            Role::Payer => PAYER_TYPES.contains(&resource_type),
            Role::OutpatientProvider => OUTPATIENT_PROVIDER_TYPES.contains(&resource_type),
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
        if !self.needs_consent(facts) {
            return Disclosure::Allow;
        }
        let Some(purpose) = self.purpose else { return Disclosure::Allow };
        match consent::decide(&consent::Request { recipient: &self.organization, purpose, labels: facts.labels, at: facts.at }, facts.consents) {
            consent::Decision::Permitted { consent, patient } => Disclosure::Consented { consent, patient },
            consent::Decision::Withheld(reason) => Disclosure::Deny(reason),
        }
    }

    /// Whether sending this resource to the client would be a disclosure of Part 2 data, decided by
    /// consent: it is labelled, the client is not its owner, and the client is not the gateway itself.
    pub fn needs_consent(&self, facts: Facts<'_>) -> bool {
        labels::is_part2(facts.labels) && facts.owner != self.organization && self.purpose.is_some()
    }

    /// The disclosure check for an earlier version: the current version decides who is a party,
    /// and a label on either applies (a later Part 2 label covers the whole history).
    pub fn disclosure_of_version(&self, current: Facts<'_>, version: Facts<'_>) -> Disclosure {
        let mut labels = current.labels.to_vec();
        labels.extend(version.labels.iter().cloned());
        self.disclosure(Facts { labels: &labels, ..current })
    }

    /// The conditions of [`Principal::disclosure`] a search can apply in the store, so totals and
    /// pages count only what is served. `writable_only` narrows to what [`Principal::may_write`] allows.
    /// `program`: the program's Organization, party to every resource.
    pub fn visibility(&self, program: &str, writable_only: bool) -> Visibility {
        Visibility {
            party: self.organization.clone(),
            party_to_all: self.organization == program,
            withheld_label: self.purpose.map(|_| PART2_LABEL.to_string()),
            purpose: self.purpose.map_or("", Purpose::code),
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
            writable_only,
        }
    }

    /// Whether the client may create resources at ids it chooses (update as create): only the program's own clients.
    pub fn may_choose_ids(&self, program: &str) -> bool {
        self.organization == program
    }

    /// Whether the client may write a new version over `current` (whose facts are `facts`) with
    /// `next`; the error says why, for a caller that can see the resource.
    pub fn may_write(&self, facts: Facts<'_>, current: &Json, next: &Json) -> Result<(), String> {
        if facts.owner == self.organization {
            return Ok(());
        }
        let task_owner = facts.resource_type == "Task" && reference(current, "owner").is_some_and(|owner| names_organization(owner, &self.organization));
        if !task_owner {
            return Err(format!("{} belongs to {}; only its owner may change it", facts.resource_type, facts.owner));
        }
        for (member, _) in current.as_object().into_iter().flat_map(|o| o.iter()).chain(next.as_object().into_iter().flat_map(|o| o.iter())) {
            let unchanged = match (current.get(member), next.get(member)) {
                (Some(a), Some(b)) => same_json(a, b),
                (a, b) => a == b,
            };
            if !TASK_PERFORMER_MEMBERS.contains(&member) && !unchanged {
                return Err(format!("the Task's owner may change only {}; '{member}' differs", TASK_PERFORMER_MEMBERS[3..].join(", ")));
            }
        }
        Ok(())
    }
}

/// What the Organization a Task is assigned to (`Task.owner`) may change: its progress, not the request.
const TASK_PERFORMER_MEMBERS: &[&str] = &["id", "meta", "text", "status", "statusReason", "businessStatus", "executionPeriod", "lastModified", "note", "output"];

/// Equal JSON whatever the order of object members: clients rewrite a resource they read in their own member order.
fn same_json(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w))),
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_json(v, w)),
        _ => a == b,
    }
}

/// Whether a reference names `organization` (`Organization/<id>`): written so, or as `urn:uuid:<id>`,
/// the form the mappings write (see `search::addressed_organizations`).
fn names_organization(reference: &str, organization: &str) -> bool {
    reference == organization || reference.strip_prefix("urn:uuid:").is_some_and(|id| organization.strip_prefix("Organization/") == Some(id))
}

fn reference<'a>(resource: &'a Json, member: &str) -> Option<&'a str> {
    resource.get(member).and_then(|r| r.get("reference")).and_then(Json::as_str)
}

/// The parties of a version being written, from that version alone: its owner's Organization,
/// the program's, the writer's, and the Organizations it is addressed to.
pub fn parties_for_version(owner: &str, program: &str, writer: &Principal, addressed: &[String]) -> Vec<String> {
    let mut parties: Vec<String> = Vec::new();
    for p in [owner, program, writer.organization.as_str()].into_iter().chain(addressed.iter().map(String::as_str)) {
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
        Principal { client_id: org.to_lowercase(), role, organization: format!("Organization/{org}"), scopes: role.default_scopes(), purpose: Some(Purpose::Treatment) }
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
        let provider = principal(Role::OutpatientProvider, "op-riverbend");
        assert!(provider.may("Task", Permission::Update).is_ok());
        assert!(provider.may("MessageHeader", Permission::Create).is_ok());
        assert!(provider.may("Task", Permission::Create).is_err(), "a provider answers Tasks, it does not make them");
        assert!(provider.may("Observation", Permission::Read).is_err());
    }

    #[test]
    fn only_parties_see_a_resource_and_part2_needs_consent() {
        let unit = principal(Role::InpatientUnit, "unit-a");
        let other = principal(Role::InpatientUnit, "unit-b");
        let parties = parties_for_version("Organization/unit-a", "Organization/program", &unit, &[]);
        let facts = Facts { resource_type: "ServiceRequest", parties: &parties, labels: &[], owner: "Organization/unit-a", consents: &[], at: 0 };
        assert_eq!(unit.disclosure(facts), Disclosure::Allow);
        assert!(matches!(other.disclosure(facts), Disclosure::Deny(_)));
        let clinic = principal(Role::Clinic, "program");
        assert_eq!(clinic.disclosure(facts), Disclosure::Allow);
        let labels = vec![PART2_LABEL.to_string()];
        let part2 = Facts { labels: &labels, ..facts };
        assert_eq!(unit.disclosure(part2), Disclosure::Allow, "the owner always sees its own record");
        assert!(matches!(clinic.disclosure(part2), Disclosure::Deny(_)));
        assert!(matches!(clinic.disclosure_of_version(part2, facts), Disclosure::Deny(_)), "a later label covers earlier versions");
        let gateway = Principal { purpose: None, ..clinic };
        assert_eq!(gateway.disclosure(part2), Disclosure::Allow, "the gateway's own work discloses nothing");
    }

    #[test]
    fn parties_come_from_the_version_alone() {
        let payer = principal(Role::Payer, "payer-x");
        let parties = parties_for_version("Organization/payer-x", "Organization/program", &payer, &["Organization/unit-b".into()]);
        assert_eq!(parties, ["Organization/payer-x", "Organization/program", "Organization/unit-b"]);
        assert_eq!(parties_for_version("Organization/payer-x", "Organization/program", &payer, &[]), ["Organization/payer-x", "Organization/program"]);
    }

    #[test]
    fn only_the_owner_writes_and_a_task_owner_only_its_progress() {
        let parse = |t: &str| crate::json::parse(t.as_bytes()).unwrap();
        let unit_b = principal(Role::InpatientUnit, "unit-b");
        let task = parse(r#"{"resourceType":"Task","id":"t","status":"requested","intent":"order","owner":{"reference":"Organization/unit-b"}}"#);
        let facts = Facts { resource_type: "Task", parties: &[], labels: &[], owner: "Organization/unit-a", consents: &[], at: 0 };
        let accepted = parse(r#"{"resourceType":"Task","id":"t","status":"accepted","intent":"order","owner":{"reference":"Organization/unit-b"},"businessStatus":{"text":"seen"}}"#);
        assert_eq!(unit_b.may_write(facts, &task, &accepted), Ok(()));
        let reassigned = parse(r#"{"resourceType":"Task","id":"t","status":"accepted","intent":"order","owner":{"reference":"Organization/unit-c"}}"#);
        assert!(unit_b.may_write(facts, &task, &reassigned).unwrap_err().contains("'owner' differs"));
        let observation = Facts { resource_type: "Observation", ..facts };
        assert!(unit_b.may_write(observation, &task, &accepted).is_err(), "only a Task has a performer who may write");
        assert!(principal(Role::InpatientUnit, "unit-a").may_write(observation, &task, &reassigned).is_ok());
        // The mappings' form of the same reference: the provider a step-down Task is assigned to.
        let provider = principal(Role::OutpatientProvider, "6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21");
        let mapped = parse(r#"{"resourceType":"Task","id":"t","status":"requested","intent":"order","owner":{"reference":"urn:uuid:6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21"}}"#);
        let taken = parse(r#"{"resourceType":"Task","id":"t","status":"accepted","intent":"order","owner":{"reference":"urn:uuid:6f1c8e1a-4a55-4d8e-a7f0-3c2b9d0e5f21"}}"#);
        assert_eq!(provider.may_write(facts, &mapped, &taken), Ok(()));
        assert!(unit_b.may_write(facts, &mapped, &taken).is_err());
        let reordered = parse(r#"{"id":"t","resourceType":"Task","owner":{"reference":"Organization/unit-b"},"intent":"order","status":"accepted"}"#);
        assert_eq!(unit_b.may_write(facts, &task, &reordered), Ok(()), "the order of members is no change");
    }

    #[test]
    fn only_the_program_chooses_ids_and_conditional_matches_are_writable_only() {
        assert!(principal(Role::Clinic, "program").may_choose_ids("Organization/program"));
        assert!(!principal(Role::InpatientUnit, "unit-a").may_choose_ids("Organization/program"));
        let unit = principal(Role::InpatientUnit, "unit-a");
        let visibility = unit.visibility("Organization/program", true);
        assert_eq!((visibility.party.as_str(), visibility.withheld_label.as_deref(), visibility.purpose, visibility.writable_only), ("Organization/unit-a", Some(PART2_LABEL), "TREAT", true));
        assert!(!visibility.party_to_all);
        assert!(principal(Role::Clinic, "program").visibility("Organization/program", false).party_to_all);
    }
}
