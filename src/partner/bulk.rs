//! A FHIR Bulk Data Access (STU 3) export client: kick-off, status polls with backoff, and downloads that resume, against any server that speaks SMART Backend Services.
//!
//! What survives an interruption lives in the output folder: `export.json` names the kick-off and
//! its status URL (and the manifest once there is one), a file being downloaded is `NAME.part` until
//! its last byte arrived and its line count matched the manifest. Run the same export into the same
//! folder again and it polls the same job and fetches only what is missing, asking with `Range` for
//! the rest of a partial file where the server allows it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use super::{Delivery, FhirClient, retry_after};

/// The name of the file in the output folder that lets an interrupted export resume.
pub const STATE_FILE: &str = "export.json";

/// Where the export is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// `[base]/$export`: everything the client may read.
    System,
    /// `[base]/Patient/$export`: every patient's compartment.
    Patient,
    /// `[base]/Group/[id]/$export`: the compartments of the group's members.
    Group(String),
}

/// What to export: the kick-off's level and parameters.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub level: Option<Level>,
    pub types: Vec<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub type_filters: Vec<String>,
}

impl Request {
    /// The kick-off's path and query under the FHIR base.
    pub fn path_and_query(&self) -> String {
        let path = match self.level.as_ref().unwrap_or(&Level::System) {
            Level::System => "$export".to_string(),
            Level::Patient => "Patient/$export".to_string(),
            Level::Group(id) => format!("Group/{id}/$export"),
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        if !self.types.is_empty() {
            query.append_pair("_type", &self.types.join(","));
        }
        if let Some(since) = &self.since {
            query.append_pair("_since", since);
        }
        if let Some(until) = &self.until {
            query.append_pair("_until", until);
        }
        for filter in &self.type_filters {
            query.append_pair("_typeFilter", filter);
        }
        let query = query.finish();
        if query.is_empty() { path } else { format!("{path}?{query}") }
    }
}

/// What the export client reports while it works, for a progress display.
#[derive(Debug)]
pub enum Event<'a> {
    /// The server accepted the kick-off; the job is polled at `status_url`.
    KickedOff { status_url: &'a str },
    /// An earlier run's job is polled again.
    Resumed { status_url: &'a str },
    /// The job is still running; the next poll is in `next`.
    Waiting { progress: Option<&'a str>, next: Duration },
    /// The manifest arrived: this many files to fetch.
    Manifest { files: usize },
    /// Bytes of a file arrived (totals for the file so far).
    Downloading { file: &'a str, resources: u64, bytes: u64 },
    /// A file is complete on disk (`resumed`: it was there from an earlier run).
    Downloaded { file: &'a str, resources: u64, bytes: u64, resumed: bool },
}

/// Which list of the manifest a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Output,
    Deleted,
    Error,
}

/// One file of the export, complete on disk.
#[derive(Clone, Debug)]
pub struct File {
    pub kind: FileKind,
    pub resource_type: String,
    pub path: PathBuf,
    pub resources: u64,
    pub bytes: u64,
}

/// A finished export: the server's manifest and the files on disk.
#[derive(Debug)]
pub struct Export {
    pub manifest: Value,
    pub files: Vec<File>,
}

/// Why an export could not be finished. The output folder keeps what arrived, so running again resumes.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// The server refused the kick-off or a download (its OperationOutcome, summarised).
    #[error("{what}: the server answered {status}: {message}")]
    Refused { what: String, status: u16, message: String },
    /// The export job failed on the server.
    #[error("the export failed on the server ({status}): {message}")]
    Failed { status: u16, message: String },
    /// The job is gone (deleted or expired); the state was cleared, so running again starts a new one.
    #[error("the export job at {status_url} is gone ({status}); run again to start a new export")]
    Gone { status_url: String, status: u16 },
    /// The server could not be reached, or kept saying "later", too many times in a row.
    #[error("{what}: {message}")]
    Unavailable { what: String, message: String },
    /// What arrived does not match what the manifest promised.
    #[error("{file}: {message}")]
    Mismatch { file: String, message: String },
    /// The output folder holds another export, or cannot be written.
    #[error("{0}")]
    Folder(String),
}

/// How often in a row a poll or a download may find the server unreachable before giving up.
const MAX_FAILURES: u32 = 8;
/// The longest wait between two polls when the server does not say.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The longest wait the server's `Retry-After` is believed for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Runs one export into `out`: kicks it off (or resumes the one `out` holds), polls until the manifest
/// is there, and downloads every file the manifest lists.
pub async fn export(client: &FhirClient, request: &Request, out: &Path, on: &mut dyn FnMut(Event)) -> Result<Export, BulkError> {
    std::fs::create_dir_all(out).map_err(|e| BulkError::Folder(format!("cannot create {}: {e}", out.display())))?;
    let kick_off = format!("{}/{}", client.fhir_base(), request.path_and_query());
    let mut state = State::load(out)?;
    match &state {
        Some(state) if state.request != kick_off => {
            return Err(BulkError::Folder(format!(
                "{} holds another export ({}); choose another output folder or delete {STATE_FILE} there",
                out.display(),
                state.request
            )));
        }
        Some(state) => on(Event::Resumed { status_url: &state.status_url }),
        None => {
            let status_url = start(client, &kick_off).await?;
            let fresh = State { request: kick_off.clone(), status_url, manifest: None };
            fresh.save(out)?;
            on(Event::KickedOff { status_url: &fresh.status_url });
            state = Some(fresh);
        }
    }
    let mut state = state.expect("set above");
    let manifest = match state.manifest.clone() {
        Some(manifest) => manifest,
        None => {
            let manifest = match poll(client, &state.status_url, on).await {
                Err(BulkError::Gone { status_url, status }) => {
                    let _ = std::fs::remove_file(out.join(STATE_FILE));
                    return Err(BulkError::Gone { status_url, status });
                }
                other => other?,
            };
            state.manifest = Some(manifest.clone());
            state.save(out)?;
            manifest
        }
    };
    let entries = entries(&manifest)?;
    on(Event::Manifest { files: entries.len() });
    let authorize = manifest["requiresAccessToken"].as_bool().unwrap_or(true);
    let mut files = Vec::with_capacity(entries.len());
    for entry in entries {
        files.push(download(client, &entry, out, authorize, on).await?);
    }
    Ok(Export { manifest, files })
}

/// What an interrupted export needs to resume, kept as `export.json` in the output folder.
struct State {
    request: String,
    status_url: String,
    manifest: Option<Value>,
}

impl State {
    fn load(out: &Path) -> Result<Option<State>, BulkError> {
        let path = out.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BulkError::Folder(format!("cannot read {}: {e}", path.display()))),
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| BulkError::Folder(format!("{} is not an export state ({e}); delete it to start anew", path.display())))?;
        match (value["request"].as_str(), value["status"].as_str()) {
            (Some(request), Some(status_url)) => Ok(Some(State {
                request: request.to_string(),
                status_url: status_url.to_string(),
                manifest: value.get("manifest").filter(|m| m.is_object()).cloned(),
            })),
            _ => Err(BulkError::Folder(format!("{} names no request and status URL; delete it to start anew", path.display()))),
        }
    }

    /// Written whole to a temporary name and renamed, so a crash leaves the old state or the new one.
    fn save(&self, out: &Path) -> Result<(), BulkError> {
        let value = json!({ "request": self.request, "status": self.status_url, "manifest": self.manifest });
        let temporary = out.join(format!("{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::write(&temporary, serde_json::to_vec_pretty(&value)?)?;
            std::fs::rename(&temporary, out.join(STATE_FILE))
        };
        write().map_err(|e| BulkError::Folder(format!("cannot write {}: {e}", out.join(STATE_FILE).display())))
    }
}

/// The kick-off: `202 Accepted` with the job's status URL in `Content-Location`. A server that is busy
/// (429, 503, or 5xx with a transient issue) is asked again after its `Retry-After`.
async fn start(client: &FhirClient, url: &str) -> Result<String, BulkError> {
    let mut headers = HeaderMap::new();
    headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/fhir+json"));
    headers.insert("prefer", HeaderValue::from_static("respond-async"));
    let mut backoff = Backoff::default();
    loop {
        let response = match client.request(reqwest::Method::GET, url, headers.clone(), None, true).await {
            Ok(response) => response,
            Err(delivery) => {
                backoff.failed("the kick-off", &delivery).await?;
                continue;
            }
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers(), MAX_RETRY_AFTER);
        if status == 202 {
            let location = response.headers().get(reqwest::header::CONTENT_LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            return location.ok_or_else(|| BulkError::Refused { what: "the kick-off".into(), status, message: "no Content-Location header names the status URL".into() });
        }
        let body = response.text().await.unwrap_or_default();
        if is_transient(status, &body) {
            backoff.wait("the kick-off", status, after).await?;
            continue;
        }
        return Err(BulkError::Refused { what: "the kick-off".into(), status, message: summarize(&body) });
    }
}

/// Polls the status URL until the manifest arrives, honouring `Retry-After` and backing off exponentially without it.
async fn poll(client: &FhirClient, status_url: &str, on: &mut dyn FnMut(Event)) -> Result<Value, BulkError> {
    let mut headers = HeaderMap::new();
    headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/json"));
    let mut backoff = Backoff::default();
    let mut pause = Duration::from_secs(1);
    loop {
        let response = match client.request(reqwest::Method::GET, status_url, headers.clone(), None, true).await {
            Ok(response) => response,
            Err(delivery) => {
                backoff.failed("the status request", &delivery).await?;
                continue;
            }
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers(), MAX_RETRY_AFTER);
        let progress = response.headers().get("x-progress").and_then(|v| v.to_str().ok()).map(|p| p.chars().take(100).collect::<String>());
        let body = response.text().await.unwrap_or_default();
        match status {
            200 => {
                let manifest: Value = serde_json::from_str(&body).map_err(|e| BulkError::Refused { what: "the status request".into(), status, message: format!("the manifest is not JSON: {e}") })?;
                return Ok(manifest);
            }
            202 => {
                backoff.reset();
                let next = after.unwrap_or(pause);
                on(Event::Waiting { progress: progress.as_deref(), next });
                tokio::time::sleep(next).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            404 | 410 => return Err(BulkError::Gone { status_url: status_url.to_string(), status }),
            _ if is_transient(status, &body) => backoff.wait("the status request", status, after).await?,
            _ => return Err(BulkError::Failed { status, message: summarize(&body) }),
        }
    }
}

/// One file the manifest lists, and where it goes on disk.
struct Entry {
    kind: FileKind,
    resource_type: String,
    url: String,
    count: Option<u64>,
    name: String,
}

/// The manifest's `output`, `deleted` and `error` files, each with a local name (`Type.NNN.ndjson`,
/// `deleted.Type.NNN.ndjson`, `error.NNN.ndjson`) numbered in manifest order per type.
fn entries(manifest: &Value) -> Result<Vec<Entry>, BulkError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (list, kind, prefix) in [("output", FileKind::Output, ""), ("deleted", FileKind::Deleted, "deleted."), ("error", FileKind::Error, "error.")] {
        let Some(items) = manifest.get(list).and_then(Value::as_array) else { continue };
        for (i, item) in items.iter().enumerate() {
            let bad = |message: &str| BulkError::Mismatch { file: format!("manifest {list}[{i}]"), message: message.to_string() };
            let url = item["url"].as_str().ok_or_else(|| bad("no url"))?.to_string();
            let resource_type = item["type"].as_str().ok_or_else(|| bad("no type"))?.to_string();
            if !resource_type.chars().all(|c| c.is_ascii_alphanumeric()) || resource_type.is_empty() {
                return Err(bad("the type is not a FHIR resource type"));
            }
            let n = entries.iter().filter(|e| e.kind == kind && e.resource_type == resource_type).count() + 1;
            let name = match kind {
                FileKind::Error => format!("{prefix}{:03}.ndjson", entries.iter().filter(|e| e.kind == kind).count() + 1),
                _ => format!("{prefix}{resource_type}.{n:03}.ndjson"),
            };
            entries.push(Entry { kind, resource_type, url, count: item["count"].as_u64(), name });
        }
    }
    Ok(entries)
}

/// Downloads one file to `NAME.part` and renames it when complete; a `.part` left by an earlier run is
/// continued with `Range` (or fetched again when the server sends the whole file). gzip is decoded on the way.
async fn download(client: &FhirClient, entry: &Entry, out: &Path, authorize: bool, on: &mut dyn FnMut(Event)) -> Result<File, BulkError> {
    let path = out.join(&entry.name);
    let partial = out.join(format!("{}.part", entry.name));
    let io = |e: std::io::Error| BulkError::Folder(format!("{}: {e}", partial.display()));
    if let Ok(meta) = std::fs::metadata(&path) {
        let resources = count_lines(&path).map_err(|e| BulkError::Folder(format!("{}: {e}", path.display())))?;
        on(Event::Downloaded { file: &entry.name, resources, bytes: meta.len(), resumed: true });
        return Ok(File { kind: entry.kind, resource_type: entry.resource_type.clone(), path, resources, bytes: meta.len() });
    }
    let mut backoff = Backoff::default();
    loop {
        let mut sink = Sink::open(&partial).map_err(io)?;
        let mut headers = HeaderMap::new();
        headers.insert(reqwest::header::ACCEPT, HeaderValue::from_static("application/fhir+ndjson"));
        if sink.bytes > 0 {
            // A range of a compressed representation cannot be appended to the decoded text: ask for it plain.
            headers.insert(reqwest::header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            headers.insert(reqwest::header::RANGE, HeaderValue::from_str(&format!("bytes={}-", sink.bytes)).expect("digits"));
        } else {
            headers.insert(reqwest::header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let response = match client.request(reqwest::Method::GET, &entry.url, headers, None, authorize).await {
            Ok(response) => response,
            Err(delivery) => {
                backoff.failed(&entry.name, &delivery).await?;
                continue;
            }
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers(), MAX_RETRY_AFTER);
        let gzip = response.headers().get(reqwest::header::CONTENT_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        match status {
            206 if !gzip && sink.bytes > 0 => {}
            200 => sink.restart().map_err(io)?,
            416 if sink.bytes > 0 => {
                // The server has nothing past what we hold: the file is complete.
                return finish(entry, sink, &partial, &path, on).map_err(|e| e.with_file(&entry.name));
            }
            _ => {
                let body = response.text().await.unwrap_or_default();
                if is_transient(status, &body) {
                    backoff.wait(&entry.name, status, after).await?;
                    continue;
                }
                return Err(BulkError::Refused { what: format!("downloading {}", entry.url), status, message: summarize(&body) });
            }
        }
        match receive(response, &mut sink, gzip, &entry.name, on).await {
            Ok(()) => return finish(entry, sink, &partial, &path, on).map_err(|e| e.with_file(&entry.name)),
            Err(Received::Io(e)) => return Err(io(e)),
            Err(Received::Broken(message)) => {
                // A gzip stream cannot be continued mid-way: start that file again.
                if gzip {
                    sink.restart().map_err(io)?;
                }
                backoff.failed(&entry.name, &Delivery::Retry { status: 0, error: message, after: None }).await?;
            }
        }
    }
}

enum Received {
    Io(std::io::Error),
    Broken(String),
}

/// Streams a response body into the sink, a chunk at a time (memory stays flat whatever the file's size).
async fn receive(mut response: reqwest::Response, sink: &mut Sink, gzip: bool, name: &str, on: &mut dyn FnMut(Event<'_>)) -> Result<(), Received> {
    let mut decoder = gzip.then(|| flate2::write::GzDecoder::new(Vec::new()));
    let mut reported = sink.bytes;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(Received::Broken(format!("the download broke off: {e}"))),
        };
        match decoder.as_mut() {
            Some(decoder) => {
                decoder.write_all(&chunk).map_err(|e| Received::Broken(format!("the gzip stream is corrupt: {e}")))?;
                let plain = std::mem::take(decoder.get_mut());
                sink.write(&plain).map_err(Received::Io)?;
            }
            None => sink.write(&chunk).map_err(Received::Io)?,
        }
        if sink.bytes - reported >= 1 << 20 {
            reported = sink.bytes;
            on(Event::Downloading { file: name, resources: sink.lines(), bytes: sink.bytes });
        }
    }
    if let Some(decoder) = decoder {
        let plain = decoder.finish().map_err(|e| Received::Broken(format!("the gzip stream is truncated: {e}")))?;
        sink.write(&plain).map_err(Received::Io)?;
    }
    Ok(())
}

impl BulkError {
    fn with_file(self, name: &str) -> BulkError {
        match self {
            BulkError::Folder(message) => BulkError::Folder(format!("{name}: {message}")),
            other => other,
        }
    }
}

/// Checks the line count against the manifest, makes the file durable and gives it its final name.
fn finish(entry: &Entry, sink: Sink, partial: &Path, path: &Path, on: &mut dyn FnMut(Event)) -> Result<File, BulkError> {
    let resources = sink.lines();
    let bytes = sink.bytes;
    sink.file.sync_all().map_err(|e| BulkError::Folder(e.to_string()))?;
    if let Some(count) = entry.count
        && count != resources
    {
        // Keep nothing that contradicts the manifest: the next run fetches the file again.
        let _ = std::fs::remove_file(partial);
        return Err(BulkError::Mismatch { file: entry.name.clone(), message: format!("the manifest says {count} resources, the file holds {resources}") });
    }
    std::fs::rename(partial, path).map_err(|e| BulkError::Folder(e.to_string()))?;
    on(Event::Downloaded { file: &entry.name, resources, bytes, resumed: false });
    Ok(File { kind: entry.kind, resource_type: entry.resource_type.clone(), path: path.to_path_buf(), resources, bytes })
}

/// A `.part` file being written: its length, its complete lines, and whether the last line is unfinished.
struct Sink {
    file: std::fs::File,
    bytes: u64,
    newlines: u64,
    /// The last byte written was not a newline (a last line without one still counts as a resource).
    open_line: bool,
}

impl Sink {
    /// Opens `path` for appending; an unfinished last line from an interrupted run is cut off, so what
    /// is kept ends at a line boundary and `Range` continues from there.
    fn open(path: &Path) -> std::io::Result<Sink> {
        let file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let length = file.metadata()?.len();
        let complete = if length == 0 { 0 } else { last_line_end(path)? };
        if complete != length {
            file.set_len(complete)?;
        }
        let newlines = if complete == 0 { 0 } else { count_newlines(path)? };
        Ok(Sink { file, bytes: complete, newlines, open_line: false })
    }

    fn restart(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.bytes = 0;
        self.newlines = 0;
        self.open_line = false;
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.file.write_all(data)?;
        self.bytes += data.len() as u64;
        self.newlines += memchr::memchr_iter(b'\n', data).count() as u64;
        self.open_line = data.last() != Some(&b'\n');
        Ok(())
    }

    fn lines(&self) -> u64 {
        self.newlines + u64::from(self.open_line)
    }
}

/// The length of `path` up to and including its last newline.
fn last_line_end(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let mut end = file.metadata()?.len();
    let mut buffer = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buffer.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buffer[..n])?;
        if let Some(i) = memchr::memrchr(b'\n', &buffer[..n]) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn count_newlines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut newlines = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(newlines);
        }
        newlines += memchr::memchr_iter(b'\n', &buffer[..n]).count() as u64;
    }
}

/// The resources in an NDJSON file: its non-empty lines.
pub fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    for line in reader.split(b'\n') {
        if !line?.iter().all(u8::is_ascii_whitespace) {
            n += 1;
        }
    }
    Ok(n)
}

/// Consecutive failures of one step, and the pause before the next try.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn reset(&mut self) {
        self.failures = 0;
    }

    /// No answer (or no token): waits and lets the caller try again, up to `MAX_FAILURES` in a row.
    async fn failed(&mut self, what: &str, delivery: &Delivery) -> Result<(), BulkError> {
        let message = match delivery {
            Delivery::Retry { error, .. } => error.clone(),
            Delivery::Refused { status, body } => format!("{status}: {}", summarize(body)),
            Delivery::Accepted { status, .. } => format!("unexpected {status}"),
        };
        self.failures += 1;
        if self.failures >= MAX_FAILURES {
            return Err(BulkError::Unavailable { what: what.to_string(), message });
        }
        tokio::time::sleep(self.pause()).await;
        Ok(())
    }

    /// The server said "later" (429, 503, a transient issue): waits `Retry-After` or the backoff.
    async fn wait(&mut self, what: &str, status: u16, after: Option<Duration>) -> Result<(), BulkError> {
        self.failures += 1;
        if self.failures >= MAX_FAILURES * 4 {
            return Err(BulkError::Unavailable { what: what.to_string(), message: format!("the server kept answering {status}") });
        }
        tokio::time::sleep(after.unwrap_or_else(|| self.pause())).await;
        Ok(())
    }

    fn pause(&self) -> Duration {
        (Duration::from_millis(250) * 2u32.saturating_pow(self.failures.saturating_sub(1))).min(MAX_BACKOFF)
    }
}

/// 429 and 503 are "later"; so is a 5xx whose OperationOutcome says `transient`, as the IG asks servers to.
fn is_transient(status: u16, body: &str) -> bool {
    match status {
        429 | 503 => true,
        500..=599 => serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|outcome| outcome["issue"].as_array().cloned())
            .is_some_and(|issues| !issues.is_empty() && issues.iter().all(|issue| issue["code"] == "transient")),
        _ => false,
    }
}

/// An error body in one line: an OperationOutcome's issues (severity, code, where, what), else the text itself.
pub fn summarize(body: &str) -> String {
    let issues = serde_json::from_str::<Value>(body).ok().and_then(|v| (v["resourceType"] == "OperationOutcome").then(|| v["issue"].as_array().cloned()).flatten());
    match issues {
        Some(issues) if !issues.is_empty() => issues
            .iter()
            .map(|issue| {
                let text = issue["diagnostics"].as_str().or(issue["details"]["text"].as_str()).unwrap_or("(no text)");
                let at = issue["expression"][0].as_str().map(|e| format!(" at {e}")).unwrap_or_default();
                format!("{} {}{at}: {text}", issue["severity"].as_str().unwrap_or("error"), issue["code"].as_str().unwrap_or("unknown"))
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => {
            let text: String = body.chars().take(300).collect();
            if text.trim().is_empty() { "(no body)".into() } else { text }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_off_carries_level_and_parameters() {
        let request = Request {
            level: Some(Level::Group("iop-all-clients".into())),
            types: vec!["Patient".into(), "Observation".into()],
            since: Some("2026-01-01T00:00:00Z".into()),
            type_filters: vec!["Observation?code=44249-1".into()],
            ..Request::default()
        };
        assert_eq!(request.path_and_query(), "Group/iop-all-clients/$export?_type=Patient%2CObservation&_since=2026-01-01T00%3A00%3A00Z&_typeFilter=Observation%3Fcode%3D44249-1");
        assert_eq!(Request::default().path_and_query(), "$export");
        assert_eq!(Request { level: Some(Level::Patient), ..Request::default() }.path_and_query(), "Patient/$export");
    }

    #[test]
    fn files_are_named_by_list_type_and_order() {
        let manifest = json!({
            "output": [
                { "type": "Patient", "url": "u1", "count": 2 },
                { "type": "Observation", "url": "u2" },
                { "type": "Observation", "url": "u3" }
            ],
            "error": [{ "type": "OperationOutcome", "url": "u4" }],
            "deleted": [{ "type": "Bundle", "url": "u5" }]
        });
        let names: Vec<String> = entries(&manifest).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["Patient.001.ndjson", "Observation.001.ndjson", "Observation.002.ndjson", "deleted.Bundle.001.ndjson", "error.001.ndjson"]);
        let hostile = json!({ "output": [{ "type": "../../etc", "url": "u" }] });
        assert!(matches!(entries(&hostile), Err(BulkError::Mismatch { .. })));
    }

    #[test]
    fn a_partial_file_is_cut_back_to_its_last_complete_line() {
        let dir = std::env::temp_dir().join(format!("iop-bulk-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("Patient.001.ndjson.part");
        std::fs::write(&path, b"{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let mut sink = Sink::open(&path).unwrap();
        assert_eq!((sink.bytes, sink.lines()), (16, 2));
        sink.write(b"{\"c\":3}").unwrap();
        assert_eq!(sink.lines(), 3);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}\n{\"b\":2}\n{\"c\":3}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn transient_answers_are_told_from_failures() {
        assert!(is_transient(429, ""));
        assert!(is_transient(503, ""));
        assert!(is_transient(500, r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}"#));
        assert!(!is_transient(500, r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}"#));
        assert!(!is_transient(400, ""));
    }

    #[test]
    fn outcomes_are_summarised_with_their_location() {
        let body = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-supported","expression":["_type"],"diagnostics":"Foo is not a type"}]}"#;
        assert_eq!(summarize(body), "error not-supported at _type: Foo is not a type");
        assert_eq!(summarize(""), "(no body)");
    }
}
