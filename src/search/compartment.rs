//! The R4 Patient compartment as the gateway indexes it: which search parameters put a stored resource in a patient's compartment (compartment search, and whatever gathers "everything about a patient").

/// The search parameters (of [`super::params`]) through which a resource of `resource_type` belongs
/// to a Patient's compartment; empty when the type is not in the compartment.
///
/// From `CompartmentDefinition/patient` (R4), keeping the parameters the gateway indexes: the ones
/// left out (Observation `performer`, Communication `sender`/`recipient`, Claim `payee`, …) name a
/// patient only in unusual records, and an unindexed parameter cannot be searched. Coverage's
/// `beneficiary` is indexed as `patient`; Task is not in R4's Patient compartment.
pub fn patient_compartment(resource_type: &str) -> &'static [&'static str] {
    match resource_type {
        "Observation" | "QuestionnaireResponse" | "DocumentReference" | "Communication" => &["subject"],
        "ServiceRequest" => &["subject", "performer"],
        "Encounter" | "EpisodeOfCare" | "CarePlan" | "Condition" | "Claim" | "ClaimResponse" | "Coverage" | "Consent" | "Procedure" | "Goal" | "Provenance" => &["patient"],
        _ => &[],
    }
}

/// The search clause that keeps a type's resources in the compartment of `Patient/{patient_id}`;
/// `None` when the type is not in the compartment.
pub fn patient_clause(resource_type: &str, patient_id: &str) -> Option<super::Clause> {
    let params = patient_compartment(resource_type);
    (!params.is_empty()).then(|| super::Clause::Compartment { params, reference: format!("Patient/{patient_id}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compartment_parameter_is_an_indexed_reference() {
        for t in crate::search::SEARCHABLE_TYPES {
            for name in patient_compartment(t) {
                let def = crate::search::params(t).iter().find(|p| p.name == *name).unwrap_or_else(|| panic!("{t}.{name} is not indexed"));
                assert_eq!(def.kind, crate::search::Kind::Reference, "{t}.{name}");
                assert!(def.target.is_none_or(|target| target == "Patient"), "{t}.{name}");
            }
        }
        assert!(patient_clause("Task", "p1").is_none());
        assert_eq!(patient_clause("Observation", "p1"), Some(crate::search::Clause::Compartment { params: &["subject"], reference: "Patient/p1".into() }));
    }
}
