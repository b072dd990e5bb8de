//! FHIR's HTTP conventions: content negotiation (`Accept`, `_format`, JSON or XML), reading a JSON or XML body within the size limit, `Prefer`, ETag/Last-Modified headers, and Bundle assembly from stored JSON.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;
use crate::json::{self, Json};
use crate::outcome::{Issue, IssueCode, operation_outcome};
use crate::store::Stored;

pub const FHIR_JSON: &str = "application/fhir+json;charset=utf-8";

/// The current instant as FHIR `instant` text in UTC with milliseconds (sorts chronologically).
pub fn now_instant() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z", t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond())
}

/// An HTTP date (`Last-Modified`) from a stored instant.
pub fn http_date(instant: &str) -> Option<String> {
    let t = time::OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339).ok()?;
    let weekday = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][t.weekday().number_days_from_monday() as usize];
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][t.month() as usize - 1];
    Some(format!("{weekday}, {:02} {month} {:04} {:02}:{:02}:{:02} GMT", t.day(), t.year(), t.hour(), t.minute(), t.second()))
}

/// Query-string pairs in order, repeats kept.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// The wire format of a FHIR body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

pub const FHIR_XML: &str = "application/fhir+xml;charset=utf-8";

/// What the client may ask for, in `_format` or `Accept`; said in every 406.
const FORMATS: &str = "application/fhir+json (json) or application/fhir+xml (xml), FHIR R4 (fhirVersion=4.0)";

/// The format a media type names (`_format` also takes `json` and `xml`), or `None` when this
/// server cannot produce it: another type, or a `fhirVersion` parameter other than R4's.
fn media_format(text: &str) -> Option<Format> {
    let mut parts = text.split(';');
    let format = match parts.next().unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "json" | "application/json" | "application/fhir+json" | "application/json+fhir" | "text/json" | "*/*" | "application/*" => Format::Json,
        "xml" | "application/xml" | "application/fhir+xml" | "application/xml+fhir" | "text/xml" => Format::Xml,
        _ => return None,
    };
    r4_parameters(parts).then_some(format)
}

/// Whether media type parameters name no FHIR version but R4 (`fhirVersion=4.0`; `4.0.1` is read alike).
fn r4_parameters<'t>(parameters: impl Iterator<Item = &'t str>) -> bool {
    parameters.filter_map(|p| p.split_once('=')).filter(|(name, _)| name.trim().eq_ignore_ascii_case("fhirVersion")).all(|(_, version)| {
        let version = version.trim().trim_matches('"');
        version == "4.0" || version.starts_with("4.0.")
    })
}

/// The format a request's response is written in: `_format` when given, else the `Accept` range
/// with the highest `q` this server can produce (the first of equals), else JSON. Anything that
/// names only what it cannot produce is refused (406), on every FHIR endpoint alike.
pub fn negotiate(headers: &HeaderMap, pairs: &[(String, String)]) -> Result<Format, ApiError> {
    if let Some((_, format)) = pairs.iter().find(|(k, _)| k == "_format") {
        return media_format(format).ok_or_else(|| ApiError::NotAcceptable(format!("_format '{format}' cannot be produced; this server writes {FORMATS}")));
    }
    let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    if accept.trim().is_empty() {
        return Ok(Format::Json);
    }
    let mut best: Option<(Format, f32)> = None;
    for range in accept.split(',').filter(|r| !r.trim().is_empty()) {
        let q = range
            .split(';')
            .skip(1)
            .filter_map(|p| p.split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, q)| q.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q)));
        let (Some(format), Some(q)) = (media_format(range), q) else { continue };
        if q > 0.0 && best.is_none_or(|(_, best_q)| q > best_q) {
            best = Some((format, q));
        }
    }
    best.map(|(format, _)| format).ok_or_else(|| ApiError::NotAcceptable(format!("Accept '{accept}' names nothing this server can produce; it writes {FORMATS}")))
}

/// Rewrites a FHIR JSON response body in the negotiated format. Handlers write JSON; this is the
/// one place a body becomes XML, so every body (resources, Bundles, errors) follows the request.
pub async fn in_format(response: Response, format: Format, model: &dyn crate::fhirpath::TypeModel) -> Response {
    let is_fhir_json = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/fhir+json"));
    if format == Format::Json || !is_fhir_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The body is already whole in memory (handlers build it as a string).
    let written = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => json::parse(&bytes).ok().and_then(|resource| crate::xml::write_resource(&resource, model)),
        Err(_) => None,
    };
    let Some(xml) = written else {
        return ApiError::Internal("a response body could not be written as XML".into()).into_response();
    };
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_XML));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(xml))
}

/// Reads a FHIR resource from a request body (JSON, or XML converted to the same tree) within the
/// size limit; a problem only the XML form can have (elements out of order, text in elements) refuses it (422).
pub async fn read_resource(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Json, ApiError> {
    let (resource, issues) = read_body(state, headers, body).await?;
    if issues.iter().any(|i| i.severity.is_error()) {
        state.metrics.validation_failed();
        return Err(ApiError::Unprocessable(issues));
    }
    Ok(resource)
}

/// Reads a FHIR resource from a request body, with the problems only its XML form can have (none for JSON).
pub async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<(Json, Vec<Issue>), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    let format = match essence.as_str() {
        "application/fhir+json" | "application/json" | "application/json+fhir" => Some(Format::Json),
        "application/fhir+xml" | "application/xml" | "application/xml+fhir" | "text/xml" => Some(Format::Xml),
        _ => None,
    };
    let Some(format) = format.filter(|_| r4_parameters(parts)) else {
        return Err(ApiError::UnsupportedMediaType(format!("Content-Type '{content_type}' is not supported; send application/fhir+json or application/fhir+xml (FHIR R4)")));
    };
    let bytes = read_bytes(headers, body, state.loaded.config.server.max_body_bytes).await?;
    match format {
        Format::Json => Ok((parse_resource(&bytes)?, Vec::new())),
        Format::Xml => crate::xml::parse_resource(&bytes, &**state.validator.definitions()).map_err(|e| {
            ApiError::Unreadable(vec![Issue::new(crate::outcome::Severity::Fatal, e.code, "", format!("the body is not a FHIR XML resource: {}", e.message)).with_position(e.line, e.column)])
        }),
    }
}

/// Collects a body up to `limit` bytes (413 beyond it).
pub async fn read_bytes(headers: &HeaderMap, body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` reports both "too long" and transport failures; only the first is the client's size problem.
        if std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit")) || e.to_string().contains("length limit") {
            ApiError::PayloadTooLarge(limit)
        } else {
            ApiError::BadRequest("the request body could not be read".into())
        }
    })
}

/// Parses bytes as a JSON object with a `resourceType`. Bytes that are not JSON are the client's
/// malformed request (400); well-formed JSON that is not valid FHIR is for the validator (422).
pub fn parse_resource(bytes: &[u8]) -> Result<Json, ApiError> {
    let resource = json::parse(bytes).map_err(|e| {
        ApiError::Unreadable(vec![Issue::new(crate::outcome::Severity::Fatal, IssueCode::Structure, e.path.clone(), format!("the body is not valid JSON: {}", e.message)).with_position(e.line, e.column)])
    })?;
    match resource.get("resourceType").and_then(Json::as_str) {
        Some(_) => Ok(resource),
        None => Err(ApiError::BadRequest("the body is not a FHIR resource (no resourceType)".into())),
    }
}

/// `Prefer: return=…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub fn prefer_return(headers: &HeaderMap) -> Return {
    let prefer = headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    for part in prefer.split([',', ';']) {
        match part.trim().to_ascii_lowercase().as_str() {
            "return=minimal" => return Return::Minimal,
            "return=operationoutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

/// `Prefer: handling=lenient`: a search leaves out the parameters it cannot honour (and says so)
/// instead of refusing them; `handling=strict`, or no preference, refuses them.
pub fn lenient(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split([',', ';'])).any(|p| p.trim().eq_ignore_ascii_case("handling=lenient"))
}

/// A JSON response with the FHIR content type.
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// Reads a version from `If-Match` (`W/"3"` or `"3"`).
pub fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let text = value.to_str().unwrap_or_default().trim();
    let inner = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    inner.parse::<i64>().map(Some).map_err(|_| ApiError::BadRequest(format!("If-Match '{text}' is not a version ETag such as W/\"3\"")))
}

/// Whether a read's `If-None-Match` or `If-Modified-Since` says the client already holds `stored`.
/// `If-None-Match` decides when present (RFC 9110 §13.2.2); an unreadable date is ignored, as HTTP says.
pub fn not_modified(headers: &HeaderMap, stored: &Stored) -> bool {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        let current = stored.version.to_string();
        return value.to_str().unwrap_or_default().split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).trim_matches('"') == current);
    }
    let since = headers.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()).and_then(parse_http_date);
    let updated = time::OffsetDateTime::parse(&stored.last_updated, &time::format_description::well_known::Rfc3339).ok();
    match (since, updated) {
        // HTTP dates have whole seconds: the `Last-Modified` a client got back must count as "not older".
        (Some(since), Some(updated)) => updated.unix_timestamp() <= since.unix_timestamp(),
        _ => false,
    }
}

/// The FHIR instant of an HTTP date (`Last-Modified` → a batch entry's `lastModified`).
pub fn instant_of_http_date(text: &str) -> Option<String> {
    parse_http_date(text)?.format(&time::format_description::well_known::Rfc3339).ok()
}

/// Reads an HTTP date in its one current form, IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(text: &str) -> Option<time::OffsetDateTime> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, clock, "GMT"] = parts.as_slice() else { return None };
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = time::Month::try_from(months.iter().position(|m| m == month)? as u8 + 1).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let mut hms = clock.split(':').map(|n| n.parse::<u8>().ok());
    let clock = time::Time::from_hms(hms.next()??, hms.next()??, hms.next()??).ok()?;
    Some(date.with_time(clock).assume_utc())
}

/// The 304 of a conditional read: no body, the validators of the version the client holds.
pub fn not_modified_response(stored: &Stored) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(stored.version)) {
        headers.insert(header::ETAG, v);
    }
    if let Some(v) = http_date(&stored.last_updated).and_then(|d| HeaderValue::from_str(&d).ok()) {
        headers.insert(header::LAST_MODIFIED, v);
    }
    response
}

/// The response to a read or a write of one resource.
pub fn resource_response(status: StatusCode, stored: &Stored, base: &str, prefer: Return, location: bool) -> Response {
    let mut response = match prefer {
        Return::Representation => json_response(status, stored.body.clone()),
        Return::Minimal => status.into_response(),
        Return::OperationOutcome => {
            let message = format!("{} {}/{} version {}", if status == StatusCode::CREATED { "created" } else { "stored" }, stored.resource_type, stored.id, stored.version);
            json_response(status, operation_outcome(&[Issue::information(IssueCode::Informational, "", message)]).to_string_compact())
        }
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag(stored.version)) {
        headers.insert(header::ETAG, v);
    }
    if let Some(v) = http_date(&stored.last_updated).and_then(|d| HeaderValue::from_str(&d).ok()) {
        headers.insert(header::LAST_MODIFIED, v);
    }
    if location && let Ok(v) = HeaderValue::from_str(&format!("{base}/{}/{}/_history/{}", stored.resource_type, stored.id, stored.version)) {
        headers.insert(header::LOCATION, v);
    }
    response
}

/// Builds Bundle JSON text around stored bodies without re-parsing them.
pub struct BundleText {
    text: String,
    entries: usize,
}

impl BundleText {
    /// Starts a Bundle with the given `type`, optional `total` and links (`relation`, `url`).
    pub fn new(bundle_type: &str, total: Option<i64>, links: &[(&str, String)]) -> BundleText {
        let mut head = json::Object::new();
        head.insert("resourceType", Json::string("Bundle"));
        head.insert("id", Json::string(uuid::Uuid::new_v4().to_string()));
        let mut meta = json::Object::new();
        meta.insert("lastUpdated", Json::string(now_instant()));
        head.insert("meta", Json::Object(meta));
        head.insert("type", Json::string(bundle_type));
        if let Some(total) = total {
            head.insert("total", Json::Number(total.to_string().into()));
        }
        if !links.is_empty() {
            let links = links
                .iter()
                .map(|(relation, url)| {
                    let mut link = json::Object::new();
                    link.insert("relation", Json::string(*relation));
                    link.insert("url", Json::string(url.as_str()));
                    Json::Object(link)
                })
                .collect();
            head.insert("link", Json::Array(links));
        }
        let mut text = Json::Object(head).to_string_compact();
        text.pop();
        text.push_str(",\"entry\":[");
        BundleText { text, entries: 0 }
    }

    /// Adds an entry: `fullUrl`, the raw resource JSON (if any), and other members as JSON.
    pub fn entry(&mut self, full_url: Option<&str>, resource: Option<&str>, rest: &[(&str, Json)]) {
        if self.entries > 0 {
            self.text.push(',');
        }
        self.entries += 1;
        self.text.push('{');
        let mut first = true;
        let mut sep = |text: &mut String| {
            if !first {
                text.push(',');
            }
            first = false;
        };
        if let Some(url) = full_url {
            sep(&mut self.text);
            self.text.push_str("\"fullUrl\":");
            self.text.push_str(&Json::string(url).to_string_compact());
        }
        if let Some(resource) = resource {
            sep(&mut self.text);
            self.text.push_str("\"resource\":");
            self.text.push_str(resource);
        }
        for (key, value) in rest {
            sep(&mut self.text);
            self.text.push_str(&Json::string(*key).to_string_compact());
            self.text.push(':');
            self.text.push_str(&value.to_string_compact());
        }
        self.text.push('}');
    }

    pub fn finish(mut self) -> String {
        if self.entries == 0 {
            // FHIR forbids empty arrays: drop the `"entry":[` opened in `new`.
            let cut = self.text.len() - ",\"entry\":[".len();
            self.text.truncate(cut);
            self.text.push('}');
        } else {
            self.text.push_str("]}");
        }
        self.text
    }
}

/// A small JSON object from pairs.
pub fn object<'a>(members: impl IntoIterator<Item = (&'a str, Json)>) -> Json {
    let mut o = json::Object::new();
    for (k, v) in members {
        o.insert(k, v);
    }
    Json::Object(o)
}

/// The `response` member of a transaction or batch entry.
pub fn entry_response(status: &str, stored: Option<&Stored>, outcome: Option<Json>) -> Json {
    let mut members = vec![("status", Json::string(status))];
    if let Some(s) = stored {
        members.push(("location", Json::string(format!("{}/{}/_history/{}", s.resource_type, s.id, s.version))));
        members.push(("etag", Json::string(etag(s.version))));
        members.push(("lastModified", Json::string(s.last_updated.as_str())));
    }
    if let Some(outcome) = outcome {
        members.push(("outcome", outcome));
    }
    object(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_text_is_valid_json_with_and_without_entries() {
        let empty = BundleText::new("searchset", Some(0), &[("self", "http://x/Patient".into())]).finish();
        let parsed = json::parse(empty.as_bytes()).unwrap();
        assert!(parsed.get("entry").is_none());
        let mut b = BundleText::new("searchset", Some(1), &[]);
        b.entry(Some("http://x/Patient/1"), Some("{\"resourceType\":\"Patient\",\"id\":\"1\"}"), &[("search", object([("mode", Json::string("match"))]))]);
        let parsed = json::parse(b.finish().as_bytes()).unwrap();
        assert_eq!(parsed["entry"].as_array().unwrap().len(), 1);
        assert_eq!(parsed["entry"].as_array().unwrap()[0]["resource"]["id"].as_str(), Some("1"));
    }

    #[test]
    fn http_dates_use_gmt_and_read_back() {
        assert_eq!(http_date("2026-11-25T17:04:05.123Z").unwrap(), "Wed, 25 Nov 2026 17:04:05 GMT");
        let read = parse_http_date("Wed, 25 Nov 2026 17:04:05 GMT").unwrap();
        assert_eq!(read.unix_timestamp(), time::OffsetDateTime::parse("2026-11-25T17:04:05Z", &time::format_description::well_known::Rfc3339).unwrap().unix_timestamp());
        for bad in ["yesterday", "Wed, 25 Nov 2026 17:04:05 CET", "Wed, 31 Feb 2026 17:04:05 GMT", "Wed, 25 Nov 2026 17:04 GMT"] {
            assert!(parse_http_date(bad).is_none(), "{bad}");
        }
    }
}
