//! The R4 Patient compartment: which resource types belong to a patient's record and through which references, indexed as `_compartment` for Patient-level export and `Patient/$everything`.
//!
//! The table follows R4's CompartmentDefinition `patient`, its search parameters written as the
//! element paths they index. A Patient is in its own compartment (and in that of the patients it
//! links to). The index holds `Patient/<id>` under [`PARAM`] for each patient whose compartment a
//! version is in, so a compartment is one indexed lookup on any backend.

use super::references_to;
use crate::json::Json;

/// The search-index parameter holding the patients whose compartment a resource is in.
pub const PARAM: &str = "_compartment";

/// Resource types of the Patient compartment and the elements whose Patient references put a resource in one.
pub const PATIENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["participant.actor"]),
    ("AppointmentResponse", &["actor"]),
    ("Basic", &["subject", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee.party"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    ("CommunicationRequest", &["subject", "sender", "recipient", "requester"]),
    ("Composition", &["subject", "author", "attester.party"]),
    ("Condition", &["subject", "asserter"]),
    ("Consent", &["patient"]),
    ("Coverage", &["policyHolder", "subscriber", "beneficiary", "payor"]),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["candidate"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["subject"]),
    ("Goal", &["subject"]),
    ("Group", &["member.entity"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["subject"]),
    ("Media", &["subject"]),
    ("MedicationAdministration", &["subject", "performer.actor"]),
    ("MedicationDispense", &["subject", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link.other"]),
    ("Person", &["link.target"]),
    ("Procedure", &["subject", "performer.actor"]),
    ("Provenance", &["target"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "action.participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["requester"]),
    ("VisionPrescription", &["patient"]),
];

/// The search clause that keeps a type's resources in the compartment of `Patient/{patient_id}`
/// (compartment search); `None` when the type is not in the compartment.
pub fn patient_clause(resource_type: &str, patient_id: &str) -> Option<super::Clause> {
    is_patient_type(resource_type).then(|| super::Clause::Token { param: PARAM.into(), any: vec![super::TokenMatch { system: None, value: Some(format!("Patient/{patient_id}")) }] })
}

/// Whether resources of this type can be in a patient's compartment.
pub fn is_patient_type(resource_type: &str) -> bool {
    PATIENT.iter().any(|(t, _)| *t == resource_type)
}

/// The patients (`Patient/<id>`) whose compartment a resource is in.
pub fn patients(resource_type: &str, resource: &Json) -> Vec<String> {
    let Some((_, paths)) = PATIENT.iter().find(|(t, _)| *t == resource_type) else { return Vec::new() };
    let mut out = Vec::new();
    if resource_type == "Patient"
        && let Some(id) = resource.get("id").and_then(Json::as_str)
    {
        out.push(format!("Patient/{id}"));
    }
    references_to(resource, paths, "Patient", &mut out);
    out
}

/// Types R4 leaves out of the Patient compartment that are still about one patient, through these
/// elements: what they say is that patient's to consent to (42 CFR Part 2), so their labels and
/// consent follow the patient. They are indexed under [`PARAM`] too, but compartment search,
/// `$everything` and Patient-level export go by [`is_patient_type`] and so still leave them out.
const ABOUT: &[(&str, &[&str])] = &[("Task", &["for"])];

/// The resource types whose resources can be about a patient: those of the Patient compartment and of [`ABOUT`].
pub fn about_types() -> impl Iterator<Item = &'static str> {
    PATIENT.iter().chain(ABOUT).map(|(t, _)| *t)
}

/// The patients a resource is about: those whose compartment it is in, and for a type of [`ABOUT`]
/// the patient it names there. What the `_compartment` index holds and consent lookups read.
pub fn about(resource_type: &str, resource: &Json) -> Vec<String> {
    let mut out = patients(resource_type, resource);
    if let Some((_, paths)) = ABOUT.iter().find(|(t, _)| *t == resource_type) {
        references_to(resource, paths, "Patient", &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patient_is_in_its_own_compartment_and_others_by_their_references() {
        let patient = crate::json::parse(br#"{"resourceType":"Patient","id":"p1","link":[{"other":{"reference":"Patient/p0"},"type":"replaces"}]}"#).unwrap();
        assert_eq!(patients("Patient", &patient), ["Patient/p1", "Patient/p0"]);
        let claim = crate::json::parse(br#"{"resourceType":"Claim","patient":{"reference":"Patient/p1"},"payee":{"party":{"reference":"Patient/p1"}},"provider":{"reference":"Organization/o"}}"#).unwrap();
        assert_eq!(patients("Claim", &claim), ["Patient/p1"]);
        let observation = crate::json::parse(br#"{"resourceType":"Observation","subject":{"reference":"Group/g"},"performer":[{"reference":"http://x/fhir/Patient/p2"}]}"#).unwrap();
        assert_eq!(patients("Observation", &observation), ["Patient/p2"]);
        let task = crate::json::parse(br#"{"resourceType":"Task","for":{"reference":"Patient/p1"}}"#).unwrap();
        assert!(patients("Task", &task).is_empty(), "R4 leaves Task out of the Patient compartment");
        assert_eq!(about("Task", &task), ["Patient/p1"], "but a Task for a patient is about that patient");
        assert!(patient_clause("Task", "p1").is_none());
        assert!(matches!(patient_clause("Observation", "p1"), Some(crate::search::Clause::Token { param, any }) if param == PARAM && any[0].value.as_deref() == Some("Patient/p1")));
    }
}
