//! The outbox's send-time consent check, for every message kind: each kind's purpose of use (one table), and a payload's 42 CFR Part 2 resources decided again by [`crate::auth::consent::decide`] when the message is sent.
//!
//! A message was validated when queued, but a consent may have been revoked or may expire while it
//! waits, so the decision is taken at the last moment. Withheld resources leave the message when
//! its kind allows it and it stays valid without them (validated again); otherwise the message is
//! held as a dead letter "consent required", and `outbox replay` after a new consent sends it.

use crate::api::part2::Disclosed;
use crate::api::state::AppState;
use crate::auth::consent::{self, Decision, Purpose};
use crate::auth::labelling;
use crate::auth::labels;
use crate::json::Json;
use crate::partner::Partner;

/// Whose purpose a message kind carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurposeOf {
    /// The exchange's own purpose.
    Exchange(Purpose),
    /// The recipient's configured purpose (a subscription notification carries the subscriber's).
    Recipient,
}

/// What a message may lose when part of it is withheld.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withholding {
    /// Nothing: a withheld resource holds the whole message (a PAS request cannot drop its diagnoses).
    Nothing,
    /// Bundle entries, when the Bundle stays valid without them.
    Entries,
}

/// Every message kind the outbox sends: its purpose of use and what it may lose. A kind not here
/// is held ("consent required") whenever it carries Part 2 data, so a new way out cannot skip the check.
pub const KINDS: &[(&str, PurposeOf, Withholding)] = &[
    (super::pas::SUBMIT, PurposeOf::Exchange(Purpose::Payment), Withholding::Nothing),
    (super::inquiry::INQUIRE, PurposeOf::Exchange(Purpose::Payment), Withholding::Nothing),
    (super::subscription::CREATE, PurposeOf::Exchange(Purpose::Payment), Withholding::Nothing),
    (super::referral::TASK_UPDATE, PurposeOf::Exchange(Purpose::Treatment), Withholding::Entries),
    // A feedback message exists to tell the unit how its referral went: left with its header alone it
    // would still tell the unit that the client is in the program, which is what Part 2 protects.
    (super::referral::FEEDBACK_MESSAGE, PurposeOf::Exchange(Purpose::Treatment), Withholding::Nothing),
    // A document's Composition lists its Observations: it cannot lose one and stay what it says.
    (super::referral::FEEDBACK_DOCUMENT, PurposeOf::Exchange(Purpose::Treatment), Withholding::Nothing),
    (super::step_down::REFERRAL, PurposeOf::Exchange(Purpose::Treatment), Withholding::Entries),
    (super::topics::NOTIFICATION, PurposeOf::Recipient, Withholding::Entries),
];

/// The answer of the send-time check.
#[derive(Debug)]
pub enum Checked {
    /// Send: the payload to send when it changed (refrain added, withheld entries left out), and the disclosures to account for once delivered.
    Send { payload: Option<String>, disclosures: Vec<Disclosed> },
    /// Do not send: why ("consent required: …").
    Hold(String),
}

/// Who receives a message and why: its Organization and its purpose of use.
pub type Recipient = (String, Purpose);

/// The recipient of a client's own messages (notifications to its Subscriptions): its Organization and purpose.
pub fn client_recipient(state: &AppState, client_id: &str) -> Option<Recipient> {
    state.clients.get(client_id).map(|c| (c.organization.clone(), c.config.purpose()))
}

/// The recipient of a partner's messages: the Organization of the inbound client speaking for it, else `Organization/<name>`.
pub fn recipient(state: &AppState, partner: &Partner) -> Recipient {
    let client = partner.config.clients.iter().find_map(|id| state.clients.get(id));
    let organization = client.map_or_else(|| format!("Organization/{}", partner.config.name), |c| c.organization.clone());
    let purpose = client.map(|c| c.config.purpose()).unwrap_or(match partner.config.kind {
        crate::config::PartnerKind::Payer => Purpose::Payment,
        _ => Purpose::Treatment,
    });
    (organization, purpose)
}

/// Checks a message's payload at send time. `about`: patients the message is about that its
/// resources cannot name (a referral's feedback names the referrer's Patient, or none, not the program's client).
pub async fn check(state: &AppState, (recipient, configured): Recipient, kind: &str, payload: &str, about: &[String]) -> Checked {
    let Ok(mut document) = crate::json::parse(payload.as_bytes()) else { return Checked::Send { payload: None, disclosures: Vec::new() } };
    if recipient == state.program() {
        // The program's own client (a notification of its own Subscription): use inside the program is not a disclosure.
        return Checked::Send { payload: None, disclosures: Vec::new() };
    }
    let (purpose, withholding) = match KINDS.iter().find(|(k, _, _)| *k == kind) {
        Some((_, PurposeOf::Exchange(p), w)) => (*p, *w),
        Some((_, PurposeOf::Recipient, w)) => (configured, *w),
        None => (configured, Withholding::Nothing),
    };
    let known = KINDS.iter().any(|(k, _, _)| *k == kind);
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut disclosures = Vec::new();
    let mut withheld_entries = Vec::new();
    let mut changed = false;
    // The top-level resource and, in a Bundle, each entry's resource (index = entry number).
    let mut targets: Vec<Option<usize>> = vec![None];
    let entry_count = document.get("entry").and_then(Json::as_array).map_or(0, <[Json]>::len);
    let bundle_patients: Vec<(String, String)> = document
        .get("entry")
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let resource = e.get("resource")?;
            (resource.get("resourceType").and_then(Json::as_str) == Some("Patient"))
                .then(|| Some((e.get("fullUrl")?.as_str()?.to_string(), format!("Patient/{}", resource.get("id")?.as_str()?))))?
        })
        .collect();
    targets.extend((0..entry_count).map(Some));
    for target in targets {
        let resource = match target {
            None => Some(&document),
            Some(n) => document.get("entry").and_then(Json::as_array).and_then(|e| e.get(n)).and_then(|e| e.get("resource")),
        };
        let Some(resource) = resource else { continue };
        let resource_type = resource.get("resourceType").and_then(Json::as_str).unwrap_or_default().to_string();
        // A Bundle is decided by its entries (its own label is their high-water mark).
        if target.is_none() && resource_type == "Bundle" {
            continue;
        }
        let mut patients = crate::search::compartment::about(&resource_type, resource);
        // Inside a Bundle, entries point at each other by fullUrl (`urn:uuid:…`).
        referenced_patients(resource, &bundle_patients, &mut patients);
        patients.extend(about.iter().filter(|p| !patients.contains(p)).cloned().collect::<Vec<_>>());
        let mut part2 = state.part2.rules.is_part2(resource, &[]);
        if !part2 && !patients.is_empty() {
            match state.store.part2_patients(&patients).await {
                Ok(found) => part2 = !found.is_empty(),
                Err(e) => return Checked::Hold(format!("consent required: enrolment could not be read ({e}); the message waits for a replay")),
            }
        }
        if !part2 {
            continue;
        }
        let mut labelled = resource.clone();
        state.part2.rules.label(&mut labelled);
        let labels = labels::of(&labelled);
        let rules = match state.store.consent_rules_of(&patients).await {
            Ok(rules) => rules,
            Err(e) => return Checked::Hold(format!("consent required: consents could not be read ({e}); the message waits for a replay")),
        };
        let reference = format!("{resource_type}/{}", resource.get("id").and_then(Json::as_str).unwrap_or_default());
        match consent::decide(&consent::Request { recipient: &recipient, purpose, labels: &labels, at }, &rules) {
            Decision::Permitted { consent, patient } => {
                labelling::add_refrain_whole(&mut labelled);
                set_resource(&mut document, target, labelled);
                changed = true;
                disclosures.push(Disclosed { patient, consent, recipient: recipient.clone(), purpose, resource: reference });
            }
            Decision::Withheld(reason) => match (withholding, target) {
                (Withholding::Entries, Some(n)) if known => withheld_entries.push(n),
                _ => return Checked::Hold(format!("consent required: {reference} may not go to {recipient} for {}: {reason}", purpose.name())),
            },
        }
    }
    if !withheld_entries.is_empty()
        && let Some(Json::Array(entries)) = document.as_object_mut().and_then(|o| o.get_mut("entry"))
    {
        let kept: Vec<Json> = entries.iter().enumerate().filter(|(n, _)| !withheld_entries.contains(n)).map(|(_, e)| e.clone()).collect();
        *entries = kept;
        changed = true;
    }
    if !changed {
        return Checked::Send { payload: None, disclosures };
    }
    if !disclosures.is_empty() {
        if document.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
            // The Bundle carries the high-water mark of its entries, and the refrain.
            state.part2.rules.label(&mut document);
            labelling::add_refrain(&mut document);
        }
        // What the message discloses goes with the § 2.32 notice, on the message itself.
        labelling::add_notice(&mut document);
    }
    // Nothing invalid leaves: what changed is validated again before it is sent.
    match crate::api::write::validate(state, document, Vec::new()).await {
        Ok(document) => Checked::Send { payload: Some(document.to_string_compact()), disclosures },
        Err(_) => Checked::Hold(format!("consent required: without the {} withheld resource(s) the message is not valid", withheld_entries.len())),
    }
}

/// Adds the patients `resource` references by a Bundle entry's fullUrl (`bundle_patients`: fullUrl → `Patient/<id>`).
fn referenced_patients(resource: &Json, bundle_patients: &[(String, String)], out: &mut Vec<String>) {
    match resource {
        Json::Object(o) => {
            if let Some(reference) = o.get("reference").and_then(Json::as_str)
                && let Some((_, patient)) = bundle_patients.iter().find(|(url, _)| url == reference)
                && !out.contains(patient)
            {
                out.push(patient.clone());
            }
            for (_, v) in o.iter() {
                referenced_patients(v, bundle_patients, out);
            }
        }
        Json::Array(items) => items.iter().for_each(|v| referenced_patients(v, bundle_patients, out)),
        _ => {}
    }
}

fn set_resource(document: &mut Json, target: Option<usize>, resource: Json) {
    match target {
        None => *document = resource,
        Some(n) => {
            if let Some(Json::Array(entries)) = document.as_object_mut().and_then(|o| o.get_mut("entry"))
                && let Some(Json::Object(entry)) = entries.get_mut(n)
            {
                entry.insert("resource", resource);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_purpose_and_the_exchanges_follow_the_rule() {
        let purpose = |kind: &str| KINDS.iter().find(|(k, _, _)| *k == kind).map(|(_, p, _)| *p);
        assert_eq!(purpose("pas-submit"), Some(PurposeOf::Exchange(Purpose::Payment)));
        assert_eq!(purpose("step-down-referral"), Some(PurposeOf::Exchange(Purpose::Treatment)));
        assert_eq!(purpose("referral-feedback-message"), Some(PurposeOf::Exchange(Purpose::Treatment)));
        assert_eq!(purpose("subscription-notification"), Some(PurposeOf::Recipient));
        let mut kinds: Vec<&str> = KINDS.iter().map(|(k, _, _)| *k).collect();
        kinds.dedup();
        assert_eq!(kinds.len(), KINDS.len(), "one row per kind");
    }
}
