//! The one consent decision for 42 CFR Part 2 data: R4 Consent resources read into flat rules, and [`decide`], which says whether a labelled resource may go to a recipient for a purpose at a time.
//!
//! Pure: no store, no clock, no HTTP. The read path ([`super::Principal::disclosure`]) and the
//! outbox's send step call [`decide`]; the store keeps the same rules in `consent_rules` (written
//! when a Consent is stored) and its search prefilter evaluates the same conditions in SQL, so
//! totals count only what [`decide`] lets through.
//!
//! A Consent becomes one [`Rule`] per provision × recipient × purpose × label (empty = any). A
//! nested provision inherits what it does not say from its parent and narrows the period; its
//! depth makes it an exception to the provisions above it. The decision:
//! - a rule *matches* when its Consent is active, it is the patient's newest Consent naming that
//!   recipient (a newer Consent, even an inactive one, revokes older ones), and recipient, purpose,
//!   label and time fall within it;
//! - a resource is permitted when some matching `permit` rule has no matching `deny` rule of the
//!   same patient at the same or a deeper level; otherwise it is withheld.

use crate::json::Json;
use crate::outcome::{Issue, IssueCode};

/// v3-ActReason, the system of the purposes of use.
pub const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// Seconds that stand for "no start" and "no end" (SQL compares them as integers).
pub const NO_START: i64 = i64::MIN / 2;
pub const NO_END: i64 = i64::MAX / 2;

/// Why data leaves: the purposes of use a consent can name and a disclosure has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    Treatment,
    Payment,
    Operations,
}

impl Purpose {
    pub const ALL: [Purpose; 3] = [Purpose::Treatment, Purpose::Payment, Purpose::Operations];

    /// The v3-ActReason code.
    pub fn code(self) -> &'static str {
        match self {
            Purpose::Treatment => "TREAT",
            Purpose::Payment => "HPAYMT",
            Purpose::Operations => "HOPERAT",
        }
    }

    /// The name used in the configuration and in the IOP consent records.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Treatment => "treatment",
            Purpose::Payment => "payment",
            Purpose::Operations => "operations",
        }
    }

    pub fn from_code(code: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.code() == code)
    }

    pub fn from_name(name: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// `permit` or `deny` (`Consent.provision.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Permit,
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Permit => "permit",
            Effect::Deny => "deny",
        }
    }
}

/// One flattened provision of one Consent, as the store keeps it (`consent_rules`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `Consent/<id>`.
    pub consent: String,
    /// `Patient/<id>`.
    pub patient: String,
    /// When the Consent was given (`dateTime`, else when it was stored), in seconds: the newest one per recipient counts.
    pub recorded: i64,
    pub active: bool,
    pub effect: Effect,
    /// 0 for the root provision, 1 for its nested provisions, …
    pub depth: i64,
    /// `Organization/<id>`, or empty for anyone (deny provisions only).
    pub recipient: String,
    /// A v3-ActReason code, or empty for any purpose.
    pub purpose: String,
    /// A canonical `system|code` label, or empty for any labelled data.
    pub label: String,
    /// `[start, end)` in seconds.
    pub start: i64,
    pub end: i64,
}

/// What is being disclosed, to whom, why and when.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `Organization/<id>` of the recipient.
    pub recipient: &'a str,
    pub purpose: Purpose,
    /// The resource's labels, canonical (`system|code`).
    pub labels: &'a [String],
    /// Seconds since the epoch.
    pub at: i64,
}

/// The answer of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Permitted by this Consent (`Consent/<id>`) for this patient.
    Permitted { consent: String, patient: String },
    Withheld(&'static str),
}

/// Whether `rule` applies to `request`, given all the rules of its patient (for revocation by a newer Consent).
fn matches(rule: &Rule, request: &Request<'_>, rules: &[Rule]) -> bool {
    rule.active
        && (rule.recipient.is_empty() || rule.recipient == request.recipient)
        && (rule.purpose.is_empty() || rule.purpose == request.purpose.code())
        && (rule.label.is_empty() || request.labels.iter().any(|l| *l == rule.label))
        && rule.start <= request.at
        && request.at < rule.end
        && !rules.iter().any(|newer| newer.patient == rule.patient && newer.recipient == rule.recipient && newer.recorded > rule.recorded)
}

/// The consent decision: `rules` are the Consents of the patients the resource is about.
pub fn decide(request: &Request<'_>, rules: &[Rule]) -> Decision {
    let mut any_permit = false;
    for permit in rules.iter().filter(|r| r.effect == Effect::Permit && matches(r, request, rules)) {
        any_permit = true;
        let denied = rules.iter().any(|d| d.effect == Effect::Deny && d.patient == permit.patient && d.depth >= permit.depth && matches(d, request, rules));
        if !denied {
            return Decision::Permitted { consent: permit.consent.clone(), patient: permit.patient.clone() };
        }
    }
    Decision::Withheld(if any_permit { "a consent provision denies this disclosure" } else { "no active consent permits this recipient, purpose and data" })
}

/// What a Consent's provisions may name, checked when it is written.
pub trait Recipients {
    /// Whether `reference` (`Organization/<id>`) is a recipient the gateway knows.
    fn knows(&self, reference: &str) -> bool;
}

impl<F: Fn(&str) -> bool> Recipients for F {
    fn knows(&self, reference: &str) -> bool {
        self(reference)
    }
}

/// A Consent read into rules, or the problems that make it unusable, each located.
pub fn rules_of(consent: &Json, recorded_fallback: i64, recipients: &dyn Recipients) -> Result<Vec<Rule>, Vec<Issue>> {
    let mut issues = Vec::new();
    let id = consent.get("id").and_then(Json::as_str).unwrap_or_default();
    let patient = consent.get("patient").and_then(|p| p.get("reference")).and_then(Json::as_str).unwrap_or_default();
    if !patient.starts_with("Patient/") {
        issues.push(Issue::error(IssueCode::Required, "Consent.patient", "a consent must name its patient as Patient/<id>"));
    }
    let recorded = consent.get("dateTime").and_then(Json::as_str).and_then(|t| seconds(t, false)).unwrap_or(recorded_fallback);
    let active = consent.get("status").and_then(Json::as_str) == Some("active");
    let mut out = Vec::new();
    match consent.get("provision") {
        Some(provision) => {
            let root = Inherited { recipients: Vec::new(), purposes: Vec::new(), labels: Vec::new(), start: NO_START, end: NO_END };
            let context = Context { consent: format!("Consent/{id}"), patient: patient.to_string(), recorded, active, recipients };
            flatten(provision, "Consent.provision", 0, &root, &context, &mut out, &mut issues);
        }
        None => issues.push(Issue::error(IssueCode::Required, "Consent.provision", "a Part 2 consent must say what it permits (provision)")),
    }
    if issues.is_empty() { Ok(out) } else { Err(issues) }
}

struct Context<'a> {
    consent: String,
    patient: String,
    recorded: i64,
    active: bool,
    recipients: &'a dyn Recipients,
}

struct Inherited {
    recipients: Vec<String>,
    purposes: Vec<String>,
    labels: Vec<String>,
    start: i64,
    end: i64,
}

fn flatten(provision: &Json, at: &str, depth: i64, parent: &Inherited, context: &Context<'_>, out: &mut Vec<Rule>, issues: &mut Vec<Issue>) {
    let effect = match provision.get("type").and_then(Json::as_str) {
        Some("deny") => Effect::Deny,
        Some("permit") => Effect::Permit,
        _ => {
            issues.push(Issue::error(IssueCode::Required, format!("{at}.type"), "a provision must say permit or deny"));
            Effect::Deny
        }
    };
    let mut recipients = Vec::new();
    for (n, actor) in provision.get("actor").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let reference = actor.get("reference").and_then(|r| r.get("reference")).and_then(Json::as_str).unwrap_or_default();
        let where_ = format!("{at}.actor[{n}].reference");
        if !reference.starts_with("Organization/") {
            issues.push(Issue::error(IssueCode::Value, where_, format!("the recipient must be an Organization (Organization/<id>), not '{reference}'")));
        } else if !context.recipients.knows(reference) {
            issues.push(Issue::error(IssueCode::Value, where_, format!("{reference} is not a recipient the gateway knows (a configured partner or a stored Organization)")));
        } else {
            recipients.push(reference.to_string());
        }
    }
    let mut purposes = Vec::new();
    for (n, coding) in provision.get("purpose").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        let system = coding.get("system").and_then(Json::as_str).unwrap_or_default();
        let code = coding.get("code").and_then(Json::as_str).unwrap_or_default();
        match Purpose::from_code(code) {
            Some(p) if system == ACT_REASON => purposes.push(p.code().to_string()),
            _ => issues.push(Issue::error(
                IssueCode::CodeInvalid,
                format!("{at}.purpose[{n}]"),
                format!("unknown purpose of use '{system}|{code}': use {ACT_REASON} TREAT, HPAYMT or HOPERAT"),
            )),
        }
    }
    let mut labels = Vec::new();
    for coding in provision.get("securityLabel").and_then(Json::as_array).unwrap_or_default() {
        let system = coding.get("system").and_then(Json::as_str).unwrap_or_default();
        if let Some(code) = coding.get("code").and_then(Json::as_str) {
            for label in super::labels::equivalents(system, code) {
                if !labels.contains(&label) {
                    labels.push(label);
                }
            }
        }
    }
    let period = provision.get("period");
    let start_text = period.and_then(|p| p.get("start")).and_then(Json::as_str);
    let end_text = period.and_then(|p| p.get("end")).and_then(Json::as_str);
    let start = start_text.and_then(|t| seconds(t, false)).unwrap_or(NO_START);
    let end = end_text.and_then(|t| seconds(t, true)).unwrap_or(NO_END);
    if let (Some(s), Some(e)) = (start_text, end_text)
        && end <= start
    {
        issues.push(Issue::error(IssueCode::Invariant, format!("{at}.period"), format!("the period ends ({e}) before it starts ({s})")));
    }
    let mine = Inherited {
        recipients: if recipients.is_empty() { parent.recipients.clone() } else { recipients },
        purposes: if purposes.is_empty() { parent.purposes.clone() } else { purposes },
        labels: if labels.is_empty() { parent.labels.clone() } else { labels },
        start: start.max(parent.start),
        end: end.min(parent.end),
    };
    if effect == Effect::Permit && mine.recipients.is_empty() {
        issues.push(Issue::error(IssueCode::Required, format!("{at}.actor"), "a permit must name its recipient (actor.reference to an Organization)"));
    }
    let any = [String::new()];
    let or_any = |v: &[String]| -> Vec<String> { if v.is_empty() { any.to_vec() } else { v.to_vec() } };
    for recipient in or_any(&mine.recipients) {
        for purpose in or_any(&mine.purposes) {
            for label in or_any(&mine.labels) {
                out.push(Rule {
                    consent: context.consent.clone(),
                    patient: context.patient.clone(),
                    recorded: context.recorded,
                    active: context.active,
                    effect,
                    depth,
                    recipient: recipient.clone(),
                    purpose: purpose.clone(),
                    label,
                    start: mine.start,
                    end: mine.end,
                });
            }
        }
    }
    for (n, nested) in provision.get("provision").and_then(Json::as_array).unwrap_or_default().iter().enumerate() {
        flatten(nested, &format!("{at}.provision[{n}]"), depth + 1, &mine, context, out, issues);
    }
}

/// Seconds since the epoch of a FHIR date, dateTime or instant; `end` reads a partial date as the
/// end of its day, month or year (a consent "until 2026-06-30" covers that whole day).
pub fn seconds(text: &str, end: bool) -> Option<i64> {
    if text.len() > 10 {
        let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
        return Some(t.unix_timestamp());
    }
    let mut parts = text.split('-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let day: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let first = time::Date::from_calendar_date(year, time::Month::try_from(month.unwrap_or(1)).ok()?, day.unwrap_or(1)).ok()?;
    let after = match (end, month, day) {
        (false, _, _) => first,
        (true, _, Some(_)) => first.next_day()?,
        (true, Some(m), None) if m == 12 => time::Date::from_calendar_date(year + 1, time::Month::January, 1).ok()?,
        (true, Some(m), None) => time::Date::from_calendar_date(year, time::Month::try_from(m + 1).ok()?, 1).ok()?,
        (true, None, _) => time::Date::from_calendar_date(year + 1, time::Month::January, 1).ok()?,
    };
    Some(after.midnight().assume_utc().unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::labels::{ACT_CODE, PART2_LABEL};

    const UNIT: &str = "Organization/unit-a";
    const PAYER: &str = "Organization/payer-x";

    fn consent(text: &str) -> Json {
        crate::json::parse(text.as_bytes()).unwrap()
    }

    fn known(reference: &str) -> bool {
        [UNIT, PAYER, "Organization/unit-b"].contains(&reference)
    }

    fn permit(id: &str, status: &str, date: &str, extra: &str) -> Json {
        consent(&format!(
            r#"{{"resourceType":"Consent","id":"{id}","status":"{status}","dateTime":"{date}","patient":{{"reference":"Patient/p1"}},
            "provision":{{"type":"permit","period":{{"start":"2026-01-01","end":"2026-12-31"}},
            "actor":[{{"role":{{"coding":[{{"code":"IRCP"}}]}},"reference":{{"reference":"{UNIT}"}}}}],
            "purpose":[{{"system":"{ACT_REASON}","code":"TREAT"}}]{extra}}}}}"#
        ))
    }

    fn at(date: &str) -> i64 {
        seconds(date, false).unwrap()
    }

    fn part2() -> Vec<String> {
        vec![PART2_LABEL.to_string(), format!("{ACT_CODE}|SUD")]
    }

    fn decide_for(rules: &[Rule], recipient: &str, purpose: Purpose, when: &str) -> Decision {
        let labels = part2();
        decide(&Request { recipient, purpose, labels: &labels, at: at(when) }, rules)
    }

    #[test]
    fn an_active_permit_allows_only_its_recipient_purpose_and_period() {
        let rules = rules_of(&permit("c1", "active", "2026-01-01", ""), 0, &known).unwrap();
        assert_eq!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Permitted { consent: "Consent/c1".into(), patient: "Patient/p1".into() });
        assert!(matches!(decide_for(&rules, PAYER, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)), "another recipient");
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Payment, "2026-03-01"), Decision::Withheld(_)), "another purpose");
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2027-01-01"), Decision::Withheld(_)), "expired");
        assert_eq!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-12-31T23:59:59Z"), decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), "the last day counts whole");
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2025-12-31"), Decision::Withheld(_)), "not yet");
        assert!(matches!(decide_for(&[], UNIT, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)), "no consent");
    }

    #[test]
    fn revocation_by_status_or_by_a_newer_consent() {
        let inactive = rules_of(&permit("c1", "inactive", "2026-01-01", ""), 0, &known).unwrap();
        assert!(matches!(decide_for(&inactive, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)));
        let mut rules = rules_of(&permit("c1", "active", "2026-01-01", ""), 0, &known).unwrap();
        rules.extend(rules_of(&permit("c2", "inactive", "2026-02-01", ""), 0, &known).unwrap());
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)), "a newer inactive consent revokes");
    }

    #[test]
    fn deny_provisions_and_labels_narrow_a_permit() {
        let nested_deny = r#","provision":[{"type":"deny","purpose":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"TREAT"}],"period":{"start":"2026-06-01","end":"2026-06-30"}}]"#;
        let rules = rules_of(&permit("c1", "active", "2026-01-01", nested_deny), 0, &known).unwrap();
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-06-15"), Decision::Withheld(_)), "the nested deny is an exception");
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-07-15"), Decision::Permitted { .. }));
        let hiv_only = r#","securityLabel":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"HIV"}]"#;
        let rules = rules_of(&permit("c1", "active", "2026-01-01", hiv_only), 0, &known).unwrap();
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)), "label-restricted to other data");
        let eth = r#","securityLabel":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"ETH"}]"#;
        let rules = rules_of(&permit("c1", "active", "2026-01-01", eth), 0, &known).unwrap();
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Permitted { .. }), "ETH and SUD name the same data");
        // A root deny with a nested permit: the permit is the exception.
        let deny_root = consent(&format!(
            r#"{{"resourceType":"Consent","id":"d","status":"active","patient":{{"reference":"Patient/p1"}},"provision":{{"type":"deny",
            "provision":[{{"type":"permit","actor":[{{"reference":{{"reference":"{PAYER}"}}}}],"purpose":[{{"system":"{ACT_REASON}","code":"HPAYMT"}}]}}]}}}}"#
        ));
        let rules = rules_of(&deny_root, 0, &known).unwrap();
        assert!(matches!(decide_for(&rules, PAYER, Purpose::Payment, "2026-03-01"), Decision::Permitted { .. }));
        assert!(matches!(decide_for(&rules, UNIT, Purpose::Treatment, "2026-03-01"), Decision::Withheld(_)));
    }

    #[test]
    fn bad_consents_say_what_and_where() {
        let bad = consent(&format!(
            r#"{{"resourceType":"Consent","id":"b","status":"active","patient":{{"reference":"Patient/p1"}},"provision":{{"type":"permit",
            "period":{{"start":"2026-06-01","end":"2026-01-01"}},"purpose":[{{"system":"{ACT_REASON}","code":"MARKETING"}}],
            "provision":[{{"type":"permit","actor":[{{"reference":{{"reference":"Organization/stranger"}}}}]}}]}}}}"#
        ));
        let issues = rules_of(&bad, 0, &known).unwrap_err();
        let at: Vec<&str> = issues.iter().map(|i| i.expression.as_str()).collect();
        assert_eq!(at, ["Consent.provision.purpose[0]", "Consent.provision.period", "Consent.provision.actor", "Consent.provision.provision[0].actor[0].reference", "Consent.provision.provision[0].actor"]);
        assert!(issues[0].message.contains("MARKETING") && issues[1].message.contains("before it starts") && issues[3].message.contains("Organization/stranger"));
    }

    #[test]
    fn partial_dates_cover_their_whole_span() {
        assert_eq!(seconds("2026-06-30", true), seconds("2026-07-01", false));
        assert_eq!(seconds("2026-12", true), seconds("2027-01-01", false));
        assert_eq!(seconds("2026", true), seconds("2027", false));
        assert_eq!(seconds("2026-01-01T00:00:00Z", false), seconds("2026-01-01", false));
        assert_eq!(seconds("not a date", false), None);
    }
}
