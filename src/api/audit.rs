//! AuditEvents in the shape of IHE Basic Audit Log Patterns (BALP): one per read, write, search, operation, token request and denial, and the admin's `GET /AuditEvent`.

use base64::Engine as _;

use super::fhir::now_instant;
use super::part2::Disclosed;
use crate::json::Json;
use crate::store::AuditRow;

/// `AuditEvent.outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    Success,
    /// The request was refused (4xx): a denial or a client error.
    MinorFailure,
    /// The gateway failed (5xx).
    SeriousFailure,
}

impl AuditOutcome {
    pub fn code(self) -> &'static str {
        match self {
            AuditOutcome::Success => "0",
            AuditOutcome::MinorFailure => "4",
            AuditOutcome::SeriousFailure => "8",
        }
    }

    pub fn from_status(status: u16) -> AuditOutcome {
        match status {
            0..=399 => AuditOutcome::Success,
            400..=499 => AuditOutcome::MinorFailure,
            _ => AuditOutcome::SeriousFailure,
        }
    }
}

/// What one audit record says; built up while a request is handled.
#[derive(Clone, Debug)]
pub struct Audit {
    /// Client id, or `anonymous` when no valid token was presented.
    pub client: String,
    /// A `restful-interaction` code (`read`, `create`, `search-type`, `operation`, …) or `login` for the token endpoint.
    pub subtype: &'static str,
    /// `C`, `R`, `U`, `D` or `E`.
    pub action: &'static str,
    /// `Type/id` of each resource acted on.
    pub entities: Vec<String>,
    /// The search query (BALP Query pattern), kept as the client sent it.
    pub query: Option<String>,
    /// Why a request was refused.
    pub description: Option<String>,
    pub address: Option<String>,
    /// Set once the record was written inside the request's own transaction.
    pub recorded: bool,
    /// Part 2 data a consent let go: each (patient, consent) becomes a PrivacyDisclosure AuditEvent.
    pub disclosures: Vec<Disclosed>,
}

impl Audit {
    pub fn new(client: &str, subtype: &'static str, action: &'static str, address: Option<String>) -> Audit {
        Audit { client: client.to_string(), subtype, action, entities: Vec::new(), query: None, description: None, address, recorded: false, disclosures: Vec::new() }
    }

    /// The audit row: indexed columns plus the AuditEvent.
    pub fn row(&self, base_url: &str, outcome: AuditOutcome) -> AuditRow {
        let id = uuid::Uuid::now_v7().to_string();
        let recorded = now_instant();
        let coding = |system: &str, code: &str, display: &str| {
            let mut members = vec![("system", Json::string(system)), ("code", Json::string(code))];
            if !display.is_empty() {
                members.push(("display", Json::string(display)));
            }
            super::fhir::object(members)
        };
        let login = self.subtype == "login";
        let event_type = if login {
            coding("http://dicom.nema.org/resources/ontology/DCM", "110114", "User Authentication")
        } else {
            coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "Restful Operation")
        };
        let subtype = if login {
            coding("http://dicom.nema.org/resources/ontology/DCM", "110122", "Login")
        } else {
            coding("http://hl7.org/fhir/restful-interaction", self.subtype, "")
        };
        let mut client_agent = vec![
            ("type", super::fhir::object([("coding", Json::Array(vec![coding("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID")]))])),
            (
                "who",
                super::fhir::object([(
                    "identifier",
                    super::fhir::object([("system", Json::string(format!("{base_url}/clients"))), ("value", Json::string(self.client.as_str()))]),
                )]),
            ),
            // `altId` carries the client id so `GET /AuditEvent?altid=<client>` finds a partner's events.
            ("altId", Json::string(self.client.as_str())),
            ("requestor", Json::Bool(true)),
        ];
        if let Some(address) = &self.address {
            client_agent.push(("network", super::fhir::object([("address", Json::string(address.as_str())), ("type", Json::string("2"))])));
        }
        let server_agent = super::fhir::object([
            ("type", super::fhir::object([("coding", Json::Array(vec![coding("http://dicom.nema.org/resources/ontology/DCM", "110152", "Destination Role ID")]))])),
            ("who", super::fhir::object([("display", Json::string("iop-gateway"))])),
            ("requestor", Json::Bool(false)),
        ]);
        let mut entities: Vec<Json> = self
            .entities
            .iter()
            .map(|reference| {
                let patient = reference.starts_with("Patient/");
                super::fhir::object([
                    ("what", super::fhir::object([("reference", Json::string(reference.as_str()))])),
                    ("type", coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", if patient { "1" } else { "2" }, if patient { "Person" } else { "System Object" })),
                    ("role", coding("http://terminology.hl7.org/CodeSystem/object-role", if patient { "1" } else { "4" }, if patient { "Patient" } else { "Domain Resource" })),
                ])
            })
            .collect();
        if let Some(query) = &self.query {
            entities.push(super::fhir::object([
                ("type", coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object")),
                ("role", coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query")),
                ("query", Json::string(base64::engine::general_purpose::STANDARD.encode(query))),
            ]));
        }
        let mut event = vec![
            ("resourceType", Json::string("AuditEvent")),
            ("id", Json::string(id.as_str())),
            ("type", event_type),
            ("subtype", Json::Array(vec![subtype])),
            ("action", Json::string(self.action)),
            ("recorded", Json::string(recorded.as_str())),
            ("outcome", Json::string(outcome.code())),
        ];
        if let Some(description) = &self.description {
            event.push(("outcomeDesc", Json::string(description.as_str())));
        }
        event.push(("agent", Json::Array(vec![super::fhir::object(client_agent), server_agent])));
        event.push((
            "source",
            super::fhir::object([
                ("site", Json::string(base_url)),
                ("observer", super::fhir::object([("display", Json::string("iop-gateway"))])),
                ("type", Json::Array(vec![coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")])),
            ]),
        ));
        if !entities.is_empty() {
            event.push(("entity", Json::Array(entities)));
        }
        AuditRow {
            id,
            recorded,
            client: self.client.clone(),
            action: self.action.to_string(),
            subtype: self.subtype.to_string(),
            outcome: outcome.code().to_string(),
            entity: self.entities.first().cloned().unwrap_or_default(),
            body: super::fhir::object(event).to_string_compact(),
        }
    }
}

/// The accounting of disclosures: one AuditEvent in the shape of IHE BALP's
/// `IHE.BasicAudit.PrivacyDisclosure.Source` (CC-BY-4.0, IHE International) per patient, consent,
/// recipient and purpose among `disclosures`: type DICOM Export, subtype ISO 21089 `disclose`,
/// `purposeOfEvent`, the source (the gateway) and recipient agents, the patient, the consent and
/// what was disclosed. `client` is the recipient's client id, `address` its network address.
pub fn disclosure_rows(disclosures: &[Disclosed], client: &str, address: Option<&str>, base_url: &str) -> Vec<AuditRow> {
    use super::fhir::object;
    let mut groups: Vec<(&Disclosed, Vec<&str>)> = Vec::new();
    for d in disclosures {
        match groups.iter_mut().find(|(g, _)| g.patient == d.patient && g.consent == d.consent && g.recipient == d.recipient && g.purpose == d.purpose) {
            Some((_, resources)) => {
                if !resources.contains(&d.resource.as_str()) {
                    resources.push(&d.resource);
                }
            }
            None => groups.push((d, vec![d.resource.as_str()])),
        }
    }
    let coding = |system: &str, code: &str, display: &str| object([("system", Json::string(system)), ("code", Json::string(code)), ("display", Json::string(display))]);
    let concept = |c: Json| object([("coding", Json::Array(vec![c]))]);
    let entity = |reference: &str, type_code: &str, type_display: &str, role: &str, role_display: &str| {
        object([
            ("what", object([("reference", Json::string(reference))])),
            ("type", coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", type_code, type_display)),
            ("role", coding("http://terminology.hl7.org/CodeSystem/object-role", role, role_display)),
        ])
    };
    groups
        .into_iter()
        .map(|(d, resources)| {
            let id = uuid::Uuid::now_v7().to_string();
            let recorded = now_instant();
            let mut recipient = vec![
                ("type", concept(coding("http://dicom.nema.org/resources/ontology/DCM", "110152", "Destination Role ID"))),
                ("who", object([("reference", Json::string(d.recipient.as_str()))])),
                ("altId", Json::string(client)),
                ("requestor", Json::Bool(true)),
            ];
            if let Some(address) = address {
                recipient.push(("network", object([("address", Json::string(address)), ("type", Json::string("2"))])));
            }
            let source = object([
                ("type", concept(coding("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID"))),
                ("who", object([("display", Json::string("iop-gateway"))])),
                ("requestor", Json::Bool(false)),
                ("network", object([("address", Json::string(base_url)), ("type", Json::string("5"))])),
            ]);
            let authorizer = object([
                ("type", concept(coding("http://snomed.info/sct", "429577009", "Patient advocate"))),
                ("who", object([("reference", Json::string(d.patient.as_str()))])),
                ("requestor", Json::Bool(false)),
            ]);
            let mut entities = vec![entity(&d.patient, "1", "Person", "1", "Patient"), entity(&d.consent, "2", "System Object", "13", "Security Resource")];
            entities.extend(resources.iter().map(|r| entity(r, "2", "System Object", "4", "Domain Resource")));
            let purpose = concept(coding(crate::auth::consent::ACT_REASON, d.purpose.code(), d.purpose.name()));
            let event = object([
                ("resourceType", Json::string("AuditEvent")),
                ("id", Json::string(id.as_str())),
                ("type", coding("http://dicom.nema.org/resources/ontology/DCM", "110106", "Export")),
                ("subtype", Json::Array(vec![coding("http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle", "disclose", "Disclose Record Lifecycle Event")])),
                ("action", Json::string("R")),
                ("recorded", Json::string(recorded.as_str())),
                ("outcome", Json::string("0")),
                ("outcomeDesc", Json::string(format!("42 CFR Part 2 data disclosed to {} for {} under {}", d.recipient, d.purpose.name(), d.consent))),
                ("purposeOfEvent", Json::Array(vec![purpose])),
                ("agent", Json::Array(vec![source, object(recipient), authorizer])),
                (
                    "source",
                    object([
                        ("site", Json::string(base_url)),
                        ("observer", object([("display", Json::string("iop-gateway"))])),
                        ("type", Json::Array(vec![coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")])),
                    ]),
                ),
                ("entity", Json::Array(entities)),
            ]);
            AuditRow {
                id,
                recorded,
                client: client.to_string(),
                action: "R".into(),
                subtype: DISCLOSE.into(),
                outcome: "0".into(),
                entity: d.patient.clone(),
                body: event.to_string_compact(),
            }
        })
        .collect()
}

/// `AuditEvent.subtype` of an accounting-of-disclosures record (ISO 21089 lifecycle).
pub const DISCLOSE: &str = "disclose";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_are_valid_r4() {
        let validator = super::super::state::default_validator();
        let mut audit = Audit::new("unit-a", "search-type", "E", Some("127.0.0.1".into()));
        audit.entities.push("Patient/p1".into());
        audit.query = Some("identifier=urn:x|1".into());
        audit.description = Some("not a party".into());
        let row = audit.row("http://127.0.0.1:8080", AuditOutcome::MinorFailure);
        let report = validator.validate_bytes(row.body.as_bytes(), &[]);
        assert!(report.is_valid(), "{:?}", report.issues);
        let login = Audit::new("unit-a", "login", "E", None).row("http://x", AuditOutcome::Success);
        let report = validator.validate_bytes(login.body.as_bytes(), &[]);
        assert!(report.is_valid(), "{:?}", report.issues);
    }

    #[test]
    fn disclosures_are_valid_privacy_disclosure_events_one_per_patient_and_consent() {
        let validator = super::super::state::default_validator();
        let d = |patient: &str, resource: &str| Disclosed {
            patient: patient.into(),
            consent: "Consent/c1".into(),
            recipient: "Organization/unit-a".into(),
            purpose: crate::auth::consent::Purpose::Treatment,
            resource: resource.into(),
        };
        let rows = disclosure_rows(&[d("Patient/p1", "Condition/a"), d("Patient/p1", "Observation/b"), d("Patient/p1", "Condition/a"), d("Patient/p2", "Patient/p2")], "unit-a", Some("127.0.0.1"), "http://x");
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].subtype.as_str(), rows[0].entity.as_str()), (DISCLOSE, "Patient/p1"));
        let report = validator.validate_bytes(rows[0].body.as_bytes(), &[]);
        assert!(report.is_valid(), "{:?}", report.issues);
        let body = crate::json::parse(rows[0].body.as_bytes()).unwrap();
        let whats: Vec<&str> = body.get("entity").and_then(Json::as_array).unwrap().iter().filter_map(|e| e.get("what")?.get("reference")?.as_str()).collect();
        assert_eq!(whats, ["Patient/p1", "Consent/c1", "Condition/a", "Observation/b"]);
    }
}
