//! FHIR search as the gateway implements it: the registry of search parameters per type, what a resource contributes to the index when stored, and the parsed form of a search query.
//!
//! The registry is the single source for the index, the query parser and the CapabilityStatement,
//! so `/metadata` lists exactly what a search accepts. SQL lives in `store`; this module only knows FHIR.

use crate::json::Json;

pub mod compartment;
pub mod shape;

/// How a parameter's values are matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Token,
    Reference,
    Date,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Token => "token",
            Kind::Reference => "reference",
            Kind::Date => "date",
        }
    }
}

/// One search parameter of one resource type.
#[derive(Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: Kind,
    /// Dot paths from the resource root; `name[x]` matches any choice (`effectiveDateTime`, `effectivePeriod`).
    pub paths: &'static [&'static str],
    /// For a reference parameter, the only type it points to (`patient` → Patient); a bare id is read as that type.
    pub target: Option<&'static str>,
    /// The R4 definition's canonical URL, for the CapabilityStatement.
    pub definition: &'static str,
}

macro_rules! p {
    ($name:literal, $kind:ident, [$($path:literal),*], $target:expr, $def:literal) => {
        ParamDef { name: $name, kind: Kind::$kind, paths: &[$($path),*], target: $target, definition: concat!("http://hl7.org/fhir/SearchParameter/", $def) }
    };
}

const PATIENT: Option<&str> = Some("Patient");

static PATIENT_PARAMS: &[ParamDef] = &[p!("identifier", Token, ["identifier"], None, "Patient-identifier")];
static OBSERVATION_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "Observation-subject"),
    p!("status", Token, ["status"], None, "Observation-status"),
    p!("code", Token, ["code"], None, "clinical-code"),
    p!("date", Date, ["effective[x]"], None, "clinical-date"),
];
static SERVICE_REQUEST_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "ServiceRequest-subject"),
    p!("status", Token, ["status"], None, "ServiceRequest-status"),
    p!("code", Token, ["code"], None, "clinical-code"),
    p!("authored", Date, ["authoredOn"], None, "ServiceRequest-authored"),
    p!("requester", Reference, ["requester"], None, "ServiceRequest-requester"),
    p!("performer", Reference, ["performer"], None, "ServiceRequest-performer"),
];
static TASK_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "Task-identifier"),
    p!("patient", Reference, ["for"], PATIENT, "Task-patient"),
    p!("subject", Reference, ["for"], None, "Task-subject"),
    p!("status", Token, ["status"], None, "Task-status"),
    p!("code", Token, ["code"], None, "Task-code"),
    p!("based-on", Reference, ["basedOn"], None, "Task-based-on"),
    p!("focus", Reference, ["focus"], None, "Task-focus"),
    p!("owner", Reference, ["owner"], None, "Task-owner"),
    p!("requester", Reference, ["requester"], None, "Task-requester"),
    p!("authored-on", Date, ["authoredOn"], None, "Task-authored-on"),
];
static ENCOUNTER_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "Encounter-subject"),
    p!("status", Token, ["status"], None, "Encounter-status"),
    p!("date", Date, ["period"], None, "clinical-date"),
];
static EPISODE_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["patient"], PATIENT, "clinical-patient"),
    p!("status", Token, ["status"], None, "EpisodeOfCare-status"),
    p!("date", Date, ["period"], None, "clinical-date"),
];
static CARE_PLAN_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "CarePlan-subject"),
    p!("status", Token, ["status"], None, "CarePlan-status"),
    p!("date", Date, ["period"], None, "clinical-date"),
];
static CONDITION_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "Condition-subject"),
    p!("code", Token, ["code"], None, "clinical-code"),
];
static QR_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "QuestionnaireResponse-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "QuestionnaireResponse-patient"),
    p!("subject", Reference, ["subject"], None, "QuestionnaireResponse-subject"),
    p!("status", Token, ["status"], None, "QuestionnaireResponse-status"),
    p!("authored", Date, ["authored"], None, "QuestionnaireResponse-authored"),
];
static CLAIM_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "Claim-identifier"),
    p!("patient", Reference, ["patient"], PATIENT, "Claim-patient"),
    p!("status", Token, ["status"], None, "Claim-status"),
    p!("use", Token, ["use"], None, "Claim-use"),
    p!("created", Date, ["created"], None, "Claim-created"),
    p!("insurer", Reference, ["insurer"], None, "Claim-insurer"),
];
static CLAIM_RESPONSE_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "ClaimResponse-identifier"),
    p!("patient", Reference, ["patient"], PATIENT, "ClaimResponse-patient"),
    p!("status", Token, ["status"], None, "ClaimResponse-status"),
    p!("request", Reference, ["request"], None, "ClaimResponse-request"),
    p!("created", Date, ["created"], None, "ClaimResponse-created"),
];
static COVERAGE_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "Coverage-identifier"),
    p!("patient", Reference, ["beneficiary"], PATIENT, "Coverage-patient"),
    p!("status", Token, ["status"], None, "Coverage-status"),
];
static CONSENT_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["patient"], PATIENT, "clinical-patient"),
    p!("status", Token, ["status"], None, "Consent-status"),
    p!("date", Date, ["dateTime"], None, "clinical-date"),
];
static DOCUMENT_REFERENCE_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier", "masterIdentifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "DocumentReference-subject"),
    p!("status", Token, ["status"], None, "DocumentReference-status"),
    p!("date", Date, ["date"], None, "DocumentReference-date"),
];
static PROCEDURE_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "clinical-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "Procedure-subject"),
    p!("status", Token, ["status"], None, "Procedure-status"),
    p!("code", Token, ["code"], None, "clinical-code"),
    p!("date", Date, ["performed[x]"], None, "clinical-date"),
];
static COMMUNICATION_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "Communication-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "Communication-patient"),
    p!("subject", Reference, ["subject"], None, "Communication-subject"),
    p!("status", Token, ["status"], None, "Communication-status"),
];
static GOAL_PARAMS: &[ParamDef] = &[
    p!("identifier", Token, ["identifier"], None, "Goal-identifier"),
    p!("patient", Reference, ["subject"], PATIENT, "clinical-patient"),
    p!("subject", Reference, ["subject"], None, "Goal-subject"),
];
static PROVENANCE_PARAMS: &[ParamDef] = &[
    p!("target", Reference, ["target"], None, "Provenance-target"),
    p!("patient", Reference, ["target"], PATIENT, "Provenance-patient"),
    p!("recorded", Date, ["recorded"], None, "Provenance-recorded"),
];
static IDENTIFIER_ONLY: &[ParamDef] = &[p!("identifier", Token, ["identifier"], None, "Organization-identifier")];
static PRACTITIONER_PARAMS: &[ParamDef] = &[p!("identifier", Token, ["identifier"], None, "Practitioner-identifier")];
static NONE: &[ParamDef] = &[];

/// The type-specific search parameters of a resource type (`_id` and `_lastUpdated` apply to every type).
pub fn params(resource_type: &str) -> &'static [ParamDef] {
    match resource_type {
        "Patient" => PATIENT_PARAMS,
        "Observation" => OBSERVATION_PARAMS,
        "ServiceRequest" => SERVICE_REQUEST_PARAMS,
        "Task" => TASK_PARAMS,
        "Encounter" => ENCOUNTER_PARAMS,
        "EpisodeOfCare" => EPISODE_PARAMS,
        "CarePlan" => CARE_PLAN_PARAMS,
        "Condition" => CONDITION_PARAMS,
        "QuestionnaireResponse" => QR_PARAMS,
        "Claim" => CLAIM_PARAMS,
        "ClaimResponse" => CLAIM_RESPONSE_PARAMS,
        "Coverage" => COVERAGE_PARAMS,
        "Consent" => CONSENT_PARAMS,
        "DocumentReference" => DOCUMENT_REFERENCE_PARAMS,
        "Procedure" => PROCEDURE_PARAMS,
        "Communication" => COMMUNICATION_PARAMS,
        "Goal" => GOAL_PARAMS,
        "Provenance" => PROVENANCE_PARAMS,
        "Organization" => IDENTIFIER_ONLY,
        "Practitioner" => PRACTITIONER_PARAMS,
        _ => NONE,
    }
}

/// The types with search parameters of their own (those [`params`] knows).
pub const SEARCHABLE_TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "ServiceRequest",
    "Task",
    "Encounter",
    "EpisodeOfCare",
    "CarePlan",
    "Condition",
    "QuestionnaireResponse",
    "Claim",
    "ClaimResponse",
    "Coverage",
    "Consent",
    "DocumentReference",
    "Procedure",
    "Communication",
    "Goal",
    "Provenance",
    "Organization",
    "Practitioner",
];

/// The first date parameter of a type: what `_sort=date` sorts by.
pub fn sort_date_param(resource_type: &str) -> Option<&'static ParamDef> {
    params(resource_type).iter().find(|p| p.kind == Kind::Date)
}

/// `_include` values the gateway follows: (source type, parameter, target type).
pub const INCLUDES: &[(&str, &str, &str)] = &[
    ("Task", "based-on", "ServiceRequest"),
    ("Task", "patient", "Patient"),
    ("Observation", "patient", "Patient"),
    ("Observation", "subject", "Patient"),
    ("ServiceRequest", "patient", "Patient"),
];

/// One row a stored resource adds to the search index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexEntry {
    Token { param: &'static str, system: String, value: String },
    Date { param: &'static str, low: String, high: String },
}

/// The index parameter naming an Organization party to a resource (who may see it).
pub const PARTY: &str = "_party";

/// `_party` index rows of a version: one per party but the program, which is party to every
/// resource, so its clients' searches carry no party condition ([`crate::store::Visibility::party_to_all`]).
pub fn party_index<'a>(parties: &'a [String], program: &'a str) -> impl Iterator<Item = IndexEntry> + 'a {
    parties.iter().filter(move |p| *p != program).map(|p| IndexEntry::Token { param: PARTY, system: String::new(), value: p.clone() })
}

/// What a resource contributes to the index: its type-specific parameters (`_lastUpdated` is
/// matched on the stored row's own `last_updated`, so it costs no index row per version).
pub fn extract(resource_type: &str, resource: &Json) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    for def in params(resource_type) {
        for path in def.paths {
            let mut values = Vec::new();
            collect(resource, &path.split('.').collect::<Vec<_>>(), &mut values);
            for value in values {
                match def.kind {
                    Kind::Token => tokens(value, &mut |system, code| out.push(IndexEntry::Token { param: def.name, system, value: code })),
                    Kind::Reference => {
                        if let Some(reference) = value.get("reference").and_then(Json::as_str).and_then(normalize_reference)
                            && def.target.is_none_or(|t| reference.starts_with(&format!("{t}/")))
                        {
                            out.push(IndexEntry::Token { param: def.name, system: String::new(), value: reference });
                        }
                    }
                    Kind::Date => {
                        if let Some((low, high)) = value_range(value) {
                            out.push(IndexEntry::Date { param: def.name, low, high });
                        }
                    }
                }
            }
        }
    }
    for patient in compartment::about(resource_type, resource) {
        out.push(IndexEntry::Token { param: compartment::PARAM, system: String::new(), value: patient });
    }
    out.dedup();
    out
}

/// Elements through which a resource is addressed to an Organization (who must be able to see it).
const ADDRESS_PATHS: &[&str] = &[
    "requester",
    "performer",
    "owner",
    "recipient",
    "restriction.recipient",
    "insurer",
    "provider",
    "requestor",
    "payor",
    "destination.receiver",
    "managingOrganization",
    "serviceProvider",
    "organization",
    "custodian",
    "author",
    "sender",
    "receiver",
    "performer.actor",
    "careTeam",
];

/// The `Organization/<id>` references a resource is addressed to.
pub fn addressed_organizations(resource: &Json) -> Vec<String> {
    let mut out = Vec::new();
    for path in ADDRESS_PATHS {
        let mut values = Vec::new();
        collect(resource, &path.split('.').collect::<Vec<_>>(), &mut values);
        for reference in values.into_iter().filter_map(|value| value.get("reference").and_then(Json::as_str)) {
            // The mappings write every reference as `urn:uuid:<id>` (their ids are UUIDs, distinct
            // across types), so the clinic's records address a step-down provider's facility that
            // way: at an address it names the Organization with that id. It gives a writer no more
            // than writing `Organization/<id>` would.
            let organization = match reference.strip_prefix("urn:uuid:") {
                Some(id) => uuid::Uuid::parse_str(id).is_ok().then(|| format!("Organization/{id}")),
                None => normalize_reference(reference).filter(|r| r.starts_with("Organization/")),
            };
            if let Some(organization) = organization
                && !out.contains(&organization)
            {
                out.push(organization);
            }
        }
    }
    out
}

/// Adds to `out` the `Type/id` references to `target` found at `paths`, each once.
fn references_to(resource: &Json, paths: &[&str], target: &str, out: &mut Vec<String>) {
    for path in paths {
        let mut values = Vec::new();
        collect(resource, &path.split('.').collect::<Vec<_>>(), &mut values);
        for value in values {
            if let Some(reference) = value.get("reference").and_then(Json::as_str).and_then(normalize_reference)
                && reference.strip_prefix(target).is_some_and(|rest| rest.starts_with('/'))
                && !out.contains(&reference)
            {
                out.push(reference);
            }
        }
    }
}

/// `Type/id` from a relative or absolute literal reference; `None` for contained, `urn:` and versioned-only forms.
pub fn normalize_reference(reference: &str) -> Option<String> {
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return None;
    }
    let without_version = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut segments = without_version.rsplit('/');
    let id = segments.next()?;
    let resource_type = segments.next()?;
    let valid_type = resource_type.starts_with(|c: char| c.is_ascii_uppercase()) && resource_type.chars().all(|c| c.is_ascii_alphanumeric());
    let valid_id = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    (valid_type && valid_id).then(|| format!("{resource_type}/{id}"))
}

fn collect<'a>(value: &'a Json, path: &[&str], out: &mut Vec<&'a Json>) {
    let Some((first, rest)) = path.split_first() else {
        match value {
            Json::Array(items) => out.extend(items.iter()),
            other => out.push(other),
        }
        return;
    };
    match value {
        Json::Array(items) => items.iter().for_each(|item| collect(item, path, out)),
        Json::Object(object) => {
            if let Some(prefix) = first.strip_suffix("[x]") {
                for (key, child) in object.iter() {
                    if key.strip_prefix(prefix).is_some_and(|suffix| suffix.starts_with(|c: char| c.is_ascii_uppercase())) {
                        collect(child, rest, out);
                    }
                }
            } else if let Some(child) = object.get(first) {
                collect(child, rest, out);
            }
        }
        _ => {}
    }
}

fn tokens(value: &Json, emit: &mut dyn FnMut(String, String)) {
    let text = |j: &Json, k: &str| j.get(k).and_then(Json::as_str).map(str::to_string);
    match value {
        Json::String(code) => emit(String::new(), code.to_string()),
        Json::Object(_) => {
            if let Some(codings) = value.get("coding").and_then(Json::as_array) {
                for coding in codings {
                    if let Some(code) = text(coding, "code") {
                        emit(text(coding, "system").unwrap_or_default(), code);
                    }
                }
            } else if let Some(v) = text(value, "value") {
                emit(text(value, "system").unwrap_or_default(), v);
            } else if let Some(code) = text(value, "code") {
                emit(text(value, "system").unwrap_or_default(), code);
            }
        }
        _ => {}
    }
}

fn value_range(value: &Json) -> Option<(String, String)> {
    match value {
        Json::String(s) => date_range(s),
        Json::Object(_) => {
            let start = value.get("start").and_then(Json::as_str).and_then(date_range).map(|r| r.0);
            let end = value.get("end").and_then(Json::as_str).and_then(date_range).map(|r| r.1);
            if start.is_none() && end.is_none() {
                return None;
            }
            Some((start.unwrap_or_else(|| MIN_INSTANT.into()), end.unwrap_or_else(|| MAX_INSTANT.into())))
        }
        _ => None,
    }
}

/// The earliest and latest instants the index uses for open ranges; they sort as text.
pub const MIN_INSTANT: &str = "0001-01-01T00:00:00.000Z";
pub const MAX_INSTANT: &str = "9999-12-31T23:59:59.999Z";

/// The instant range `[low, high)` a FHIR date, dateTime or instant covers, as UTC text that sorts
/// chronologically (`2026-03-01` → `2026-03-01T00:00:00.000Z` .. `2026-03-02T00:00:00.000Z`).
/// Times without a zone are read as UTC.
pub fn date_range(text: &str) -> Option<(String, String)> {
    use time::{Date, Duration, Month, PrimitiveDateTime, Time, UtcOffset};
    let digits = |s: &str| -> Option<u32> { (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten() };
    let format = |t: time::OffsetDateTime| -> String {
        let t = t.to_offset(UtcOffset::UTC);
        if t.year() > 9999 {
            return MAX_INSTANT.to_string();
        }
        format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond())
    };
    let (date_part, time_part) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut parts = date_part.split('-');
    let year_text = parts.next()?;
    if year_text.len() != 4 {
        return None;
    }
    let year = digits(year_text)? as i32;
    let month = parts.next().map(|m| if m.len() == 2 { digits(m) } else { None });
    let day = parts.next().map(|d| if d.len() == 2 { digits(d) } else { None });
    if parts.next().is_some() {
        return None;
    }
    let month = match month {
        Some(m) => Some(Month::try_from(u8::try_from(m?).ok()?).ok()?),
        None => None,
    };
    let day = match day {
        Some(d) => Some(u8::try_from(d?).ok()?),
        None => None,
    };
    let start_of = |date: Date| PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc();
    match (month, day, time_part) {
        (None, None, None) => {
            let low = start_of(Date::from_calendar_date(year, Month::January, 1).ok()?);
            let high = Date::from_calendar_date(year + 1, Month::January, 1).map(start_of).map(format).unwrap_or_else(|_| MAX_INSTANT.into());
            Some((format(low), high))
        }
        (Some(month), None, None) => {
            let low = start_of(Date::from_calendar_date(year, month, 1).ok()?);
            let (next_year, next_month) = if month == Month::December { (year + 1, Month::January) } else { (year, month.next()) };
            let high = Date::from_calendar_date(next_year, next_month, 1).map(start_of).map(format).unwrap_or_else(|_| MAX_INSTANT.into());
            Some((format(low), high))
        }
        (Some(month), Some(day), None) => {
            let date = Date::from_calendar_date(year, month, day).ok()?;
            let high = date.next_day().map(start_of).map(format).unwrap_or_else(|| MAX_INSTANT.into());
            Some((format(start_of(date)), high))
        }
        (Some(month), Some(day), Some(time_text)) => {
            let date = Date::from_calendar_date(year, month, day).ok()?;
            let (clock, offset) = split_zone(time_text)?;
            let mut hms = clock.split(':');
            let hour = u8::try_from(digits(hms.next()?)?).ok()?;
            let minute = u8::try_from(digits(hms.next()?)?).ok()?;
            let (second, fraction) = match hms.next() {
                Some(s) => match s.split_once('.') {
                    Some((sec, frac)) => (u8::try_from(digits(sec)?).ok()?, Some(frac)),
                    None => (u8::try_from(digits(s)?).ok()?, None),
                },
                None => (0, None),
            };
            if hms.next().is_some() {
                return None;
            }
            let millis = match fraction {
                Some(f) => {
                    digits(f)?;
                    let padded: String = f.chars().chain("000".chars()).take(3).collect();
                    padded.parse::<u16>().ok()?
                }
                None => 0,
            };
            let clock = Time::from_hms_milli(hour, minute, second, millis).ok()?;
            let low = PrimitiveDateTime::new(date, clock).assume_offset(offset);
            let width = if fraction.is_some() { Duration::milliseconds(1) } else { Duration::seconds(1) };
            Some((format(low), format(low + width)))
        }
        _ => None,
    }
}

fn split_zone(time_text: &str) -> Option<(&str, time::UtcOffset)> {
    if let Some(clock) = time_text.strip_suffix('Z') {
        return Some((clock, time::UtcOffset::UTC));
    }
    if let Some(i) = time_text.rfind(['+', '-']) {
        let (clock, zone) = time_text.split_at(i);
        let sign: i8 = if zone.starts_with('-') { -1 } else { 1 };
        let (h, m) = zone[1..].split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let offset = time::UtcOffset::from_hms(sign * h.parse::<i8>().ok()?, sign * m.parse::<i8>().ok()?, 0).ok()?;
        return Some((clock, offset));
    }
    Some((time_text, time::UtcOffset::UTC))
}

/// A parsed search: clauses are ANDed, the alternatives inside one clause ORed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub clauses: Vec<Clause>,
    /// `_sort` keys, most significant first.
    pub sort: Vec<Sort>,
    pub count: usize,
    pub offset: usize,
    pub includes: Vec<(&'static str, &'static str)>,
    /// `_revinclude`: (source type, reference parameter) of resources that point at the matches.
    pub revincludes: Vec<(&'static str, &'static str)>,
    /// `_summary=count`: the total alone.
    pub count_only: bool,
    /// `_summary` or `_elements`: which elements of each match are returned.
    pub subset: Option<Subset>,
    /// `_total=none`: no total (and no count query).
    pub no_total: bool,
    /// The parameters honoured, in order (what the `self` link shows).
    pub used: Vec<(String, String)>,
    /// Under `handling=lenient`, why each parameter left out was left out.
    pub ignored: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clause {
    Id(Vec<String>),
    Token { param: String, any: Vec<TokenMatch> },
    Date { param: String, any: Vec<DateMatch> },
}

/// `system|code`, `|code`, `system|` or `code`; `None` means "any".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMatch {
    pub system: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DateMatch {
    pub prefix: Prefix,
    pub low: String,
    pub high: String,
}

/// One `_sort` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

/// What a `_sort` key orders by: a column, or the least indexed value of a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    LastUpdated,
    Id,
    /// A date parameter (its earliest instant).
    Date(&'static str),
    /// A token or reference parameter (its least value).
    Token(&'static str),
}

/// Which elements of a resource are returned (`_summary=true|text|data`, `_elements`); the rest are
/// left out and the resource is tagged SUBSETTED.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subset {
    Summary,
    Text,
    Data,
    Elements(Vec<String>),
}

/// Why a search was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// Most comma-separated values one search parameter may carry. Each value is a condition in SQL;
/// this bound (with [`MAX_PARAMETERS`]) keeps every query far inside SQLite's and PostgreSQL's limits.
pub const MAX_VALUES_PER_PARAMETER: usize = 100;

/// Most parameters (repeats counted) one search or conditional operation may carry.
pub const MAX_PARAMETERS: usize = 30;

/// Parameters the HTTP layer handles and the query ignores.
pub const RESULT_PARAMS: &[&str] = &["_format", "_pretty"];

/// Parameters that shape the result rather than filter it, accepted by every search (and `_summary`/`_elements` by read).
pub const CONTROL_PARAMS: &[&str] = &["_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total"];

/// Reads `_summary` or `_elements`: `Ok(None)` for `_summary=false`; `count` is the caller's to handle.
pub fn subset(name: &str, raw: &str) -> Result<Option<Subset>, String> {
    match (name, raw) {
        ("_summary", "true") => Ok(Some(Subset::Summary)),
        ("_summary", "text") => Ok(Some(Subset::Text)),
        ("_summary", "data") => Ok(Some(Subset::Data)),
        ("_summary", "false") => Ok(None),
        ("_summary", _) => Err("expected true, false, text, data or count".into()),
        (_, raw) => {
            let names: Vec<String> = raw.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
            if names.is_empty() || names.iter().any(|n| !n.chars().all(|c| c.is_ascii_alphanumeric())) {
                return Err("expected a comma-separated list of element names".into());
            }
            Ok(Some(Subset::Elements(names)))
        }
    }
}

/// Parses query-string pairs for a search on `resource_type` (`""` for a search across types, which
/// takes only the parameters common to all). Unknown parameters, modifiers and values are refused,
/// so a client never mistakes an unfiltered result for a filtered one; with `lenient`
/// (`Prefer: handling=lenient`) they are left out and named in [`Query::ignored`] instead.
pub fn parse_query(resource_type: &str, pairs: &[(String, String)], default_count: usize, max_count: usize, lenient: bool) -> Result<Query, QueryError> {
    let mut query = Query { count: default_count, ..Query::default() };
    for (position, (name, raw)) in pairs.iter().enumerate() {
        let err = |msg: &str| QueryError(format!("search parameter '{name}': {msg}"));
        if position >= MAX_PARAMETERS {
            return Err(err(&format!("a search takes at most {MAX_PARAMETERS} parameters")));
        }
        if raw.split(',').nth(MAX_VALUES_PER_PARAMETER).is_some() {
            return Err(err(&format!("at most {MAX_VALUES_PER_PARAMETER} comma-separated values")));
        }
        if RESULT_PARAMS.contains(&name.as_str()) {
            // The paging links keep the format asked for.
            query.used.push((name.clone(), raw.clone()));
            continue;
        }
        match apply(&mut query, resource_type, name, raw, max_count) {
            Ok(()) => query.used.push((name.clone(), raw.clone())),
            Err(msg) if lenient => query.ignored.push(err(&msg).0),
            Err(msg) => return Err(err(&msg)),
        }
    }
    if query.count_only {
        query.count = 0;
        query.no_total = false;
    }
    Ok(query)
}

/// Applies one parameter to the query; the error says what is wrong with it.
fn apply(query: &mut Query, resource_type: &str, name: &str, raw: &str, max_count: usize) -> Result<(), String> {
    let defs = params(resource_type);
    let on = if resource_type.is_empty() { "a search across types" } else { resource_type };
    match name {
        "_count" => query.count = raw.parse::<usize>().map_err(|_| "not a non-negative integer")?.min(max_count),
        "_offset" => query.offset = raw.parse::<usize>().ok().filter(|n| *n <= 1_000_000).ok_or("not an offset between 0 and 1000000")?,
        // fhirpy's count() sends it (an Aidbox parameter) to ask for an exact total, which every total here is.
        "_totalMethod" if raw == "count" => {}
        "_totalMethod" => return Err("only 'count' is offered: every total is exact".into()),
        "_sort" => {
            for key in raw.split(',') {
                let (descending, key) = match key.strip_prefix('-') {
                    Some(key) => (true, key),
                    None => (false, key),
                };
                let key = match key {
                    "_lastUpdated" => SortKey::LastUpdated,
                    "_id" => SortKey::Id,
                    "date" if !defs.iter().any(|p| p.name == "date") => {
                        SortKey::Date(sort_date_param(resource_type).map(|p| p.name).ok_or_else(|| format!("{on} has no date to sort by"))?)
                    }
                    other => match defs.iter().find(|p| p.name == other) {
                        Some(p) if p.kind == Kind::Date => SortKey::Date(p.name),
                        Some(p) => SortKey::Token(p.name),
                        None => return Err(format!("'{other}' is not a search parameter of {on} to sort by (_lastUpdated and _id sort any type)")),
                    },
                };
                query.sort.push(Sort { key, descending });
            }
        }
        "_include" => {
            let mut parts = raw.split(':');
            let (source, param, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next());
            let found = INCLUDES
                .iter()
                .find(|(s, p, t)| *s == source && *p == param && source == resource_type && target.is_none_or(|x| x == *t))
                .ok_or("not a supported _include for this type")?;
            query.includes.push((found.1, found.2));
        }
        "_revinclude" => {
            let mut parts = raw.split(':');
            let (source, param, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next());
            let def = params(source)
                .iter()
                .find(|p| p.name == param && p.kind == Kind::Reference && !resource_type.is_empty() && p.target.is_none_or(|t| t == resource_type))
                .filter(|_| target.is_none_or(|t| t == resource_type) && parts.next().is_none())
                .ok_or_else(|| format!("'{raw}' is not a reference from a stored type to {on} (Type:parameter, such as Provenance:target)"))?;
            let source = SEARCHABLE_TYPES.iter().find(|t| **t == source).ok_or("unknown source type")?;
            query.revincludes.push((source, def.name));
        }
        "_summary" if raw == "count" => query.count_only = true,
        "_summary" | "_elements" => {
            if query.subset.is_some() {
                return Err("_summary and _elements cannot be combined".into());
            }
            query.subset = subset(name, raw)?;
        }
        "_total" => {
            query.no_total = match raw {
                "none" => true,
                "estimate" | "accurate" => false,
                _ => return Err("expected none, estimate or accurate".into()),
            }
        }
        "_id" => query.clauses.push(Clause::Id(raw.split(',').map(str::to_string).collect())),
        "_lastUpdated" => query.clauses.push(Clause::Date { param: "_lastUpdated".into(), any: date_matches(raw)? }),
        _ => {
            if name.contains(':') {
                return Err("modifiers are not supported".into());
            }
            let def = defs.iter().find(|d| d.name == name).ok_or_else(|| format!("not supported on {on}"))?;
            let clause = match def.kind {
                Kind::Token => Clause::Token { param: def.name.into(), any: raw.split(',').map(token_match).collect() },
                Kind::Reference => {
                    let any = raw.split(',').map(|v| reference_match(v, def.target).ok_or("expected Type/id (or an id for a typed parameter)")).collect::<Result<_, _>>()?;
                    Clause::Token { param: def.name.into(), any }
                }
                Kind::Date => Clause::Date { param: def.name.into(), any: date_matches(raw)? },
            };
            query.clauses.push(clause);
        }
    }
    Ok(())
}

fn token_match(value: &str) -> TokenMatch {
    match value.split_once('|') {
        Some((system, code)) => TokenMatch { system: Some(system.to_string()), value: (!code.is_empty()).then(|| code.to_string()) },
        None => TokenMatch { system: None, value: Some(value.to_string()) },
    }
}

fn reference_match(value: &str, target: Option<&str>) -> Option<TokenMatch> {
    let reference = match (normalize_reference(value), target) {
        (Some(r), Some(t)) if r.starts_with(&format!("{t}/")) => r,
        (Some(_), Some(_)) => return None,
        (Some(r), None) => r,
        (None, Some(t)) => normalize_reference(&format!("{t}/{value}"))?,
        (None, None) => return None,
    };
    Some(TokenMatch { system: Some(String::new()), value: Some(reference) })
}

fn date_matches(raw: &str) -> Result<Vec<DateMatch>, String> {
    raw.split(',')
        .map(|value| {
            let (prefix, rest) = match value.get(..2) {
                Some("eq") => (Prefix::Eq, &value[2..]),
                Some("ne") => (Prefix::Ne, &value[2..]),
                Some("gt") => (Prefix::Gt, &value[2..]),
                Some("lt") => (Prefix::Lt, &value[2..]),
                Some("ge") => (Prefix::Ge, &value[2..]),
                Some("le") => (Prefix::Le, &value[2..]),
                Some("sa") => (Prefix::Sa, &value[2..]),
                Some("eb") => (Prefix::Eb, &value[2..]),
                Some("ap") => return Err("the ap prefix is not supported".to_string()),
                _ => (Prefix::Eq, value),
            };
            let (low, high) = date_range(rest).ok_or_else(|| format!("'{rest}' is not a FHIR date or dateTime"))?;
            Ok(DateMatch { prefix, low, high })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_become_utc_ranges_that_sort_as_text() {
        assert_eq!(date_range("2026").unwrap(), ("2026-01-01T00:00:00.000Z".into(), "2027-01-01T00:00:00.000Z".into()));
        assert_eq!(date_range("2026-12").unwrap().1, "2027-01-01T00:00:00.000Z");
        assert_eq!(date_range("2026-02-28").unwrap().1, "2026-03-01T00:00:00.000Z");
        assert_eq!(date_range("2026-03-02T09:30:00-05:00").unwrap(), ("2026-03-02T14:30:00.000Z".into(), "2026-03-02T14:30:01.000Z".into()));
        assert_eq!(date_range("2026-03-02T09:30:00.5Z").unwrap().0, "2026-03-02T09:30:00.500Z");
        assert_eq!(date_range("9999-12-31").unwrap().1, MAX_INSTANT);
        for bad in ["", "26", "2026-13", "2026-02-30", "2026-1-01", "2026-01-01T25:00:00Z", "2026-01-01T10:00:00+5", "x'; DROP TABLE"] {
            assert!(date_range(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_index_holds_tokens_references_and_choice_dates() {
        let obs = crate::json::parse(
            br#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"44261-6"}]},
                "subject":{"reference":"Patient/p1"},"effectivePeriod":{"start":"2026-03-01"},"identifier":[{"system":"urn:s","value":"v"}]}"#,
        )
        .unwrap();
        let index = extract("Observation", &obs);
        let token = |param, system: &str, value: &str| IndexEntry::Token { param, system: system.into(), value: value.into() };
        assert!(index.contains(&token("status", "", "final")));
        assert!(index.contains(&token("code", "http://loinc.org", "44261-6")));
        assert!(index.contains(&token("patient", "", "Patient/p1")));
        assert!(index.contains(&token("identifier", "urn:s", "v")));
        assert!(index.contains(&IndexEntry::Date { param: "date", low: "2026-03-01T00:00:00.000Z".into(), high: MAX_INSTANT.into() }));
    }

    #[test]
    fn queries_refuse_what_they_cannot_honour() {
        let pairs = |p: &[(&str, &str)]| p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let q = parse_query("Observation", &pairs(&[("patient", "p1"), ("date", "ge2026-03-01"), ("_sort", "-date"), ("_count", "500")]), 50, 200, false).unwrap();
        assert_eq!(q.count, 200);
        assert_eq!(q.sort, [Sort { key: SortKey::Date("date"), descending: true }]);
        assert!(matches!(&q.clauses[0], Clause::Token { any, .. } if any[0].value.as_deref() == Some("Patient/p1")));
        assert_eq!(parse_query("Observation", &pairs(&[("_totalMethod", "count"), ("_count", "0")]), 50, 200, false).unwrap().count, 0, "fhirpy's count()");
        for bad in [("name", "x"), ("code:text", "x"), ("date", "ap2026"), ("date", "yesterday"), ("patient", "Group/1"), ("_sort", "name"), ("_include", "Observation:performer"), ("_revinclude", "Observation:patient"), ("_revinclude", "Task:nothing"), ("_summary", "all"), ("_total", "some"), ("_totalMethod", "estimate")] {
            assert!(parse_query("Observation", &pairs(&[bad]), 50, 200, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lenient_queries_leave_out_what_they_cannot_honour_and_say_so() {
        let pairs = |p: &[(&str, &str)]| p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let asked = pairs(&[("status", "final"), ("name", "x"), ("_sort", "-date,_id,status"), ("_revinclude", "Provenance:target"), ("_summary", "count"), ("_total", "none")]);
        assert!(parse_query("Observation", &asked, 50, 200, false).unwrap_err().0.contains("'name'"));
        let q = parse_query("Observation", &asked, 50, 200, true).unwrap();
        assert_eq!(q.ignored.len(), 1, "{:?}", q.ignored);
        assert!(q.ignored[0].contains("'name'"));
        assert_eq!(q.used.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["status", "_sort", "_revinclude", "_summary", "_total"]);
        let keys: Vec<SortKey> = q.sort.iter().map(|s| s.key).collect();
        assert_eq!(keys, [SortKey::Date("date"), SortKey::Id, SortKey::Token("status")]);
        assert_eq!(q.revincludes, [("Provenance", "target")]);
        assert!(q.count_only && q.count == 0 && !q.no_total, "a count always has its total");
        // Across types only the common parameters apply.
        assert!(parse_query("", &pairs(&[("_lastUpdated", "ge2026"), ("_sort", "-_lastUpdated")]), 50, 200, false).is_ok());
        assert!(parse_query("", &pairs(&[("status", "final")]), 50, 200, false).is_err());
        assert!(parse_query("", &pairs(&[("_sort", "date")]), 50, 200, false).is_err());
    }

    #[test]
    fn values_and_parameters_are_bounded_and_named() {
        let many = (0..=MAX_VALUES_PER_PARAMETER).map(|i| format!("v{i}")).collect::<Vec<_>>().join(",");
        for name in ["identifier", "_id", "date"] {
            let e = parse_query("Observation", &[(name.to_string(), many.clone())], 50, 200, false).unwrap_err();
            assert!(e.0.contains(&format!("'{name}'")), "{e}");
        }
        let most = (0..MAX_VALUES_PER_PARAMETER).map(|i| format!("v{i}")).collect::<Vec<_>>().join(",");
        assert!(parse_query("Observation", &[("identifier".to_string(), most)], 50, 200, false).is_ok());
        let repeated = vec![("status".to_string(), "final".to_string()); MAX_PARAMETERS + 1];
        let e = parse_query("Observation", &repeated, 50, 200, false).unwrap_err();
        assert!(e.0.contains("'status'") && e.0.contains("at most"), "{e}");
        assert!(parse_query("Observation", &repeated[..MAX_PARAMETERS], 50, 200, false).is_ok());
    }

    #[test]
    fn addressed_organizations_are_found_in_nested_elements() {
        let task = crate::json::parse(
            br#"{"resourceType":"Task","owner":{"reference":"Organization/unit-a"},"restriction":{"recipient":[{"reference":"Organization/payer"}]},"requester":{"reference":"Practitioner/x"}}"#,
        )
        .unwrap();
        assert_eq!(addressed_organizations(&task), ["Organization/unit-a", "Organization/payer"]);
    }
}
