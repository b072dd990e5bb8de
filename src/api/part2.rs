//! 42 CFR Part 2 around the one write path and the one disclosure check: labels applied and Consents read into rules when a version is stored, consent rules looked up for a disclosure, the refrain added to what is disclosed.
//!
//! The write hook costs no store round trip: the label rules run in memory, "is or was enrolled"
//! is the store's knowledge (it never becomes false), and a write about a patient not known to be
//! enrolled goes with a check the store runs in the write's own statement, failing it for a retry,
//! labelled, if one is. What it records (consent rules, enrolments) is queued with the version; an
//! enrolment also labels, in its transaction, what was stored about its patients before it.

use std::collections::HashSet;

use super::error::ApiError;
use super::state::AppState;
use crate::auth::consent::{self, Rule};
use crate::auth::labelling::{self, LabelRules};
use crate::auth::labels;
use crate::auth::{Disclosure, Principal};
use crate::json::Json;
use crate::outcome::{Issue, IssueCode};
use crate::store::{Stored, Tx};

/// The label rules.
pub struct Part2 {
    pub rules: LabelRules,
}

impl Part2 {
    pub fn new(rules: LabelRules) -> Part2 {
        Part2 { rules }
    }
}

/// What the write hook found before the version is written, recorded with it by [`after_write`].
#[derive(Default)]
pub struct Pending {
    /// Patients this version enrols in a substance-use program.
    enrols: Vec<String>,
    /// A Consent's rules (replacing its earlier ones), when the version is a privacy Consent.
    consent: Option<(String, Vec<Rule>)>,
}

/// Labels a version about to be stored (the rule set, in memory; the enrolment fact as the store
/// knows it, else checked with the write) and reads a privacy Consent into rules, refusing a bad one (422).
pub async fn before_write(tx: &mut Tx, state: &AppState, resource_type: &str, resource: &mut Json, inherited: &[String]) -> Result<Pending, ApiError> {
    let rules = &state.part2.rules;
    let enrols = rules.enrolls(resource_type, resource);
    let mut part2 = !enrols.is_empty() || rules.is_part2(resource, inherited);
    if !part2 {
        let patients = crate::search::compartment::about(resource_type, resource);
        if state.store.known_enrolled(&patients) {
            part2 = true;
        } else {
            // Checked in the write's statement even when this instance wrote every enrolment: one
            // may be committing now, after its relabelling pass could see this write.
            tx.unless_enrolled(&patients);
        }
    }
    if part2 {
        rules.label(resource);
    }
    let consent = if resource_type == "Consent" && is_privacy_consent(resource) { Some(consent_rules(tx, state, resource).await?) } else { None };
    Ok(Pending { enrols, consent })
}

/// Records what [`before_write`] found, queued with the version just written; an enrolment also
/// labels what was stored about its patients before it ([`label_earlier`]).
pub async fn after_write(tx: &mut Tx, state: &AppState, pending: Pending, stored: &Stored) -> Result<(), ApiError> {
    if !pending.enrols.is_empty() {
        tx.mark_part2_patients(&pending.enrols, &stored.last_updated);
        label_earlier(tx, &state.part2.rules, &pending.enrols).await?;
    }
    if let Some((consent, rules)) = pending.consent {
        tx.replace_consent_rules(&consent, &rules);
    }
    Ok(())
}

/// Labels, in the enrolling transaction, every resource about newly enrolled patients that was
/// stored without the Part 2 label (before the enrolment, or earlier in this transaction), and
/// every version of it: "every resource about a client who is or was enrolled" holds from the
/// enrolment on, whichever version a way out serves. The labels are the write path's own (the
/// rules, then normalisation), so the resource reads as if written after the enrolment; version
/// numbers stay, as with FHIR's `$meta-add`. Only versions lacking the label are read.
async fn label_earlier(tx: &mut Tx, rules: &LabelRules, patients: &[String]) -> Result<(), ApiError> {
    for version in tx.unlabelled_about(patients, labels::PART2_LABEL).await? {
        let mut resource = crate::json::parse(version.body.as_bytes()).map_err(|e| ApiError::Internal(format!("a stored version does not parse: {e}")))?;
        rules.label(&mut resource);
        let mut labelled = labels::normalise(&mut resource, &[]);
        for label in &version.labels {
            if !labelled.contains(label) {
                labelled.push(label.clone());
            }
        }
        tx.relabel(&version, &resource.to_string_compact(), &labelled);
    }
    Ok(())
}

/// A Consent about disclosing information (`scope` patient-privacy): the kind that decides disclosure.
fn is_privacy_consent(resource: &Json) -> bool {
    let codings = resource.get("scope").and_then(|s| s.get("coding")).and_then(Json::as_array).unwrap_or_default();
    codings.iter().any(|c| c.get("code").and_then(Json::as_str) == Some("patient-privacy"))
}

/// The rules of a privacy Consent being written, or a 422 naming each problem and where it is.
async fn consent_rules(tx: &mut Tx, state: &AppState, resource: &Json) -> Result<(String, Vec<Rule>), ApiError> {
    let id = resource.get("id").and_then(Json::as_str).unwrap_or_default().to_string();
    let updated = resource.get("meta").and_then(|m| m.get("lastUpdated")).and_then(Json::as_str).and_then(|t| consent::seconds(t, false)).unwrap_or(0);
    // Recipients: configured partners' Organizations, the program's, and Organizations already stored.
    let mut configured: HashSet<String> = state.clients.values().map(|c| c.organization.clone()).collect();
    configured.insert(state.program().to_string());
    let mut named = Vec::new();
    collect_actors(resource.get("provision"), &mut named);
    let mut known = configured;
    for reference in named {
        if known.contains(&reference) {
            continue;
        }
        if let Some(org_id) = reference.strip_prefix("Organization/")
            && tx.current("Organization", org_id).await?.is_some()
        {
            known.insert(reference);
        }
    }
    let recipients = |reference: &str| known.contains(reference);
    match consent::rules_of(resource, updated, &recipients) {
        Ok(rules) => Ok((format!("Consent/{id}"), rules)),
        Err(issues) => Err(ApiError::Unprocessable(issues)),
    }
}

fn collect_actors(provision: Option<&Json>, out: &mut Vec<String>) {
    let Some(provision) = provision else { return };
    for actor in provision.get("actor").and_then(Json::as_array).unwrap_or_default() {
        if let Some(r) = actor.get("reference").and_then(|r| r.get("reference")).and_then(Json::as_str) {
            out.push(r.to_string());
        }
    }
    for nested in provision.get("provision").and_then(Json::as_array).unwrap_or_default() {
        collect_actors(Some(nested), out);
    }
}

/// The consent rules the disclosure check needs for `stored` going to `principal`: looked up only
/// when it is Part 2 data and the client is not its owner. A failed lookup withholds (logged).
pub async fn consents_for(state: &AppState, principal: &Principal, stored: &Stored) -> Vec<Rule> {
    if !principal.needs_consent(stored.facts()) {
        return Vec::new();
    }
    match state.store.consent_rules_for(&stored.resource_type, &stored.id).await {
        Ok(rules) => rules,
        Err(e) => {
            tracing::warn!(error = %e, "Consent rules could not be read; the Part 2 record is withheld.");
            Vec::new()
        }
    }
}

/// The consent rules that can bear on what goes to one recipient (naming it, or anyone), read once
/// for many resources (an export page); [`RecipientConsents::of`] picks a resource's patients' rules.
pub struct RecipientConsents {
    rules: Vec<Rule>,
}

impl RecipientConsents {
    pub async fn read(state: &AppState, principal: &Principal) -> Result<RecipientConsents, crate::store::StoreError> {
        let rules = if principal.purpose.is_some() { state.store.consent_rules_naming(&principal.organization).await? } else { Vec::new() };
        Ok(RecipientConsents { rules })
    }

    /// The rules of the patients whose compartment `version` is in, when its current version
    /// (`current`, whose facts decide) needs consent; the version is parsed only then.
    pub fn of(&self, principal: &Principal, current: &Stored, version: &Stored) -> Vec<Rule> {
        if self.rules.is_empty() || !principal.needs_consent(current.facts()) {
            return Vec::new();
        }
        let Ok(resource) = crate::json::parse(version.body.as_bytes()) else { return Vec::new() };
        let patients = crate::search::compartment::about(&current.resource_type, &resource);
        self.rules.iter().filter(|r| patients.contains(&r.patient)).cloned().collect()
    }
}

/// Adds the no-re-disclosure refrain to a disclosed resource's stored text.
pub fn with_refrain(stored: &mut Stored) {
    if let Ok(mut resource) = crate::json::parse(stored.body.as_bytes()) {
        labelling::add_refrain_whole(&mut resource);
        stored.body = resource.to_string_compact();
    }
}

/// A disclosure of Part 2 data the patient's consent allowed, for the accounting of disclosures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disclosed {
    pub patient: String,
    /// `Consent/<id>`.
    pub consent: String,
    /// `Organization/<id>` of the recipient.
    pub recipient: String,
    pub purpose: consent::Purpose,
    /// `Type/id` of what was disclosed.
    pub resource: String,
}

impl Disclosed {
    pub fn of(principal: &Principal, decision: &Disclosure, resource: String) -> Option<Disclosed> {
        match (decision, principal.purpose) {
            (Disclosure::Consented { consent, patient }, Some(purpose)) => {
                Some(Disclosed { patient: patient.clone(), consent: consent.clone(), recipient: principal.organization.clone(), purpose, resource })
            }
            _ => None,
        }
    }
}

/// Adds the 42 CFR § 2.32 notice to a searchset that discloses Part 2 data: an OperationOutcome
/// entry (`search.mode` outcome) with the notice as an informational issue.
pub fn notice_entry(bundle: &mut super::fhir::BundleText) {
    let outcome = crate::outcome::operation_outcome(&[Issue::information(IssueCode::Informational, "", labelling::NOTICE)]);
    let url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let mode = super::fhir::object([("mode", Json::string("outcome"))]);
    bundle.entry(Some(&url), Some(&outcome.to_string_compact()), &[("search", mode)]);
}

/// The response header that carries the 42 CFR § 2.32 notice with a read of Part 2 data disclosed
/// under the patient's consent (a single resource has no place of its own for it).
pub const NOTICE_HEADER: &str = "x-part2-notice";

/// Adds the notice header to a read that disclosed Part 2 data.
pub fn notice_header(response: &mut axum::response::Response) {
    response.headers_mut().insert(NOTICE_HEADER, axum::http::HeaderValue::from_static(labelling::NOTICE));
}
