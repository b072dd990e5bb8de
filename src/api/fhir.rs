//! FHIR's HTTP conventions: content negotiation (`Accept`, `_format`), reading a JSON body within the size limit, `Prefer`, ETag/Last-Modified headers, and Bundle assembly from stored JSON.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
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

/// Refuses a request whose `_format` or `Accept` asks for something other than JSON (406).
pub fn negotiate(headers: &HeaderMap, pairs: &[(String, String)]) -> Result<(), ApiError> {
    let json_like = |t: &str| {
        let t = t.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        matches!(t.as_str(), "json" | "application/json" | "application/fhir+json" | "application/json+fhir" | "*/*" | "application/*" | "")
    };
    if let Some((_, format)) = pairs.iter().find(|(k, _)| k == "_format")
        && !json_like(format)
    {
        return Err(ApiError::NotAcceptable(format!("_format '{format}' is not supported; this server speaks application/fhir+json")));
    }
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())
        && !accept.split(',').any(json_like)
    {
        return Err(ApiError::NotAcceptable("Accept names no JSON type; this server speaks application/fhir+json".into()));
    }
    Ok(())
}

/// Reads a FHIR JSON resource from a request body, enforcing content type, size and JSON rules.
pub async fn read_resource(headers: &HeaderMap, body: Body, limit: usize) -> Result<Json, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if !matches!(essence.as_str(), "application/fhir+json" | "application/json" | "application/json+fhir") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{content_type}' is not supported; send application/fhir+json"
        )));
    }
    let bytes = read_bytes(headers, body, limit).await?;
    parse_resource(&bytes)
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
pub fn object(members: &[(&str, Json)]) -> Json {
    let mut o = json::Object::new();
    for (k, v) in members {
        o.insert(*k, v.clone());
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
    object(&members)
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
        b.entry(Some("http://x/Patient/1"), Some("{\"resourceType\":\"Patient\",\"id\":\"1\"}"), &[("search", object(&[("mode", Json::string("match"))]))]);
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
