//! `iop-gateway disclosures --client-id ID`: a client's accounting of disclosures of 42 CFR Part 2 records (who received what, when, why, under which consent), read from the audit trail.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::json::Json;
use crate::store::{AuditQuery, Store};

#[derive(clap::Args)]
pub struct Args {
    /// The client's id in the clinic's records (its Patient is found as the mappings name it).
    #[arg(long, required_unless_present = "patient")]
    client_id: Option<String>,
    /// The Patient instead (`Patient/<id>`).
    #[arg(long, conflicts_with = "client_id")]
    patient: Option<String>,
    /// Configuration file naming the store. Default: $IOP_GATEWAY_CONFIG, else ./gateway.toml if it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Folder of the embedded SQLite store (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> ExitCode {
    match execute(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iop-gateway disclosures: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The Patient a clinic's client id maps to (the mappings' deterministic id, `client:<id>`).
pub fn patient_of_client(client_id: &str) -> String {
    format!("Patient/{}", crate::mapping::ids::resource_id(crate::mapping::ids::DEFAULT_NAMESPACE, "Patient", &format!("client:{client_id}")))
}

fn execute(args: Args) -> Result<(), String> {
    let patient = match (&args.patient, &args.client_id) {
        (Some(p), _) => if p.starts_with("Patient/") { p.clone() } else { format!("Patient/{p}") },
        (None, Some(id)) => patient_of_client(id),
        (None, None) => return Err("name the client (--client-id) or the Patient (--patient)".into()),
    };
    let who = args.client_id.clone().unwrap_or_else(|| patient.clone());
    super::with_store(args.config.as_deref(), args.data_dir, async |_, store| print(store, &who, &patient).await)
}

async fn print(store: &Store, who: &str, patient: &str) -> Result<(), String> {
    let mut lines = Vec::new();
    let mut offset = 0;
    loop {
        let filter = AuditQuery { entity: Some(patient.to_string()), subtype: Some(crate::api::audit::DISCLOSE.into()), count: 500, offset, ..AuditQuery::default() };
        let (total, bodies) = store.search_audit(&filter).await.map_err(|e| e.to_string())?;
        lines.extend(bodies.iter().filter_map(|b| crate::json::parse(b.as_bytes()).ok()).map(|event| describe(&event)));
        offset += 500;
        if offset as i64 >= total {
            break;
        }
    }
    println!("Accounting of disclosures of 42 CFR Part 2 records for client {who} ({patient}), newest first:");
    for line in &lines {
        println!("{line}");
    }
    println!("{} disclosure(s)", lines.len());
    Ok(())
}

/// One disclosure as a person reads it.
pub fn describe(event: &Json) -> String {
    let text = |j: Option<&Json>| j.and_then(Json::as_str).unwrap_or_default().to_string();
    let when = text(event.get("recorded"));
    let agents = event.get("agent").and_then(Json::as_array).unwrap_or_default();
    let recipient = agents.iter().find(|a| a.get("type").and_then(|t| t.get("coding")).and_then(Json::as_array).is_some_and(|c| c.iter().any(|c| c.get("code").and_then(Json::as_str) == Some("110152"))));
    let to = recipient.map(|r| text(r.get("who").and_then(|w| w.get("reference")))).unwrap_or_default();
    let client = recipient.map(|r| text(r.get("altId"))).unwrap_or_default();
    let why = event
        .get("purposeOfEvent")
        .and_then(Json::as_array)
        .and_then(|p| p.first())
        .and_then(|p| p.get("coding"))
        .and_then(Json::as_array)
        .and_then(|c| c.first())
        .map(|c| text(c.get("display")))
        .unwrap_or_default();
    let mut consent = String::new();
    let mut what = Vec::new();
    for entity in event.get("entity").and_then(Json::as_array).unwrap_or_default() {
        let reference = text(entity.get("what").and_then(|w| w.get("reference")));
        match entity.get("role").and_then(|r| r.get("code")).and_then(Json::as_str) {
            Some("13") => consent = reference,
            Some("1") => {}
            _ => what.push(reference),
        }
    }
    format!("{when}  to {to} (client {client})  for {why}  under {consent}\n    {}", what.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disclosure_reads_as_who_what_when_why_and_which_consent() {
        let d = crate::api::part2::Disclosed {
            patient: "Patient/p1".into(),
            consent: "Consent/c1".into(),
            recipient: "Organization/unit-a".into(),
            purpose: crate::auth::consent::Purpose::Treatment,
            resource: "Condition/a".into(),
        };
        let rows = crate::api::audit::disclosure_rows(&[d], "unit-a", None, "http://x");
        let line = describe(&crate::json::parse(rows[0].body.as_bytes()).unwrap());
        assert!(line.contains("to Organization/unit-a (client unit-a)  for treatment  under Consent/c1\n    Condition/a"), "{line}");
        assert_eq!(patient_of_client("C-1001"), format!("Patient/{}", crate::mapping::ids::resource_id("iop-gateway", "Patient", "client:C-1001")));
    }
}
