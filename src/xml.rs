//! Reads FHIR R4 XML into the same [`Json`] tree a FHIR JSON document of the resource would give, with located issues; and writes that tree back as FHIR XML ([`write_resource`]).
//!
//! Hospitals and HL7's own test material still use XML, while everything downstream (validation,
//! FHIRPath, mapping) works on the JSON tree. Converting at the edge keeps one code path: a
//! resource read from XML is the JSON resource a FHIR JSON serializer would have written, and
//! the validator then reports the same problems, at the same paths, whatever the wire format.
//!
//! # API
//! [`parse_resource`] (or [`parse_resource_with`] for [`XmlOptions`]) returns either
//! - `Err(`[`XmlError`]`)`: the bytes are not usable as a FHIR XML document at all: not
//!   well-formed, not UTF-8, a DOCTYPE (refused outright, so no entity is ever declared, let alone
//!   resolved: no XXE, no entity expansion), nesting deeper than [`MAX_DEPTH`], or a root element
//!   outside the FHIR namespace. One fatal problem with line and column
//!   ([`XmlError::to_issue`] makes it an [`Issue`]);
//! - `Ok((json, issues))`: the resource as JSON plus the [`Issue`]s that only the XML form can
//!   have, each with a FHIRPath-style expression (`Patient.name[1].given[0]`) and a position.
//!
//! # Mapping ([XML](https://hl7.org/fhir/R4/xml.html) → [JSON](https://hl7.org/fhir/R4/json.html))
//! - The root element, and the single child element of an element whose type is a resource
//!   (`contained`, `Bundle.entry.resource`, `Parameters.parameter.resource`), becomes an object
//!   whose first member is `"resourceType"`.
//! - Repeating elements (per the [`TypeModel`]) become arrays, even with one occurrence.
//! - Primitives: the `value` attribute becomes a JSON boolean for `boolean`, a number (text kept as
//!   written) for `integer`/`decimal`/`positiveInt`/`unsignedInt`, a string otherwise. An `id`
//!   attribute and `extension` children go to the `_name` sibling; for repeating primitives both
//!   arrays are aligned with `null` placeholders.
//! - `id` attributes on datatypes and backbone elements, and `url` on extensions, become members.
//! - Choice elements keep their XML name (`valueQuantity`), typed by the suffix.
//! - `Narrative.div` becomes the serialized XHTML string with `xmlns="http://www.w3.org/1999/xhtml"`
//!   on the `div`, prefixes removed, text and whitespace kept, comments dropped.
//! - Attribute values are normalized as XML requires (a literal newline reads as a space; `&#10;`
//!   stays a newline); line ends in text become `\n`.
//!
//! # Expressions
//! As the validator writes them: JSON member names from the root resource type
//! (`Observation.valueQuantity`), an index exactly when the element repeats, an extension of a
//! primitive under the primitive (`Patient.name[0].given[1].extension[0]`), and a nested
//! resource continuing its container's path (`Bundle.entry[2].resource.name[0]`). An index counts
//! the element's occurrences in the XML.
//!
//! # Who reports what
//! Problems the JSON tree can still show are carried for the validator, which reports them once
//! and the same way for both formats:
//! - an element in the FHIR namespace that the model does not declare is carried untyped (its
//!   `value` attribute or text as a string, otherwise an object of its attributes and children),
//!   and so is the content of a root or contained element whose name is not a resource type;
//! - two different names for one choice element (`valueString` and `valueQuantity`), empty
//!   complex elements, bad lexical forms of string-typed primitives, XHTML content rules.
//!
//! Reported here, because JSON cannot show them:
//! - text content in FHIR elements; attributes other than `value`/`id`/`url` where allowed;
//!   `id`, `url` or `value` written as child elements (dropped);
//! - elements out of definition order (needs [`TypeModel::element_order`]; without it the check
//!   is skipped) and a non-repeating element given more than once (the first is kept);
//! - a `value` that is not a valid boolean or JSON number (dropped, `id`/extensions kept), and a
//!   primitive with neither value nor children (dropped);
//! - elements in other namespaces, a choice element without its type suffix, elements named
//!   `resourceType` or starting with `_`, a resource wrapper holding no resource or several:
//!   all dropped.
//!
//! `xsi:schemaLocation` on a resource is reported as an undefined attribute, as the HL7
//! validator does, unless [`XmlOptions::allow_xsi_schema_location`] is set.

mod convert;
mod dom;
mod write;
mod xhtml;

#[cfg(test)]
mod tests;

pub use write::write_resource;

use crate::fhirpath::TypeModel;
use crate::json::{Json, ParseError};
use crate::outcome::{Issue, IssueCode, Severity};

/// The namespace every FHIR element must be in.
pub const FHIR_NS: &str = "http://hl7.org/fhir";
/// The namespace of `Narrative.div` and its content.
pub const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";
/// The namespace of `xsi:schemaLocation`, found on many published examples.
pub const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// How deep elements may nest before the document is refused.
///
/// Real resources stay far below this, even nested Questionnaires with narrative; the limit keeps a
/// hostile document from exhausting the stack, and keeps the converted JSON within
/// [`crate::json::MAX_DEPTH`] (each XML level adds at most an object and an array).
pub const MAX_DEPTH: usize = crate::json::MAX_DEPTH / 2;

/// Choices that change what counts as a problem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XmlOptions {
    /// Accept `xsi:schemaLocation` on resource elements. Off by default, as in the HL7 validator,
    /// which reports it as an undefined attribute; published examples often carry it.
    pub allow_xsi_schema_location: bool,
}

/// Why the bytes could not be read as a FHIR XML resource at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line}, column {column}")]
pub struct XmlError {
    /// `Structure` for XML that is not well-formed or not FHIR, `TooLong` for excessive nesting.
    pub code: IssueCode,
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl XmlError {
    /// The error as the single fatal issue of a report.
    pub fn to_issue(&self) -> Issue {
        Issue::new(Severity::Fatal, self.code, "", self.message.clone()).with_position(self.line, self.column)
    }
}

/// Lets callers treat a fatal XML problem like a fatal JSON one.
impl From<XmlError> for ParseError {
    fn from(error: XmlError) -> ParseError {
        ParseError { message: error.message, line: error.line, column: error.column, path: String::new() }
    }
}

/// Reads a FHIR XML resource with default [`XmlOptions`].
pub fn parse_resource(bytes: &[u8], model: &dyn TypeModel) -> Result<(Json, Vec<Issue>), XmlError> {
    parse_resource_with(bytes, model, &XmlOptions::default())
}

/// Reads a FHIR XML resource into its FHIR JSON form and the XML-only issues found on the way.
pub fn parse_resource_with(bytes: &[u8], model: &dyn TypeModel, options: &XmlOptions) -> Result<(Json, Vec<Issue>), XmlError> {
    let document = dom::Document::parse(bytes)?;
    let root = &document.root;
    if root.ns.as_deref() != Some(FHIR_NS) {
        let namespace = root.ns.as_deref().unwrap_or("");
        return Err(document.error_at(
            root.pos,
            format!("this does not appear to be a FHIR resource: the root element '{}' is in the namespace '{namespace}', not '{FHIR_NS}'", root.qname()),
        ));
    }
    let mut converter = convert::Converter::new(model, options, &document);
    let json = converter.root(root);
    Ok((json, converter.into_issues()))
}
