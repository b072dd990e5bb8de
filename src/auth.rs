//! SMART Backend Services: the gateway is its partners' authorization server. Client assertions, scopes, roles and the disclosure policy live here; HTTP does not.
//!
//! - [`scopes`]: SMART v1/v2 `system/` scopes as permissions per type.
//! - [`assertion`]: verifying a `private_key_jwt` client assertion (RS384/ES384) against the client's JWKS (its `kid` names a key by key id or thumbprint); what a registered or published JWKS may hold.
//! - [`keys`]: generating a partner key pair and its JWKS (`iop-gateway clients add`), named by its RFC 7638 thumbprint.
//! - [`labels`]: security labels normalised when stored (42 CFR Part 2 however it is spelt).
//! - [`labelling`]: the DS4P label rule set (data) that marks 42 CFR Part 2 resources when they are stored.
//! - [`consent`]: the one consent decision (R4 Consent → rules; recipient × purpose × labels × time → permitted or withheld).
//! - [`policy`]: which partner may do what to which resource, and the one disclosure check every outgoing resource passes.

pub mod assertion;
pub mod consent;
pub mod keys;
pub mod labels;
pub mod labelling;
pub mod policy;
pub mod scopes;

use serde::Deserialize;

pub use assertion::{AssertionError, ClientKeys};
pub use policy::{Disclosure, Principal};
pub use scopes::{Permission, ScopeError, ScopeSet};

/// The path of the token endpoint under the base URL.
pub const TOKEN_PATH: &str = "/auth/token";

/// The authorization endpoint's path: it exists only to refuse, since backend services never use it
/// (SMART's `oauth-uris` extension, which older clients read the token endpoint from, requires one).
pub const AUTHORIZE_PATH: &str = "/auth/authorize";

/// `client_assertion_type` of SMART Backend Services (a signed JWT proves the client's identity).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The form a client posts to the token endpoint for a `client_credentials` grant.
pub fn token_request_form<'a>(assertion: &'a str, scope: &'a str) -> [(&'static str, &'a str); 4] {
    [("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", assertion), ("scope", scope)]
}

/// What a partner is; decides which resource types it may touch at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A referring inpatient or residential unit: sends referrals and Tasks, sees what it sent and what the program sent back.
    InpatientUnit,
    /// A payer: sees prior-authorization data addressed to it.
    Payer,
    /// A weekly therapist or continuing-care group the program steps its graduates down to: reads the
    /// step-down referrals addressed to it and answers them (a Task update or a feedback message).
    OutpatientProvider,
    /// The program's own clinic systems (e.g. its export client): see the program's records.
    Clinic,
    /// Operators: see the audit trail and partner status, no clinical data.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::InpatientUnit => "inpatient-unit",
            Role::Payer => "payer",
            Role::OutpatientProvider => "outpatient-provider",
            Role::Clinic => "clinic",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        [Role::InpatientUnit, Role::Payer, Role::OutpatientProvider, Role::Clinic, Role::Admin].into_iter().find(|r| r.as_str() == text)
    }

    /// The scopes a client of this role may be granted unless its configuration says otherwise.
    pub fn default_scopes(self) -> ScopeSet {
        let text = match self {
            Role::InpatientUnit => {
                // What a BSeR referral carries (as a message or a transaction): the unit creates its own copies, and the
                // parties rule keeps them between the unit and the program.
                "system/Patient.cruds system/ServiceRequest.cruds system/Task.cruds system/Communication.cruds system/DocumentReference.cruds \
                 system/Condition.cruds system/Observation.cruds system/Consent.cruds system/Encounter.cruds system/CarePlan.rs \
                 system/QuestionnaireResponse.cruds system/MessageHeader.c system/Organization.cruds system/Practitioner.cruds \
                 system/PractitionerRole.cruds system/Coverage.cruds system/Subscription.cruds"
            }
            Role::Payer => "system/Claim.cruds system/ClaimResponse.cruds system/Coverage.rs system/Task.rus system/Communication.crs system/Patient.rs system/Subscription.cruds",
            // What a step-down referral message carries, read-only, and the Task it answers; MessageHeader
            // create for a feedback message to `$process-message`.
            Role::OutpatientProvider => {
                "system/Task.rus system/ServiceRequest.rs system/Patient.rs system/Coverage.rs system/Consent.rs system/Bundle.rs \
                 system/Organization.rs system/PractitionerRole.rs system/MessageHeader.c system/Subscription.cruds"
            }
            Role::Clinic => "system/*.cruds",
            Role::Admin => "system/AuditEvent.rs",
        };
        ScopeSet::parse(text).unwrap_or_default()
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
