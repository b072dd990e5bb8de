//! A StructureDefinition snapshot compiled for fast lookups: elements with parsed cardinality, types, bindings, constraints, slicing and a child index.

use std::any::Any;
use std::sync::OnceLock;

use foldhash::{HashMap, HashMapExt};

/// A member name as JSON writes it: stored inline (names are short), so that comparing a
/// lookup's key reads the table's own memory rather than another allocation.
type JsonName = compact_str::CompactString;

use crate::json::Json;

/// What a StructureDefinition describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructureKind {
    PrimitiveType,
    ComplexType,
    Resource,
    Logical,
}

/// A compiled StructureDefinition.
#[derive(Debug)]
pub struct Structure {
    pub url: String,
    pub version: Option<String>,
    pub name: String,
    /// The FHIR type it describes or constrains (`Patient`, `Extension`, `string`).
    pub type_name: String,
    pub kind: StructureKind,
    pub is_abstract: bool,
    pub base_definition: Option<String>,
    /// `specialization` (a new type) or `constraint` (a profile).
    pub derivation: Option<String>,
    /// `context` of an extension definition: where it may be used.
    pub contexts: Vec<ExtensionContext>,
    /// `contextInvariant` of an extension definition: FHIRPath conditions on the element holding it.
    pub context_invariants: Vec<String>,
    pub elements: Vec<ElementDefinition>,
    /// Direct children of each element, slices included, in snapshot order.
    children: Vec<Vec<usize>>,
    /// First unsliced element for each path.
    by_path: HashMap<String, usize>,
    /// For each element, its unsliced children by JSON member name (`valueQuantity` too), with the
    /// index of the type a choice suffix selects: the walk looks up every member of every object here.
    json_children: Vec<HashMap<JsonName, (usize, Option<usize>)>>,
    /// For each element, its unsliced children whose number of values is limited: a minimum above
    /// zero, or a maximum on a repeating element. Only these need counting on every object.
    counted_children: Vec<Vec<usize>>,
}

/// One `StructureDefinition.context` of an extension definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionContext {
    pub kind: ContextKind,
    /// An element path or type name, an extension URL, or a FHIRPath expression, per `kind`.
    pub expression: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    Element,
    Extension,
    FhirPath,
}

/// One snapshot element.
#[derive(Debug)]
pub struct ElementDefinition {
    pub id: String,
    pub path: String,
    /// The last path segment, with `[x]` removed for choices (`value`).
    pub name: String,
    pub slice_name: Option<String>,
    pub min: u32,
    /// `None` for `*`.
    pub max: Option<u32>,
    /// Whether the base definition lets the element repeat, which decides JSON array vs single value.
    pub base_max_is_many: bool,
    pub types: Vec<ElementType>,
    pub content_reference: Option<String>,
    /// `fixed[x]` and `pattern[x]` values.
    pub fixed: Option<Json>,
    pub pattern: Option<Json>,
    pub min_value: Option<Json>,
    pub max_value: Option<Json>,
    pub max_length: Option<usize>,
    pub constraints: Vec<Constraint>,
    pub binding: Option<Binding>,
    pub slicing: Option<Slicing>,
    pub is_modifier: bool,
    /// Part of the summary view (`_summary=true`).
    pub is_summary: bool,
    pub must_support: bool,
    /// Represented as an XML attribute (`id`, `url`, primitive `value`).
    pub xml_attribute: bool,
    /// What the validator works out from this element the first time it checks it.
    pub prepared: Prepared,
}

/// One allowed type of an element.
#[derive(Clone, Debug)]
pub struct ElementType {
    /// The type code; for the `value` of primitives a FHIRPath system type URL.
    pub code: String,
    pub profiles: Vec<String>,
    pub target_profiles: Vec<String>,
}

/// A FHIRPath invariant.
#[derive(Clone, Debug)]
pub struct Constraint {
    pub key: String,
    /// `true` when the severity is `error`.
    pub is_error: bool,
    pub human: String,
    pub expression: Option<String>,
    pub source: Option<String>,
    /// What the validator works out from this constraint the first time it checks it.
    pub prepared: Prepared,
}

/// Where the user of a definition keeps what it worked out from it on first use: the validator
/// keeps a constraint's compiled expression and shortcut here, and which of an element's
/// constraints it runs, because constraints are checked on every element of every instance and
/// live as long as their definitions. The slot holds one
/// type (its user's); it is empty in a clone, so an edited copy never carries stale work.
#[derive(Default)]
pub struct Prepared(OnceLock<Box<dyn Any + Send + Sync>>);

impl Prepared {
    /// The value kept here, made by `init` the first time; `None` if a value of another type is kept.
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

impl Clone for Prepared {
    fn clone(&self) -> Self {
        Prepared::default()
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "Prepared(..)" } else { "Prepared(empty)" })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingStrength {
    Required,
    Extensible,
    Preferred,
    Example,
}

#[derive(Clone, Debug)]
pub struct Binding {
    pub strength: BindingStrength,
    pub value_set: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlicingRules {
    Closed,
    Open,
    OpenAtEnd,
}

#[derive(Clone, Debug)]
pub struct Discriminator {
    /// `value`, `exists`, `pattern`, `type` or `profile`.
    pub kind: String,
    pub path: String,
}

#[derive(Clone, Debug)]
pub struct Slicing {
    pub discriminators: Vec<Discriminator>,
    pub ordered: bool,
    pub rules: SlicingRules,
}

impl ElementDefinition {
    /// Whether this is a choice element (`value[x]`).
    pub fn is_choice(&self) -> bool {
        self.path.ends_with("[x]")
    }

    /// The single type code, when there is exactly one.
    pub fn single_type(&self) -> Option<&str> {
        match self.types.as_slice() {
            [t] => Some(&t.code),
            _ => None,
        }
    }
}

impl Structure {
    /// Compiles a StructureDefinition that has a snapshot.
    pub fn compile(resource: &Json) -> Result<Structure, String> {
        let text = |k: &str| resource.get(k).and_then(Json::as_str).map(str::to_string);
        let url = text("url").ok_or("StructureDefinition has no url")?;
        let type_name = text("type").ok_or("StructureDefinition has no type")?;
        let kind = match resource.get("kind").and_then(Json::as_str) {
            Some("primitive-type") => StructureKind::PrimitiveType,
            Some("complex-type") => StructureKind::ComplexType,
            Some("resource") => StructureKind::Resource,
            Some("logical") => StructureKind::Logical,
            other => return Err(format!("unknown kind {other:?}")),
        };
        let snapshot = resource
            .get("snapshot")
            .and_then(|s| s.get("element"))
            .and_then(Json::as_array)
            .ok_or("StructureDefinition has no snapshot")?;
        let elements: Vec<ElementDefinition> = snapshot.iter().map(compile_element).collect::<Result<_, _>>()?;
        if elements.is_empty() {
            return Err("snapshot has no elements".into());
        }
        let contexts = resource
            .get("context")
            .and_then(Json::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| {
                        let expression = c.get("expression").and_then(Json::as_str)?.to_string();
                        let kind = match c.get("type").and_then(Json::as_str) {
                            Some("extension") => ContextKind::Extension,
                            Some("fhirpath") => ContextKind::FhirPath,
                            _ => ContextKind::Element,
                        };
                        Some(ExtensionContext { kind, expression })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let context_invariants = resource
            .get("contextInvariant")
            .and_then(Json::as_array)
            .map(|cs| cs.iter().filter_map(Json::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let (children, by_path) = index_children(&elements);
        let json_children = index_json_names(&elements, &children);
        let counted_children = children
            .iter()
            .map(|kids| {
                let counted = |&&c: &&usize| {
                    let e: &ElementDefinition = &elements[c];
                    e.slice_name.is_none() && (e.min > 0 || (e.max.is_some() && e.base_max_is_many))
                };
                kids.iter().filter(counted).copied().collect()
            })
            .collect();
        Ok(Structure {
            url,
            version: text("version"),
            name: text("name").unwrap_or_default(),
            type_name,
            kind,
            is_abstract: resource.get("abstract").and_then(Json::as_bool).unwrap_or(false),
            base_definition: text("baseDefinition"),
            derivation: text("derivation"),
            contexts,
            context_invariants,
            elements,
            children,
            by_path,
            json_children,
            counted_children,
        })
    }

    pub fn derivation_is_specialization(&self) -> bool {
        self.derivation.as_deref() != Some("constraint")
    }

    /// The root element (index 0).
    pub fn root(&self) -> &ElementDefinition {
        &self.elements[0]
    }

    /// Direct children of an element, slices included.
    pub fn children(&self, index: usize) -> &[usize] {
        self.children.get(index).map(Vec::as_slice).unwrap_or_default()
    }

    /// The unsliced children of an element with a minimum above zero or a maximum on a repeating element.
    pub fn counted_children(&self, index: usize) -> &[usize] {
        self.counted_children.get(index).map(Vec::as_slice).unwrap_or_default()
    }

    /// The first unsliced element with this path.
    pub fn index_of_path(&self, path: &str) -> Option<usize> {
        self.by_path.get(path).copied()
    }

    /// The unsliced child of `parent` called `name` (`value` finds `value[x]`).
    pub fn child_named(&self, parent: usize, name: &str) -> Option<usize> {
        self.children(parent).iter().copied().find(|&c| {
            let e = &self.elements[c];
            e.slice_name.is_none() && e.name == name
        })
    }

    /// The child of `parent` that a JSON member name stands for, and the type a choice suffix selects.
    ///
    /// `valueQuantity` matches `value[x]` with type `Quantity`; a plain name matches itself.
    pub fn child_for_json_name(&self, parent: usize, json_name: &str) -> Option<(usize, Option<String>)> {
        self.json_child(parent, json_name).map(|(child, chosen)| (child, chosen.map(str::to_string)))
    }

    /// [`Structure::child_for_json_name`] without copying the chosen type's code.
    pub fn json_child(&self, parent: usize, json_name: &str) -> Option<(usize, Option<&str>)> {
        let &(child, chosen) = self.json_children.get(parent)?.get(json_name)?;
        Some((child, chosen.map(|t| self.elements[child].types[t].code.as_str())))
    }

    /// Every element with this path, slices and their copies included.
    pub fn children_with_path(&self, path: &str) -> Vec<usize> {
        self.elements.iter().enumerate().filter(|(_, e)| e.path == path).map(|(i, _)| i).collect()
    }

    /// Slices defined on the element at `index` (elements with the same path and a slice name).
    pub fn slices_of(&self, parent: usize, sliced: usize) -> Vec<usize> {
        let path = &self.elements[sliced].path;
        self.children(parent).iter().copied().filter(|&c| c != sliced && self.elements[c].path == *path && self.elements[c].slice_name.is_some()).collect()
    }
}

/// The capitalised type name used as a choice suffix (`valueDateTime`, `valueQuantity`).
pub fn type_suffix(code: &str) -> String {
    let mut chars = code.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn compile_element(element: &Json) -> Result<ElementDefinition, String> {
    let text = |k: &str| element.get(k).and_then(Json::as_str).map(str::to_string);
    let path = text("path").ok_or("element without path")?;
    let id = text("id").unwrap_or_else(|| path.clone());
    let last = path.rsplit('.').next().unwrap_or(&path);
    let name = last.trim_end_matches("[x]").to_string();
    let min = element.get("min").and_then(|m| match m {
        Json::Number(n) => n.parse().ok(),
        _ => None,
    });
    let max = match element.get("max").and_then(Json::as_str) {
        Some("*") | None => None,
        Some(m) => Some(m.parse::<u32>().map_err(|_| format!("{id}: bad max {m}"))?),
    };
    let strings = |j: Option<&Json>| -> Vec<String> {
        j.and_then(Json::as_array).map(|a| a.iter().filter_map(Json::as_str).map(str::to_string).collect()).unwrap_or_default()
    };
    let types = element
        .get("type")
        .and_then(Json::as_array)
        .map(|ts| {
            ts.iter()
                .filter_map(|t| {
                    let code = t.get("code").and_then(Json::as_str)?;
                    // Primitive `value` elements carry their FHIR type in an extension; the code is a System type URL.
                    let fhir_type = t
                        .get("extension")
                        .and_then(Json::as_array)
                        .and_then(|exts| {
                            exts.iter().find(|e| e.get("url").and_then(Json::as_str) == Some("http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"))
                        })
                        .and_then(|e| e.get("valueUrl").or_else(|| e.get("valueUri")))
                        .and_then(Json::as_str);
                    Some(ElementType {
                        code: fhir_type.unwrap_or(code).to_string(),
                        profiles: strings(t.get("profile")),
                        target_profiles: strings(t.get("targetProfile")),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut fixed = None;
    let mut pattern = None;
    let mut min_value = None;
    let mut max_value = None;
    if let Some(object) = element.as_object() {
        for (k, v) in object.iter() {
            if k.starts_with("fixed") {
                fixed = Some(v.clone());
            } else if k.starts_with("pattern") {
                pattern = Some(v.clone());
            } else if k.starts_with("minValue") {
                min_value = Some(v.clone());
            } else if k.starts_with("maxValue") {
                max_value = Some(v.clone());
            }
        }
    }
    let constraints = element
        .get("constraint")
        .and_then(Json::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| {
                    Some(Constraint {
                        key: c.get("key")?.as_str()?.to_string(),
                        is_error: c.get("severity").and_then(Json::as_str) != Some("warning"),
                        human: c.get("human").and_then(Json::as_str).unwrap_or_default().to_string(),
                        expression: c.get("expression").and_then(Json::as_str).map(str::to_string),
                        source: c.get("source").and_then(Json::as_str).map(str::to_string),
                        prepared: Prepared::default(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let binding = element.get("binding").and_then(|b| {
        let strength = match b.get("strength").and_then(Json::as_str)? {
            "required" => BindingStrength::Required,
            "extensible" => BindingStrength::Extensible,
            "preferred" => BindingStrength::Preferred,
            _ => BindingStrength::Example,
        };
        Some(Binding { strength, value_set: b.get("valueSet").and_then(Json::as_str).map(str::to_string) })
    });
    let slicing = element.get("slicing").map(|s| Slicing {
        discriminators: s
            .get("discriminator")
            .and_then(Json::as_array)
            .map(|ds| {
                ds.iter()
                    .filter_map(|d| {
                        Some(Discriminator { kind: d.get("type")?.as_str()?.to_string(), path: d.get("path")?.as_str()?.to_string() })
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ordered: s.get("ordered").and_then(Json::as_bool).unwrap_or(false),
        rules: match s.get("rules").and_then(Json::as_str) {
            Some("closed") => SlicingRules::Closed,
            Some("openAtEnd") => SlicingRules::OpenAtEnd,
            _ => SlicingRules::Open,
        },
    });
    let xml_attribute =
        element.get("representation").and_then(Json::as_array).is_some_and(|r| r.iter().any(|x| x.as_str() == Some("xmlAttr")));
    Ok(ElementDefinition {
        id,
        path,
        name,
        slice_name: text("sliceName"),
        min: min.unwrap_or(0),
        max,
        base_max_is_many: match element.get("base").and_then(|b| b.get("max")).and_then(Json::as_str) {
            Some(base_max) => base_max != "1" && base_max != "0",
            None => max != Some(1) && max != Some(0),
        },
        types,
        content_reference: text("contentReference"),
        fixed,
        pattern,
        min_value,
        max_value,
        max_length: element.get("maxLength").and_then(|m| match m {
            Json::Number(n) => n.parse().ok(),
            _ => None,
        }),
        constraints,
        binding,
        slicing,
        is_modifier: element.get("isModifier").and_then(Json::as_bool).unwrap_or(false),
        is_summary: element.get("isSummary").and_then(Json::as_bool).unwrap_or(false),
        must_support: element.get("mustSupport").and_then(Json::as_bool).unwrap_or(false),
        xml_attribute,
        prepared: Prepared::default(),
    })
}

/// The JSON member names of each element's unsliced children; for a choice, one name per type.
/// The first child to claim a name keeps it, as a linear search in snapshot order would find it.
fn index_json_names(elements: &[ElementDefinition], children: &[Vec<usize>]) -> Vec<HashMap<JsonName, (usize, Option<usize>)>> {
    children
        .iter()
        .map(|kids| {
            let mut names: HashMap<JsonName, (usize, Option<usize>)> = HashMap::new();
            for &c in kids {
                let e = &elements[c];
                if e.slice_name.is_some() {
                    continue;
                }
                if !e.is_choice() {
                    names.entry(JsonName::from(e.name.as_str())).or_insert((c, None));
                    continue;
                }
                for (t, element_type) in e.types.iter().enumerate() {
                    let name = format!("{}{}", e.name, type_suffix(&element_type.code));
                    names.entry(JsonName::from(name)).or_insert((c, Some(t)));
                }
            }
            names
        })
        .collect()
}

/// Builds the parent → children index with a stack of open ancestors (snapshots are in document order).
fn index_children(elements: &[ElementDefinition]) -> (Vec<Vec<usize>>, HashMap<String, usize>) {
    let mut children = vec![Vec::new(); elements.len()];
    let mut by_path = HashMap::new();
    let mut stack: Vec<usize> = Vec::new();
    for (i, element) in elements.iter().enumerate() {
        while let Some(&top) = stack.last() {
            let top_path = &elements[top].path;
            let is_descendant = element.path.len() > top_path.len()
                && element.path.starts_with(top_path.as_str())
                && element.path.as_bytes()[top_path.len()] == b'.';
            if is_descendant {
                break;
            }
            stack.pop();
        }
        if let Some(&parent) = stack.last() {
            children[parent].push(i);
        }
        stack.push(i);
        if element.slice_name.is_none() && !by_path.contains_key(&element.path) && !element.id.contains(':') {
            by_path.insert(element.path.clone(), i);
        }
    }
    (children, by_path)
}
