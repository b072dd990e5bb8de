//! The utilization rule: attended session days counted against each certification, and the extension request proposed when the certification runs low.
//!
//! [`proposals`] is pure: from a client's records (authorizations, their decisions, sessions,
//! enrollments) to the extension requests the rule asks for. "Near the end" is measured from the
//! client's latest session date, never the wall clock, so the same records always give the same
//! answer. [`review`] runs it after an intake, and [`after_decisions`] when a certification arrives
//! (a `$submit` answer or a notification): a proposal is stored as an inbound authorization record
//! with status `proposed` (held for the clinic to confirm by posting it), or, for a payer with
//! `auto_extend`, goes through intake like any authorization the clinic sends.
//!
//! A review reads what can change its answer and no more: the client's certified decisions (one
//! indexed query, and nothing else when there are none), the authorizations they decide, the
//! extensions naming their certification numbers, the client's enrollments and sessions. Its cost
//! does not grow with the client's undecided or refused authorizations.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use time::{Date, Duration};

use crate::api::ApiError;
use crate::api::state::AppState;
use crate::auth::Principal;
use crate::config::UtilizationConfig;
use crate::json::Json;
use crate::store::{RecordRow, Store, StoreError};

/// The row status of an extension request held for the clinic to confirm.
pub const PROPOSED: &str = "proposed";

/// The row status a proposal takes once the clinic posted an authorization with its id.
pub const CONFIRMED: &str = "confirmed";

/// Attendance values that count as a program day used (the client was there, if only for part of it).
const ATTENDED: [&str; 3] = ["attended", "late", "left_early"];

/// How many enrollments or sessions a review reads per client; a client's records are far fewer.
const LIMIT: usize = 10_000;

fn text<'a>(record: &'a Value, member: &str) -> &'a str {
    record.get(member).and_then(Value::as_str).unwrap_or_default()
}

fn date(value: &str) -> Option<Date> {
    // Session times are written with the clinic's offset; their first ten characters are the clinic's local date.
    let day = value.get(..10)?;
    Date::parse(day, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

fn format_date(d: Date) -> String {
    d.format(time::macros::format_description!("[year]-[month]-[day]")).unwrap_or_default()
}

/// The extension requests `records` call for, with `submitted_at` as their submission time.
///
/// A certification (a `certified` decision on an authorization of the records) gets one when the
/// client has an active enrollment in the authorization's program, its latest session is on or
/// before the certified end (a lapsed certification needs a new request, not an extension), and
/// either fewer than `remaining_days_below` certified days remain (days with an attended, late or
/// left-early session between the certified start and end) or the certified end is at most
/// `days_before_end` days after that latest session. A certification some authorization already
/// extends (the clinic's own or an earlier proposal) gets none.
pub fn proposals(records: &[Value], rule: &UtilizationConfig, submitted_at: &str) -> Vec<Value> {
    let of_type = |t: &'static str| records.iter().filter(move |r| text(r, "record_type") == t);
    let authorizations: BTreeMap<&str, &Value> = of_type("authorization").map(|a| (text(a, "id"), a)).collect();
    let extended: BTreeSet<&str> = of_type("authorization").map(|a| text(a, "extends_certification")).filter(|c| !c.is_empty()).collect();
    let mut made = Vec::new();
    for decision in of_type("decision").filter(|d| text(d, "outcome") == "certified") {
        let Some(authorization) = authorizations.get(text(decision, "authorization_id")) else { continue };
        let number = text(decision, "certification_number");
        if number.is_empty() || extended.contains(number) {
            continue;
        }
        let (Some(start), Some(end), Some(units)) =
            (date(text(decision, "certified_start")), date(text(decision, "certified_end")), decision.get("certified_units").and_then(Value::as_i64))
        else {
            continue;
        };
        let client = text(authorization, "client_id");
        let enrolled = of_type("enrollment").any(|e| text(e, "client_id") == client && text(e, "status") == "active" && text(e, "program") == text(authorization, "program"));
        if !enrolled {
            continue;
        }
        let sessions: Vec<(Date, &str)> = of_type("session").filter(|s| text(s, "client_id") == client).filter_map(|s| Some((date(text(s, "start_at"))?, text(s, "attendance")))).collect();
        let Some(latest) = sessions.iter().map(|(d, _)| *d).max() else { continue };
        if latest > end {
            continue;
        }
        let used = sessions.iter().filter(|(d, a)| ATTENDED.contains(a) && (start..=end).contains(d)).map(|(d, _)| *d).collect::<BTreeSet<_>>().len() as i64;
        let remaining = units - used;
        let end_near = (end - latest).whole_days() <= i64::from(rule.days_before_end);
        if remaining >= i64::from(rule.remaining_days_below) && !end_near {
            continue;
        }
        made.push(extension(authorization, number, units, start, end, submitted_at));
    }
    made
}

/// The extension request of a certification: the original request's coverage, program and site,
/// for the days the original request asked for and the certification did not grant (or, when it
/// granted all, as many again), over as many calendar days as the certification, from the day after it ends.
fn extension(authorization: &Value, number: &str, certified_units: i64, start: Date, end: Date, submitted_at: &str) -> Value {
    let requested = authorization.get("units").and_then(Value::as_i64).unwrap_or(certified_units);
    let units = if requested > certified_units { requested - certified_units } else { certified_units }.clamp(1, 366);
    let next = end + Duration::days(1);
    let mut request = json!({
        "record_type": "authorization",
        "id": format!("{}-EXT", text(authorization, "id")),
        "units": units,
        "start": format_date(next),
        "end": format_date(next + (end - start)),
        "extends_certification": number,
        "submitted_at": submitted_at,
    });
    // Supporting scores are left out: they name screenings that would have to be mapped in the same batch.
    for member in ["client_id", "payer_id", "member_id", "program", "level_of_care", "diagnoses", "place_of_service", "provider"] {
        if let Some(value) = authorization.get(member) {
            request[member] = value.clone();
        }
    }
    request
}

/// After an intake touching `clients`: proposes the extensions their certifications call for, and
/// marks as confirmed the proposals the clinic posted (`confirmed`: ids of the authorizations it posted).
/// Returns the ids of the extension requests made.
pub async fn review(state: &AppState, principal: &Principal, clients: &BTreeSet<String>, confirmed: &[String]) -> Result<Vec<String>, ApiError> {
    for id in confirmed {
        if let Some(mut row) = state.store.record("authorization", id, "inbound").await?.filter(|r| r.status == PROPOSED) {
            row.status = CONFIRMED.into();
            state.store.put_record(&row).await?;
        }
    }
    let rule = &state.loaded.config.utilization;
    let mut made = Vec::new();
    if !rule.enabled {
        return Ok(made);
    }
    for client in clients {
        let Some(records) = client_records(&state.store, client).await? else { continue };
        let now = crate::api::fhir::now_instant();
        for proposal in proposals(&records, rule, &now) {
            let request = crate::json::parse(proposal.to_string().as_bytes()).map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Some(problem) = state.mappings.schemas.check(&request).first() {
                // The original request was valid, so this is a gap in the rule, not the clinic's doing: say so, and propose nothing.
                tracing::warn!(path = %problem.path, reason = %problem.message, "An extension request the utilization rule made does not fit the authorization schema.");
                continue;
            }
            let id = text(&proposal, "id").to_string();
            let auto = state.partners.payer_for(text(&proposal, "payer_id")).is_some_and(|p| p.config.auto_extend);
            if auto {
                // The same path as an authorization the clinic sends, with the client record its PAS request Bundle references.
                let client_record = records.iter().find(|r| text(r, "record_type") == "client").and_then(|r| crate::json::parse(r.to_string().as_bytes()).ok());
                let batch: Vec<Json> = client_record.into_iter().chain([request]).collect();
                super::intake::accept(state, principal, batch).await?;
            } else {
                let mut row = super::intake::row(&request, "inbound", &now);
                row.status = PROPOSED.into();
                state.store.put_record(&row).await?;
            }
            made.push(id);
        }
    }
    Ok(made)
}

/// After decisions were recorded (their transaction committed): reviews the clients whose
/// authorizations were certified, so a certification already low when granted (sessions attended
/// while it was pended) gets its proposal at once. Decisions have no principal; what a review sends
/// is the gateway's own (the program's Organization, which owns the clinic's records). A failure is
/// logged: the decision stays recorded, and the client's next intake reviews it again.
pub async fn after_decisions(state: &AppState, decisions: &[Json]) {
    let certified = decisions.iter().filter(|d| d.get("outcome").and_then(Json::as_str) == Some("certified"));
    let mut clients = BTreeSet::new();
    for authorization_id in certified.filter_map(|d| d.get("authorization_id").and_then(Json::as_str)) {
        match state.store.record("authorization", authorization_id, "outbound").await {
            Ok(Some(row)) if !row.client_id.is_empty() => {
                clients.insert(row.client_id);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "The utilization rule could not find the client of a certified authorization."),
        }
    }
    if clients.is_empty() {
        return;
    }
    if let Err(e) = review(state, &state.gateway_principal, &clients, &[]).await {
        tracing::warn!(error = %e, "The utilization rule could not look at the certifications that arrived.");
    }
}

/// What the rule reads of one client, `None` when the client has no certification, no active
/// enrollment or no session (then nothing more is read): the certified decisions, the authorizations they decide (as the clinic sent them),
/// the authorizations extending their certification numbers (the clinic's and proposals), the
/// client's enrollments and sessions, and the client record (an extension sent with `auto_extend`
/// goes with it).
async fn client_records(store: &Store, client: &str) -> Result<Option<Vec<Value>>, StoreError> {
    let decisions = store.client_records(client, "decision", Some("certified"), LIMIT).await?;
    if decisions.is_empty() {
        return Ok(None);
    }
    // The rule proposes nothing for a client without an active enrollment or without a session, so
    // those are read next and nothing more is read without them: most certifications arrive so.
    let enrollments = store.client_records(client, "enrollment", None, LIMIT).await?;
    if !enrollments.iter().any(|e| e.status == "active") {
        return Ok(None);
    }
    let sessions = store.client_records(client, "session", None, LIMIT).await?;
    if sessions.is_empty() {
        return Ok(None);
    }
    let mut rows: Vec<RecordRow> = enrollments;
    rows.extend(sessions);
    rows.extend(store.record("client", client, "outbound").await?);
    let numbers: BTreeSet<String> = decisions.iter().filter_map(|d| serde_json::from_str::<Value>(&d.body).ok()).map(|b| text(&b, "certification_number").to_string()).collect();
    for number in numbers.iter().filter(|n| !n.is_empty()) {
        rows.extend(store.extensions(client, number).await?);
    }
    // After the extensions: an authorization that is both keeps the body the clinic sent (the rule takes the last of an id).
    for decision in &decisions {
        // Its client was copied from this authorization when the decision was recorded; another client's now is not this client's.
        rows.extend(store.record("authorization", &decision.authorization_id, "outbound").await?.filter(|a| a.client_id == client));
    }
    rows.extend(decisions);
    Ok(Some(rows.iter().filter_map(|r| serde_json::from_str(&r.body).ok()).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: UtilizationConfig = UtilizationConfig { enabled: true, remaining_days_below: 3, days_before_end: 5 };

    fn base() -> Vec<Value> {
        vec![
            json!({"record_type": "enrollment", "id": "ENR-1", "client_id": "C-1", "program": "mental_health_iop", "status": "active"}),
            json!({"record_type": "authorization", "id": "AUTH-1", "client_id": "C-1", "payer_id": "PAYER-77", "member_id": "M-1", "program": "mental_health_iop",
                   "level_of_care": "asam_2_1", "units": 12, "start": "2026-01-12", "end": "2026-02-06", "diagnoses": [{"code": "F33.1"}], "place_of_service": "11",
                   "supporting_scores": [{"screening_id": "S-1"}], "submitted_at": "2026-01-08T10:00:00-06:00", "provider": {"id": "IOP-1", "name": "Synthetic IOP"}}),
            json!({"record_type": "decision", "authorization_id": "AUTH-1", "outcome": "certified", "decided_at": "2026-01-09T15:20:00-06:00",
                   "certification_number": "CERT-1", "certified_units": 12, "certified_start": "2026-01-12", "certified_end": "2026-02-06"}),
        ]
    }

    /// Sessions on the first `n` weekdays from 2026-01-12 (a Monday).
    fn sessions(n: usize, attendance: &str) -> Vec<Value> {
        let monday = Date::from_calendar_date(2026, time::Month::January, 12).unwrap();
        (0..).map(|i| monday + Duration::days(i)).filter(|d| d.weekday().number_from_monday() <= 5).take(n).enumerate()
            .map(|(i, d)| json!({"record_type": "session", "id": format!("SES-{i}"), "client_id": "C-1", "start_at": format!("{}T09:00:00-06:00", format_date(d)), "attendance": attendance}))
            .collect()
    }

    fn run(extra: Vec<Value>) -> Vec<Value> {
        let mut records = base();
        records.extend(extra);
        proposals(&records, &RULE, "2026-01-23T12:00:00Z")
    }

    #[test]
    fn three_days_left_is_not_under_the_threshold_two_is() {
        assert!(run(sessions(9, "attended")).is_empty(), "12 certified, 9 used: 3 remain");
        let made = run(sessions(10, "attended"));
        assert_eq!(made.len(), 1);
        let p = &made[0];
        assert_eq!((text(p, "id"), text(p, "extends_certification"), text(p, "start"), text(p, "end")), ("AUTH-1-EXT", "CERT-1", "2026-02-07", "2026-03-04"));
        assert_eq!(p["units"], 12, "all requested days were certified: as many again");
        assert!(p.get("supporting_scores").is_none());
        assert_eq!((text(p, "payer_id"), text(p, "member_id"), text(p, "client_id")), ("PAYER-77", "M-1", "C-1"));
    }

    #[test]
    fn only_attended_days_count_and_a_day_counts_once() {
        assert!(run(sessions(10, "absent_unexcused")).is_empty());
        let mut late = sessions(5, "late");
        late.extend(sessions(5, "left_early").into_iter().map(|mut s| { s["id"] = json!(format!("{}-b", text(&s, "id"))); s }));
        assert!(run(late).is_empty(), "two sessions on one day are one program day");
        let mut mixed = sessions(4, "late");
        mixed.extend(sessions(10, "left_early").split_off(4));
        assert_eq!(run(mixed).len(), 1);
    }

    #[test]
    fn the_certified_end_near_the_latest_session_proposes_even_with_days_left() {
        let session = |day: &str| json!({"record_type": "session", "id": day, "client_id": "C-1", "start_at": format!("{day}T09:00:00-06:00"), "attendance": "absent_excused"});
        assert!(run(vec![session("2026-01-31")]).is_empty(), "six days before the end");
        assert_eq!(run(vec![session("2026-02-01")]).len(), 1, "five days before the end");
        assert!(run(vec![session("2026-02-07")]).is_empty(), "after the end the certification has lapsed");
    }

    #[test]
    fn no_active_enrollment_in_the_program_no_proposal() {
        let mut records = base();
        records[0]["status"] = json!("discharged");
        records.extend(sessions(11, "attended"));
        assert!(proposals(&records, &RULE, "t").is_empty());
        records[0]["status"] = json!("active");
        records[0]["program"] = json!("substance_use_iop");
        assert!(proposals(&records, &RULE, "t").is_empty());
    }

    #[test]
    fn one_proposal_per_certification() {
        let first = run(sessions(10, "attended"));
        assert_eq!(first.len(), 1);
        let mut again = sessions(11, "attended");
        again.extend(first);
        assert!(run(again).is_empty(), "the proposal already extends CERT-1");
        let mut clinic_sent = sessions(11, "attended");
        clinic_sent.push(json!({"record_type": "authorization", "id": "AUTH-1-2", "client_id": "C-1", "extends_certification": "CERT-1"}));
        assert!(run(clinic_sent).is_empty(), "the clinic's own extension counts");
    }

    async fn put(store: &Store, record: &Value, direction: &str) {
        let record = crate::json::parse(record.to_string().as_bytes()).unwrap();
        store.put_record(&crate::exchange::intake::row(&record, direction, "2026-01-20T00:00:00.000Z")).await.unwrap();
    }

    /// A decision row as `pas` records it: by authorization, naming the client the store says the authorization names.
    async fn decide(store: &Store, decision: &Value) {
        let authorization_id = text(decision, "authorization_id");
        let mut tx = store.begin().await.unwrap();
        let client = tx.authorization_client(authorization_id).await.unwrap();
        let mut row = crate::exchange::intake::row(&crate::json::parse(decision.to_string().as_bytes()).unwrap(), "inbound", "2026-01-21T00:00:00.000Z");
        (row.id, row.client_id, row.status) = (authorization_id.to_string(), client, text(decision, "outcome").to_string());
        tx.put_record(&row).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// A review's reads do not grow with the client's undecided authorizations: with none certified it
    /// reads nothing more than the certified decisions; with one, that one authorization and not the 299 others,
    /// and its proposals are those of all the client's records.
    #[tokio::test]
    async fn a_review_reads_no_undecided_authorization() {
        let dir = std::env::temp_dir().join(format!("iop-gw-utilization-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = crate::config::StoreConfig { data_dir: dir.clone(), ..Default::default() };
        let store = Store::open(&config, std::sync::Arc::new(crate::telemetry::Metrics::default())).await.unwrap();
        let [enrollment, authorization, certified]: [Value; 3] = base().try_into().unwrap();
        let mut everything = vec![json!({"record_type": "client", "id": "C-1"}), enrollment.clone()];
        everything.extend(sessions(10, "attended"));
        for n in 0..300 {
            let mut a = authorization.clone();
            a["id"] = json!(format!("AUTH-{n}"));
            everything.push(a);
            if n % 2 == 0 {
                everything.push(json!({"record_type": "decision", "authorization_id": format!("AUTH-{n}"), "outcome": "pended", "decided_at": "2026-01-09T15:20:00-06:00"}));
            }
        }
        // Another client's certification is not this one's.
        everything.push(json!({"record_type": "authorization", "id": "AUTH-OTHER", "client_id": "C-2", "program": "mental_health_iop"}));
        for record in &everything {
            if text(record, "record_type") == "decision" {
                decide(&store, record).await;
            } else {
                put(&store, record, "outbound").await;
            }
        }
        decide(&store, &json!({"record_type": "decision", "authorization_id": "AUTH-OTHER", "outcome": "certified", "certification_number": "CERT-9",
                               "certified_units": 1, "certified_start": "2026-01-12", "certified_end": "2026-01-13"})).await;
        assert!(client_records(&store, "C-1").await.unwrap().is_none(), "no certification: nothing read");
        assert!(client_records(&store, "C-2").await.unwrap().is_none(), "certified but never enrolled: nothing more read");

        let mut decision = certified.clone();
        decision["authorization_id"] = json!("AUTH-7");
        decide(&store, &decision).await;
        everything.push(decision);
        let read = client_records(&store, "C-1").await.unwrap().expect("a certification");
        let authorizations: Vec<&str> = read.iter().filter(|r| text(r, "record_type") == "authorization").map(|r| text(r, "id")).collect();
        assert_eq!(authorizations, ["AUTH-7"]);
        assert_eq!(read.len(), 1 + 1 + 10 + 1 + 1, "client, enrollment, sessions, the authorization, its decision");
        let made = proposals(&read, &RULE, "t");
        assert_eq!((made.len(), text(&made[0], "id")), (1, "AUTH-7-EXT"));
        assert_eq!(made, proposals(&everything, &RULE, "t"));

        // The proposal, held for the clinic, is read back as the certification's extension: no second one.
        put(&store, &made[0], "inbound").await;
        let read = client_records(&store, "C-1").await.unwrap().unwrap();
        assert!(read.iter().any(|r| text(r, "id") == "AUTH-7-EXT"));
        assert!(proposals(&read, &RULE, "t").is_empty());
        store.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn days_the_payer_did_not_grant_are_asked_for_again() {
        let mut records = base();
        records[2]["certified_units"] = json!(8);
        records.extend(sessions(6, "attended"));
        let made = proposals(&records, &RULE, "t");
        assert_eq!(made[0]["units"], 4);
    }
}
