//! Issues and OperationOutcome: the one shape in which every problem is reported to a partner ([spec](https://hl7.org/fhir/R4/operationoutcome.html)).

use std::fmt;

use crate::json::{Json, Object};

/// `OperationOutcome.issue.severity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }

    /// Whether an issue of this severity makes the resource invalid.
    pub fn is_error(self) -> bool {
        matches!(self, Severity::Fatal | Severity::Error)
    }
}

/// `OperationOutcome.issue.code` values used by the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IssueCode {
    /// Not well-formed JSON/XML, wrong JSON type.
    Structure,
    /// A required element is missing or appears too often.
    Required,
    /// A value does not fit its type or rules.
    Value,
    /// An invariant failed.
    Invariant,
    /// An element is not allowed here.
    Invalid,
    /// A code is not valid for its binding or code system.
    CodeInvalid,
    /// Something the validator could not check (missing definitions).
    NotSupported,
    /// A referenced resource or definition was not found.
    NotFound,
    /// Size or depth limits exceeded.
    TooLong,
    Informational,
    Processing,
    Security,
    Forbidden,
    Login,
    Conflict,
    Duplicate,
    Exception,
    Timeout,
    Throttled,
    BusinessRule,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Invalid => "invalid",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::NotSupported => "not-supported",
            IssueCode::NotFound => "not-found",
            IssueCode::TooLong => "too-long",
            IssueCode::Informational => "informational",
            IssueCode::Processing => "processing",
            IssueCode::Security => "security",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Login => "login",
            IssueCode::Conflict => "conflict",
            IssueCode::Duplicate => "duplicate",
            IssueCode::Exception => "exception",
            IssueCode::Timeout => "timeout",
            IssueCode::Throttled => "throttled",
            IssueCode::BusinessRule => "business-rule",
        }
    }
}

/// One finding, located by a FHIRPath expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    pub message: String,
    /// Where, e.g. `Bundle.entry[3].resource.status`; empty when the problem concerns the whole input.
    pub expression: String,
    /// `line:column` in the source document, when known.
    pub position: Option<(usize, usize)>,
}

impl Issue {
    pub fn new(severity: Severity, code: IssueCode, expression: impl Into<String>, message: impl Into<String>) -> Self {
        Self { severity, code, message: message.into(), expression: expression.into(), position: None }
    }

    pub fn error(code: IssueCode, expression: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, expression, message)
    }

    pub fn warning(code: IssueCode, expression: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, expression, message)
    }

    pub fn information(code: IssueCode, expression: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Severity::Information, code, expression, message)
    }

    pub fn with_position(mut self, line: usize, column: usize) -> Self {
        self.position = Some((line, column));
        self
    }

    /// This issue as an `OperationOutcome.issue` element.
    pub fn to_json(&self) -> Json {
        let mut issue = Object::new();
        issue.insert("severity", Json::string(self.severity.as_str()));
        issue.insert("code", Json::string(self.code.as_str()));
        let mut details = Object::new();
        details.insert("text", Json::string(self.message.as_str()));
        issue.insert("details", Json::Object(details));
        if let Some((line, column)) = self.position {
            issue.insert("diagnostics", Json::string(format!("line {line}, column {column}")));
        }
        if !self.expression.is_empty() {
            issue.insert("expression", Json::Array(vec![Json::string(self.expression.as_str())]));
        }
        Json::Object(issue)
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let location = if self.expression.is_empty() { "(document)" } else { &self.expression };
        write!(f, "{:<11} {location}: {}", self.severity.as_str(), self.message)?;
        if let Some((line, column)) = self.position {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

/// Builds an OperationOutcome resource from issues; an empty list gives the conventional single "All OK" information issue.
pub fn operation_outcome(issues: &[Issue]) -> Json {
    let mut outcome = Object::new();
    outcome.insert("resourceType", Json::string("OperationOutcome"));
    let issues: Vec<Json> = if issues.is_empty() {
        vec![Issue::information(IssueCode::Informational, "", "All OK").to_json()]
    } else {
        issues.iter().map(Issue::to_json).collect()
    };
    outcome.insert("issue", Json::Array(issues));
    Json::Object(outcome)
}
