//! Writes the JSON tree of a FHIR resource as FHIR R4 XML, in definition order, driven by the type model the reader uses.
//!
//! The reverse of [`super::convert`] ([XML](https://hl7.org/fhir/R4/xml.html) rules): members in
//! the order of the type's definition (JSON order means nothing, XML order is part of the format);
//! primitives as `value` attributes with their `_name` sibling's `id` and extensions merged into
//! the element; `id` (and `url` on extensions) as attributes of datatypes and backbone elements;
//! nested resources inside their element (`<contained><Patient>…`); choices under their JSON name
//! (`valueQuantity`); numbers exactly as written; the narrative `div` in the XHTML namespace.
//! Members the model does not know are written last, by their JSON form alone, so nothing is lost.

use std::rc::Rc;

use super::convert::{Known, Lookups, Primitive, Resolution, SYSTEM_PREFIX, Shape};
use super::xhtml::{escape_attribute, escape_text};
use super::{FHIR_NS, XHTML_NS};
use crate::fhirpath::TypeModel;
use crate::json::{Json, Object};

/// The resource as an XML document; `None` when the value is not a resource (an object with a `resourceType`).
pub fn write_resource(resource: &Json, model: &dyn TypeModel) -> Option<String> {
    let object = resource.as_object()?;
    let resource_type = object.get("resourceType").and_then(Json::as_str)?;
    if !is_name(resource_type) {
        return None;
    }
    let mut writer = Writer { out: String::with_capacity(4096), lookups: Lookups::new(model) };
    writer.out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    writer.resource(object, resource_type, true);
    Some(writer.out)
}

struct Writer<'a> {
    out: String,
    lookups: Lookups<'a>,
}

/// One member to write: its value and its `_name` sibling, either of which may be missing.
struct Member<'j> {
    name: &'j str,
    known: Option<Rc<Known>>,
    value: Option<&'j Json>,
    extra: Option<&'j Json>,
    rank: usize,
}

impl Writer<'_> {
    fn resource(&mut self, object: &Object, resource_type: &str, root: bool) {
        self.out.push('<');
        self.out.push_str(resource_type);
        if root {
            self.out.push_str(" xmlns=\"");
            self.out.push_str(FHIR_NS);
            self.out.push('"');
        }
        self.out.push('>');
        self.members(object, resource_type, Shape::Resource);
        self.out.push_str("</");
        self.out.push_str(resource_type);
        self.out.push('>');
    }

    /// Writes the members of `object` (of type `ty`) as child elements, in definition order;
    /// those the shape writes as attributes are left to the caller.
    fn members(&mut self, object: &Object, ty: &str, shape: Shape) {
        let attributes: &[&str] = match shape {
            Shape::Resource => &["resourceType"],
            Shape::Primitive(_) => &["id", "value"],
            _ if ty == "Extension" => &["id", "url"],
            _ => &["id"],
        };
        let order = self.lookups.order(ty);
        let mut members: Vec<Member<'_>> = Vec::with_capacity(object.len());
        for (key, value) in object.iter() {
            if attributes.contains(&key) {
                continue;
            }
            let (name, value, extra) = match key.strip_prefix('_') {
                // Written with its value; alone only when there is none.
                Some(base) if object.get(base).is_some() => continue,
                Some(base) => (base, None, Some(value)),
                None => (key, Some(value), object.get(&format!("_{key}"))),
            };
            let known = match self.lookups.resolve(ty, name) {
                Resolution::Known(known) => Some(known),
                _ => None,
            };
            let rank = known.as_ref().and_then(|k| order.as_ref()?.iter().position(|n| *n == k.base)).unwrap_or(usize::MAX);
            members.push(Member { name, known, value, extra, rank });
        }
        members.sort_by_key(|m| m.rank);
        for member in members {
            self.member(member);
        }
    }

    fn member(&mut self, member: Member<'_>) {
        let Some(known) = member.known else {
            if let Some(value) = member.value {
                self.untyped(member.name, value);
            }
            return;
        };
        let Some(ty) = known.ty.as_deref() else {
            if let Some(value) = member.value {
                self.untyped(member.name, value);
            }
            return;
        };
        let shape = self.lookups.shape(ty);
        let values = occurrences(member.value);
        let extras = occurrences(member.extra);
        for i in 0..values.len().max(extras.len()) {
            let value = values.get(i).copied().flatten();
            let extra = extras.get(i).copied().flatten();
            self.one(member.name, ty, shape, value, extra);
        }
    }

    fn one(&mut self, name: &str, ty: &str, shape: Shape, value: Option<&Json>, extra: Option<&Json>) {
        match shape {
            Shape::Primitive(primitive) => self.primitive(name, ty, primitive, value, extra.and_then(Json::as_object)),
            Shape::Xhtml => {
                if let Some(text) = value.and_then(Json::as_str) {
                    narrative(text, &mut self.out);
                }
            }
            Shape::Resource => {
                let Some(object) = value.and_then(Json::as_object) else { return };
                let Some(resource_type) = object.get("resourceType").and_then(Json::as_str).filter(|t| is_name(t)) else { return };
                self.open(name);
                self.out.push('>');
                self.resource(object, resource_type, false);
                self.close(name);
            }
            Shape::Complex => {
                let Some(object) = value.and_then(Json::as_object) else { return };
                self.open(name);
                self.attribute(object, "id");
                if ty == "Extension" {
                    self.attribute(object, "url");
                }
                self.content(name, object, ty, shape);
            }
        }
    }

    fn primitive(&mut self, name: &str, ty: &str, primitive: Primitive, value: Option<&Json>, extra: Option<&Object>) {
        self.open(name);
        if let Some(extra) = extra {
            self.attribute(extra, "id");
        }
        let text = match (primitive, value) {
            (_, Some(Json::String(text) | Json::Number(text))) => Some(text.as_str()),
            (_, Some(Json::Bool(true))) => Some("true"),
            (_, Some(Json::Bool(false))) => Some("false"),
            _ => None,
        };
        if let Some(text) = text {
            self.out.push_str(" value=\"");
            escape_attribute(text, &mut self.out);
            self.out.push('"');
        }
        // The `_name` object is typed by the FHIR primitive (`System.String` stands for `string`).
        let element_type = if ty.starts_with(SYSTEM_PREFIX) { crate::fhirpath::fhir_primitive_for_system_type(ty).unwrap_or("string") } else { ty };
        match extra {
            Some(extra) => self.content(name, extra, element_type, Shape::Primitive(primitive)),
            None => self.out.push_str("/>"),
        }
    }

    /// Closes the start tag, writes the children, and ends the element (`/>` when there are none).
    fn content(&mut self, name: &str, object: &Object, ty: &str, shape: Shape) {
        self.out.push('>');
        let start = self.out.len();
        self.members(object, ty, shape);
        if self.out.len() == start {
            self.out.pop();
            self.out.push_str("/>");
        } else {
            self.close(name);
        }
    }

    /// A member the model does not describe, written by its JSON form.
    fn untyped(&mut self, name: &str, value: &Json) {
        if !is_name(name) {
            return;
        }
        match value {
            Json::Null => {}
            Json::Array(items) => items.iter().for_each(|item| self.untyped(name, item)),
            Json::Object(object) => {
                self.open(name);
                self.out.push('>');
                for (key, value) in object.iter() {
                    self.untyped(key, value);
                }
                self.close(name);
            }
            Json::String(text) | Json::Number(text) => {
                self.open(name);
                self.out.push_str(" value=\"");
                escape_attribute(text, &mut self.out);
                self.out.push_str("\"/>");
            }
            Json::Bool(b) => {
                self.open(name);
                self.out.push_str(if *b { " value=\"true\"/>" } else { " value=\"false\"/>" });
            }
        }
    }

    fn open(&mut self, name: &str) {
        self.out.push('<');
        self.out.push_str(name);
    }

    fn close(&mut self, name: &str) {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
    }

    fn attribute(&mut self, object: &Object, name: &str) {
        if let Some(value) = object.get(name).and_then(Json::as_str) {
            self.out.push(' ');
            self.out.push_str(name);
            self.out.push_str("=\"");
            escape_attribute(value, &mut self.out);
            self.out.push('"');
        }
    }
}

/// The occurrences of a member: the items of an array (`null` placeholders as `None`), or the one value.
fn occurrences(value: Option<&Json>) -> Vec<Option<&Json>> {
    match value {
        None => Vec::new(),
        Some(Json::Array(items)) => items.iter().map(|item| (!matches!(item, Json::Null)).then_some(item)).collect(),
        Some(Json::Null) => vec![None],
        Some(value) => vec![Some(value)],
    }
}

/// Whether a member name can be an XML element name as it stands (FHIR names are ASCII letters and digits).
fn is_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic()) && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Writes the narrative: as stored when it is already a `div` in the XHTML namespace using only
/// XML's own references (the usual case, and then no work), else re-serialized through the reader,
/// and as escaped text in a `div` if it is not XHTML at all, so the document stays well-formed.
fn narrative(text: &str, out: &mut String) {
    let declared = format!("<div xmlns=\"{XHTML_NS}\"");
    let plain = text.strip_prefix(declared.as_str()).is_some_and(|rest| rest.starts_with(['>', '/', ' '])) && only_xml_references(text);
    if plain {
        out.push_str(text);
        return;
    }
    let with_namespace = match text.strip_prefix("<div") {
        Some(rest) if !text.contains("xmlns") => format!("<div xmlns=\"{XHTML_NS}\"{rest}"),
        _ => text.to_string(),
    };
    if only_xml_references(&with_namespace)
        && let Ok(document) = super::dom::Document::parse(with_namespace.as_bytes())
        && &*document.root.name == "div"
        && document.root.in_namespace(XHTML_NS)
    {
        out.push_str(&super::xhtml::serialize(&document.root, &mut Vec::new()));
        return;
    }
    out.push_str(&declared);
    out.push('>');
    escape_text(text, out);
    out.push_str("</div>");
}

/// Whether every `&` starts one of XML's five entity references or a character reference.
fn only_xml_references(text: &str) -> bool {
    text.match_indices('&').all(|(i, _)| {
        let rest = &text[i + 1..];
        ["amp;", "lt;", "gt;", "quot;", "apos;", "#"].iter().any(|r| rest.starts_with(r))
    })
}
