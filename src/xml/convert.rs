//! Turns the checked element tree into FHIR JSON with the type model: arrays, typed primitives with `_name` siblings, choices, nested resources and narrative.
//!
//! Recursion follows the element tree, whose depth [`super::MAX_DEPTH`] already bounds.

use std::collections::HashMap;
use std::rc::Rc;

use super::dom::{Attribute, Content, Document, Element};
use super::{FHIR_NS, XHTML_NS, XSI_NS, XmlOptions, xhtml};
use crate::fhirpath::TypeModel;
use crate::json::{Json, Object};
use crate::outcome::{Issue, IssueCode};

/// R4 types some elements (`Resource.id`, `Extension.url`, primitive values) with FHIRPath system types.
pub(super) const SYSTEM_PREFIX: &str = "http://hl7.org/fhirpath/System.";

/// How a primitive's `value` attribute is written in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Primitive {
    Boolean,
    Number,
    String,
}

/// What kind of XML content a type has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// A resource: in a child element, the element wraps the resource element.
    Resource,
    Primitive(Primitive),
    Xhtml,
    Complex,
}

/// What the model says about one XML child element name (the same as its JSON member name).
#[derive(Clone)]
pub(super) enum Resolution {
    Known(Rc<Known>),
    /// A choice element written without its type suffix (`<value>`), which XML never allows.
    BareChoice,
    /// Not declared: carried untyped for the validator to report.
    Unknown,
}

/// A declared child element, as one XML name selects it.
pub(super) struct Known {
    /// The type (for a choice, the one the name's suffix selects); `None` if the model gives none.
    pub ty: Option<String>,
    pub many: bool,
    /// The element's name in the definition (`value` for `valueQuantity`), for the order check.
    pub base: String,
}

/// Consecutive or scattered occurrences of one JSON member.
struct Group<'e> {
    json_name: &'e str,
    /// `None` for unknown elements.
    known: Option<Rc<Known>>,
    items: Vec<&'e Element>,
}

/// One converted occurrence, split the way FHIR JSON splits primitives: the value, and the
/// `_name` object with `id` and extensions. Non-primitives use only the first half.
type Converted = (Option<Json>, Option<Object>);

/// The model's answers the reader and the writer ask for again and again, remembered per document.
pub(super) struct Lookups<'a> {
    model: &'a dyn TypeModel,
    shapes: HashMap<String, Shape>,
    orders: HashMap<String, Option<Rc<[String]>>>,
    /// Parent type → element name → resolution: every element asks, and the model's answers cost allocations.
    resolutions: HashMap<String, HashMap<String, Resolution>>,
}

impl<'a> Lookups<'a> {
    pub fn new(model: &'a dyn TypeModel) -> Self {
        Lookups { model, shapes: HashMap::new(), orders: HashMap::new(), resolutions: HashMap::new() }
    }

    pub fn shape(&mut self, ty: &str) -> Shape {
        if let Some(&shape) = self.shapes.get(ty) {
            return shape;
        }
        let shape = shape_of(self.model, ty);
        self.shapes.insert(ty.to_string(), shape);
        shape
    }

    pub fn order(&mut self, ty: &str) -> Option<Rc<[String]>> {
        if let Some(order) = self.orders.get(ty) {
            return order.clone();
        }
        let order: Option<Rc<[String]>> = self.model.element_order(ty).map(Rc::from);
        self.orders.insert(ty.to_string(), order.clone());
        order
    }

    pub fn resolve(&mut self, parent: &str, name: &str) -> Resolution {
        if let Some(resolution) = self.resolutions.get(parent).and_then(|names| names.get(name)) {
            return resolution.clone();
        }
        let resolution = resolve_child(self.model, parent, name);
        self.resolutions.entry(parent.to_string()).or_default().insert(name.to_string(), resolution.clone());
        resolution
    }
}

pub struct Converter<'a> {
    options: &'a XmlOptions,
    document: &'a Document<'a>,
    issues: Vec<Issue>,
    /// The expression of the element being converted; grown and cut back while descending, so
    /// that only issues pay for a path of their own.
    path: String,
    lookups: Lookups<'a>,
}

impl<'a> Converter<'a> {
    pub fn new(model: &'a dyn TypeModel, options: &'a XmlOptions, document: &'a Document<'a>) -> Self {
        Converter { options, document, issues: Vec::new(), path: String::new(), lookups: Lookups::new(model) }
    }

    /// The issues in document order (they are found parent first, not in reading order).
    pub fn into_issues(mut self) -> Vec<Issue> {
        self.issues.sort_by_key(|issue| issue.position);
        self.issues
    }

    /// The root element, already known to be in the FHIR namespace.
    pub fn root(&mut self, root: &Element) -> Json {
        self.path = root.name.to_string();
        Json::Object(self.resource(root))
    }

    /// Reports a problem at the current path.
    fn issue(&mut self, code: IssueCode, pos: usize, message: String) {
        let (line, column) = self.document.line_column(pos);
        self.issues.push(Issue::error(code, self.path.as_str(), message).with_position(line, column));
    }

    /// Reports a problem at a child of the current path.
    fn child_issue(&mut self, code: IssueCode, pos: usize, name: &str, index: Option<usize>, message: String) {
        let len = self.path.len();
        push_member(&mut self.path, name, index);
        self.issue(code, pos, message);
        self.path.truncate(len);
    }

    fn undefined_attribute(&mut self, element: &Element, attribute: &Attribute, ty: &str) {
        let message = format!("undefined attribute '{}' on '{}' (type {ty})", attribute.qname(), element.qname());
        self.issue(IssueCode::Structure, element.pos, message);
    }

    /// A resource element (the root, or the content of `contained` and similar).
    fn resource(&mut self, element: &Element) -> Object {
        let mut object = Object::new();
        object.insert("resourceType", Json::string(&*element.name));
        for attribute in &element.attributes {
            let schema_location = attribute.ns.as_deref() == Some(XSI_NS) && &*attribute.name == "schemaLocation";
            if !(schema_location && self.options.allow_xsi_schema_location) {
                self.undefined_attribute(element, attribute, &element.name);
            }
        }
        if self.lookups.shape(&element.name) == Shape::Resource {
            self.children(element, Some((&element.name, Shape::Resource)), &mut object);
        } else {
            self.children(element, None, &mut object);
        }
        object
    }

    /// An element whose type is a resource: it holds exactly one resource element.
    fn wrapper(&mut self, element: &Element) -> Option<Object> {
        for attribute in &element.attributes {
            self.undefined_attribute(element, attribute, "Resource");
        }
        let mut resource = None;
        for content in &element.content {
            match content {
                Content::Text(text) if !text.blank => self.text_issue(text.pos, &text.text),
                Content::Text(_) => {}
                Content::Element(child) if !child.in_namespace(FHIR_NS) => self.namespace_issue(child),
                Content::Element(child) if resource.is_some() => {
                    let message = format!("'{}' holds only one resource; '{}' was ignored", element.qname(), child.qname());
                    self.issue(IssueCode::Structure, child.pos, message);
                }
                Content::Element(child) => resource = Some(self.resource(child)),
            }
        }
        if resource.is_none() {
            self.issue(IssueCode::Structure, element.pos, format!("'{}' must contain a resource", element.qname()));
        }
        resource
    }

    fn complex(&mut self, element: &Element, ty: &str) -> Object {
        let mut object = Object::new();
        for attribute in &element.attributes {
            let known = attribute.ns.is_none() && (&*attribute.name == "id" || (&*attribute.name == "url" && ty == "Extension"));
            if known {
                object.insert(&*attribute.name, Json::string(&*attribute.value));
            } else {
                self.undefined_attribute(element, attribute, ty);
            }
        }
        self.children(element, Some((ty, Shape::Complex)), &mut object);
        object
    }

    fn primitive(&mut self, element: &Element, ty: &str, primitive: Primitive) -> Converted {
        // Children of `System.String` and friends are looked up on the FHIR primitive they stand for.
        let element_type = if ty.starts_with(SYSTEM_PREFIX) {
            crate::fhirpath::fhir_primitive_for_system_type(ty).unwrap_or("string")
        } else {
            ty
        };
        let mut value = None;
        let mut extra = Object::new();
        let n_issues = self.issues.len();
        for attribute in &element.attributes {
            match (attribute.ns.is_none(), &*attribute.name) {
                (true, "value") => match primitive_value(&attribute.value, primitive, element_type) {
                    Ok(json) => value = Some(json),
                    Err(message) => self.issue(IssueCode::Value, element.pos, message),
                },
                (true, "id") => extra.insert("id", Json::string(&*attribute.value)),
                _ => self.undefined_attribute(element, attribute, element_type),
            }
        }
        self.children(element, Some((element_type, Shape::Primitive(primitive))), &mut extra);
        // Emptiness caused by a problem already reported (a bad value, a misplaced child) is not news.
        if value.is_none() && extra.is_empty() && self.issues.len() == n_issues {
            let message = format!("'{}' has neither a value attribute nor children (ele-1): leave the element out instead", element.qname());
            self.issue(IssueCode::Structure, element.pos, message);
        }
        (value, (!extra.is_empty()).then_some(extra))
    }

    fn narrative(&mut self, element: &Element) -> Json {
        let mut dropped = Vec::new();
        let text = xhtml::serialize(element, &mut dropped);
        for d in dropped {
            self.issue(IssueCode::Structure, d.pos, d.message);
        }
        Json::String(text.into())
    }

    /// An element the model does not describe, converted by its form alone.
    fn untyped(&mut self, element: &Element) -> Converted {
        let mut object = Object::new();
        let mut value = None;
        for attribute in &element.attributes {
            if attribute.ns.is_none() && &*attribute.name == "value" {
                value = Some(Json::string(&*attribute.value));
            } else {
                object.insert(&*attribute.name, Json::string(&*attribute.value));
            }
        }
        let mut text = String::new();
        let mut groups: Vec<(&str, Vec<&Element>)> = Vec::new();
        for content in &element.content {
            match content {
                Content::Text(t) => text.push_str(&t.text),
                Content::Element(child) => match groups.iter_mut().find(|(name, _)| *name == &*child.name) {
                    Some((_, items)) => items.push(child),
                    None => groups.push((&child.name, vec![child])),
                },
            }
        }
        for (name, items) in groups {
            let many = items.len() > 1;
            let converted = items.into_iter().map(|item| self.untyped(item)).collect();
            emit(&mut object, name, many, converted);
        }
        let text = text.trim_matches([' ', '\t', '\r', '\n']);
        if value.is_none() && !text.is_empty() {
            value = Some(Json::string(text));
        }
        match value {
            Some(value) => (Some(value), (!object.is_empty()).then_some(object)),
            None => (Some(Json::Object(object)), None),
        }
    }

    fn text_issue(&mut self, pos: usize, text: &str) {
        let text = text.trim_matches([' ', '\t', '\r', '\n']);
        let excerpt: String = text.chars().take(60).collect();
        let ellipsis = if excerpt.len() < text.len() { "…" } else { "" };
        self.issue(IssueCode::Structure, pos, format!("text is not allowed in FHIR elements ('{excerpt}{ellipsis}')"));
    }

    fn namespace_issue(&mut self, element: &Element) {
        let found = element.ns.as_deref().map_or_else(|| "no namespace".to_string(), |ns| format!("the namespace '{ns}'"));
        let message = format!("the element '{}' is in {found}; FHIR elements must be in the namespace '{FHIR_NS}'", element.qname());
        self.child_issue(IssueCode::Structure, element.pos, &element.name, None, message);
    }

    /// Converts the child elements of `element` into members of `object`.
    ///
    /// `parent` is the element's type and shape; `None` means the type is unknown and every child
    /// is carried untyped.
    fn children(&mut self, element: &Element, parent: Option<(&str, Shape)>, object: &mut Object) {
        // Names that the XML form writes as attributes, so an element of that name is misplaced.
        let attribute_names: &[&str] = match parent {
            Some((_, Shape::Primitive(_))) => &["id", "value"],
            Some(("Extension", _)) => &["id", "url"],
            Some((_, Shape::Complex)) => &["id"],
            _ => &[],
        };
        let order = parent.and_then(|(ty, _)| self.lookups.order(ty));
        // The furthest element seen so far in definition order, and its name.
        let mut furthest: Option<(usize, &str)> = None;
        let mut groups: Vec<Group<'_>> = Vec::new();
        for content in &element.content {
            let child = match content {
                Content::Text(text) => {
                    if !text.blank {
                        self.text_issue(text.pos, &text.text);
                    }
                    continue;
                }
                Content::Element(child) => child,
            };
            let name: &str = &child.name;
            let resolution = match parent {
                Some((ty, _)) => self.lookups.resolve(ty, name),
                None => Resolution::Unknown,
            };
            let wants_xhtml = matches!(&resolution, Resolution::Known(known) if known.ty.as_deref() == Some("xhtml"));
            if wants_xhtml && !child.in_namespace(XHTML_NS) {
                let message = format!("the narrative '{}' must be in the XHTML namespace '{XHTML_NS}'", child.qname());
                self.child_issue(IssueCode::Structure, child.pos, name, None, message);
                continue;
            }
            if !wants_xhtml && !child.in_namespace(FHIR_NS) {
                self.namespace_issue(child);
                continue;
            }
            if attribute_names.contains(&name) {
                let message = format!("'{name}' must be written as an attribute of '{}', not as an element", element.qname());
                self.child_issue(IssueCode::Structure, child.pos, name, None, message);
                continue;
            }
            // `ExampleScenario.instance` has an element of that name; only a resource's would clash.
            if (name == "resourceType" && !matches!(parent, Some((_, Shape::Complex)))) || name.starts_with('_') {
                // Carrying these would overwrite members the conversion itself writes.
                let message = format!("unrecognized element '{name}' (no FHIR element has this name)");
                self.child_issue(IssueCode::Structure, child.pos, name, None, message);
                continue;
            }
            let known = match resolution {
                Resolution::BareChoice => {
                    let message = format!("'{name}' is a choice element: its XML name must end with the type, as in '{name}String'");
                    self.child_issue(IssueCode::Structure, child.pos, name, None, message);
                    continue;
                }
                Resolution::Unknown => None,
                // Two names for one choice (`valueString`, `valueQuantity`) stay two members: JSON
                // can hold both, and the validator reports the clash as it does for JSON input.
                Resolution::Known(known) => Some(known),
            };
            let index = match groups.iter().position(|g| g.json_name == name) {
                Some(index) => index,
                None => {
                    groups.push(Group { json_name: name, known: known.clone(), items: Vec::new() });
                    groups.len() - 1
                }
            };
            let group = &mut groups[index];
            let occurrence = group.items.len();
            group.items.push(child);
            let (Some(order), Some(known)) = (&order, known) else { continue };
            let Some(position) = order.iter().position(|n| *n == known.base) else { continue };
            match furthest {
                Some((furthest_position, after)) if position < furthest_position => {
                    let message = format!("element '{name}' is out of order: it must come before '{after}'");
                    self.child_issue(IssueCode::Invalid, child.pos, name, known.many.then_some(occurrence), message);
                }
                _ => furthest = Some((position, name)),
            }
        }
        for group in groups {
            self.emit_group(group, object);
        }
    }

    fn emit_group(&mut self, group: Group<'_>, object: &mut Object) {
        let name = group.json_name;
        let Some(known) = group.known else {
            let many = group.items.len() > 1;
            let converted = group.items.into_iter().map(|item| self.untyped(item)).collect();
            emit(object, name, many, converted);
            return;
        };
        let mut items = group.items;
        if !known.many && items.len() > 1 {
            let message = format!("'{name}' allows at most 1 value but found {}; only the first was kept", items.len());
            self.child_issue(IssueCode::Structure, items[1].pos, name, None, message);
            items.truncate(1);
        }
        let shape = known.ty.as_deref().map(|ty| self.lookups.shape(ty));
        let mut converted = Vec::with_capacity(items.len());
        let len = self.path.len();
        for (i, item) in items.into_iter().enumerate() {
            push_member(&mut self.path, name, known.many.then_some(i));
            let one = match (known.ty.as_deref(), shape) {
                (Some(ty), Some(Shape::Primitive(primitive))) => self.primitive(item, ty, primitive),
                (Some(ty), Some(Shape::Complex)) => (Some(Json::Object(self.complex(item, ty))), None),
                (_, Some(Shape::Resource)) => (self.wrapper(item).map(Json::Object), None),
                (_, Some(Shape::Xhtml)) => (Some(self.narrative(item)), None),
                // The model declares the element without a type: keep its content as it is.
                _ => self.untyped(item),
            };
            self.path.truncate(len);
            converted.push(one);
        }
        emit(object, name, known.many, converted);
    }
}

/// The shape of a type's XML content.
pub(super) fn shape_of(model: &dyn TypeModel, ty: &str) -> Shape {
    if let Some(system) = ty.strip_prefix(SYSTEM_PREFIX) {
        Shape::Primitive(match system {
            "Boolean" => Primitive::Boolean,
            "Integer" | "Decimal" => Primitive::Number,
            _ => Primitive::String,
        })
    } else if ty == "xhtml" {
        Shape::Xhtml
    } else if ty.starts_with(|c: char| c.is_ascii_lowercase()) {
        // FHIR names primitive types in lower camel case and everything else in upper.
        Shape::Primitive(match ty {
            "boolean" => Primitive::Boolean,
            "integer" | "decimal" | "positiveInt" | "unsignedInt" => Primitive::Number,
            _ => Primitive::String,
        })
    } else if derives_from_resource(model, ty) {
        Shape::Resource
    } else {
        Shape::Complex
    }
}

fn derives_from_resource(model: &dyn TypeModel, ty: &str) -> bool {
    if ty.contains('.') {
        return false;
    }
    let mut current = ty.to_string();
    // Bounded in case a broken model has a cycle.
    for _ in 0..32 {
        if current == "Resource" {
            return true;
        }
        match model.base_type(&current) {
            Some(base) => current = base,
            None => return false,
        }
    }
    false
}

/// What the model declares for the child `name` of `parent`; a choice is found by its typed name (`valueQuantity`).
pub(super) fn resolve_child(model: &dyn TypeModel, parent: &str, name: &str) -> Resolution {
    if let Some(child) = model.child(parent, name) {
        if child.is_choice {
            return Resolution::BareChoice;
        }
        return Resolution::Known(Rc::new(Known { ty: child.types.into_iter().next(), many: child.many, base: name.to_string() }));
    }
    // `valueQuantity`: try each split before an upper-case letter as `value[x]` + type.
    for (i, b) in name.bytes().enumerate().skip(1) {
        if !b.is_ascii_uppercase() {
            continue;
        }
        // `i` is a char boundary: the byte there is ASCII.
        let (prefix, suffix) = name.split_at(i);
        let Some(child) = model.child(parent, prefix) else { continue };
        if !child.is_choice {
            continue;
        }
        if let Some(ty) = child.types.into_iter().find(|t| is_type_suffix(t, suffix)) {
            return Resolution::Known(Rc::new(Known { ty: Some(ty), many: child.many, base: prefix.to_string() }));
        }
    }
    Resolution::Unknown
}

/// Appends `.name` or `.name[index]` to a path.
fn push_member(path: &mut String, name: &str, index: Option<usize>) {
    path.push('.');
    path.push_str(name);
    if let Some(i) = index {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(path, "[{i}]");
    }
}

/// Writes the occurrences of one member as FHIR JSON does: a value or an array, plus the `_name`
/// sibling (aligned with `null`s when repeating) for primitives with an id or extensions.
fn emit(object: &mut Object, name: &str, many: bool, converted: Vec<Converted>) {
    // An occurrence that produced nothing was reported already; leaving it out keeps the arrays clean.
    let converted: Vec<Converted> = converted.into_iter().filter(|(value, extra)| value.is_some() || extra.is_some()).collect();
    if converted.is_empty() {
        return;
    }
    let has_value = converted.iter().any(|(value, _)| value.is_some());
    let has_extra = converted.iter().any(|(_, extra)| extra.is_some());
    let extra_name = format!("_{name}");
    if many {
        let (values, extras): (Vec<_>, Vec<_>) = converted.into_iter().unzip();
        if has_value {
            object.insert(name, Json::Array(values.into_iter().map(|v| v.unwrap_or(Json::Null)).collect()));
        }
        if has_extra {
            object.insert(extra_name, Json::Array(extras.into_iter().map(|e| e.map_or(Json::Null, Json::Object)).collect()));
        }
    } else if let Some((value, extra)) = converted.into_iter().next() {
        if let Some(value) = value {
            object.insert(name, value);
        }
        if let Some(extra) = extra {
            object.insert(extra_name, Json::Object(extra));
        }
    }
}

/// Whether `suffix` is the choice suffix for type code `ty` (`Quantity` for `Quantity`, `DateTime` for `dateTime`).
fn is_type_suffix(ty: &str, suffix: &str) -> bool {
    let mut t = ty.chars();
    let mut s = suffix.chars();
    match (t.next(), s.next()) {
        (Some(a), Some(b)) => a.to_ascii_uppercase() == b && t.as_str() == s.as_str(),
        _ => false,
    }
}

fn primitive_value(raw: &str, primitive: Primitive, ty: &str) -> Result<Json, String> {
    match primitive {
        Primitive::Boolean => match raw {
            "true" => Ok(Json::Bool(true)),
            "false" => Ok(Json::Bool(false)),
            _ => Err(format!("'{raw}' is not a valid boolean (it must be 'true' or 'false')")),
        },
        Primitive::Number if is_json_number(raw) => Ok(Json::Number(raw.into())),
        Primitive::Number => Err(format!("'{raw}' is not a valid {ty}")),
        Primitive::String => Ok(Json::string(raw)),
    }
}

/// The JSON number grammar, which FHIR's `decimal` and `integer` lexical forms are subsets of.
fn is_json_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    if bytes.get(i) == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    let int_digits = digits(&mut i);
    if int_digits == 0 || (int_digits > 1 && bytes[int_start] == b'0') {
        return false;
    }
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers() {
        for ok in ["0", "-1", "1.50", "1e5", "1.0E-3", "123456789012345678901234567890"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "01", "+1", "1.", ".5", "1e", " 1", "1 ", "0x10", "NaN"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }

    #[test]
    fn type_suffixes() {
        assert!(is_type_suffix("dateTime", "DateTime"));
        assert!(is_type_suffix("Quantity", "Quantity"));
        assert!(!is_type_suffix("dateTime", "Datetime"));
        assert!(!is_type_suffix("string", ""));
    }
}
