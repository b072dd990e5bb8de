//! The conformance resources in force: loaded packages and files, canonical URL resolution with versions, and compiled StructureDefinitions.
//!
//! Everything that asks "what does this profile/ValueSet/CodeSystem say" goes through
//! [`Definitions`]. It is built once (base package, bundled profiles, packages the user asked
//! for) and then shared read-only; compiled structures are cached inside it.

mod structure;
mod snapshot;

use foldhash::{HashMap, HashMapExt};
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

pub use structure::{
    Binding, BindingStrength, Constraint, ContextKind, Discriminator, ExtensionContext, ElementDefinition, ElementType, Prepared, Slicing, SlicingRules, Structure, StructureKind, type_suffix,
};

use crate::fhirpath::{ChildElement, TypeModel};
use crate::json::Json;
use crate::package::{LoadPackageError, Package, PackageResource};

/// The canonical base of the core specification's StructureDefinitions.
pub const CORE_SD_BASE: &str = "http://hl7.org/fhir/StructureDefinition/";

/// The set of conformance resources a validation runs against.
pub struct Definitions {
    resources: Vec<Arc<PackageResource>>,
    /// Canonical URL (without version) → indices into `resources`, in load order.
    by_url: HashMap<String, Vec<usize>>,
    /// Packages loaded, as `name#version`.
    packages: Vec<String>,
    structures: RwLock<HashMap<String, Option<Arc<Structure>>>>,
    /// Base structures by type name: the walk asks per element, and building the canonical URL
    /// for each question was a tenth of validation time. Only loaded types are kept.
    types: RwLock<HashMap<compact_str::CompactString, Arc<Structure>>>,
    children: RwLock<HashMap<(String, String), Option<ChildElement>>>,
    /// Type or backbone path → child element names in definition order, for the XML reader.
    orders: RwLock<HashMap<String, Option<Arc<Vec<String>>>>>,
    /// Problems found while compiling structures (broken profiles), reported once.
    compile_problems: RwLock<Vec<String>>,
}

impl std::fmt::Debug for Definitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions").field("packages", &self.packages).field("resources", &self.resources.len()).finish()
    }
}

impl Definitions {
    /// Only the compiled-in R4 base package.
    pub fn new_base() -> Definitions {
        let mut definitions = Definitions::empty();
        definitions.add_package(Package::base());
        definitions
    }

    /// The R4 base plus the bundled IOP profiles: what the gateway validates against by default.
    pub fn new_default() -> Definitions {
        let mut definitions = Definitions::new_base();
        definitions.add_package(Package::bundled());
        definitions
    }

    /// What the gateway exchanges with partners under: the R4 base, the bundled IOP profiles, and the
    /// compiled-in US Core 6.1.0 and Da Vinci PAS 2.2.1 packages, so every PAS request Bundle, Claim
    /// and US Core resource the gateway sends or accepts is checked against the profiles it claims
    /// with no package cache and no network. The server validates with this; the `validate` command
    /// and the benchmarks keep [`Definitions::new_default`], so their figures stay comparable.
    pub fn new_with_exchange_packages() -> Definitions {
        let mut definitions = Definitions::new_default();
        for package in Package::exchange() {
            definitions.add_package(package);
        }
        definitions
    }

    /// A shared instance holding only the R4 base, for callers that need types but no profiles.
    pub fn base() -> Arc<Definitions> {
        static BASE: OnceLock<Arc<Definitions>> = OnceLock::new();
        BASE.get_or_init(|| Arc::new(Definitions::new_base())).clone()
    }

    /// A copy that can take more resources without touching this one; resources are shared, not copied.
    ///
    /// Loading the base package costs far more than this, so callers that need many slightly
    /// different sets (one per test case, one per tenant) load the common part once and fork it.
    pub fn fork(&self) -> Definitions {
        let read_or_empty = |lock: &RwLock<HashMap<String, Option<Arc<Structure>>>>| lock.read().map(|m| m.clone()).unwrap_or_default();
        Definitions {
            resources: self.resources.clone(),
            by_url: self.by_url.clone(),
            packages: self.packages.clone(),
            structures: RwLock::new(read_or_empty(&self.structures)),
            types: RwLock::new(self.types.read().map(|m| m.clone()).unwrap_or_default()),
            children: RwLock::new(self.children.read().map(|m| m.clone()).unwrap_or_default()),
            orders: RwLock::new(self.orders.read().map(|m| m.clone()).unwrap_or_default()),
            compile_problems: RwLock::new(Vec::new()),
        }
    }

    fn empty() -> Definitions {
        Definitions {
            resources: Vec::new(),
            by_url: HashMap::new(),
            packages: Vec::new(),
            structures: RwLock::new(HashMap::new()),
            types: RwLock::new(HashMap::new()),
            children: RwLock::new(HashMap::new()),
            orders: RwLock::new(HashMap::new()),
            compile_problems: RwLock::new(Vec::new()),
        }
    }

    /// Adds every resource of a package; later additions win over earlier ones for the same canonical and version.
    pub fn add_package(&mut self, package: Package) {
        let label = format!("{}#{}", package.name, package.version);
        if self.packages.contains(&label) {
            return;
        }
        self.packages.push(label);
        for resource in package.resources {
            self.add_package_resource(resource);
        }
    }

    /// Adds one conformance resource (a Bundle adds each entry's resource).
    pub fn add_resource(&mut self, source: &str, resource: Json) {
        if resource.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
            let entries = resource.get("entry").and_then(Json::as_array).unwrap_or_default();
            for (i, entry) in entries.iter().enumerate() {
                if let Some(inner) = entry.get("resource") {
                    self.add_resource(&format!("{source}#entry[{i}]"), inner.clone());
                }
            }
            return;
        }
        if let Some(resource) = PackageResource::from_json(source.to_string(), resource) {
            self.add_package_resource(resource);
        }
    }

    /// Loads a package given as a path (`.tgz` or folder) or as `id#version` from the FHIR package cache.
    pub fn load_package_reference(&mut self, reference: &str, cache: Option<&Path>) -> Result<(), LoadPackageError> {
        self.add_package(Package::from_reference(reference, cache)?);
        Ok(())
    }

    fn add_package_resource(&mut self, resource: PackageResource) {
        let index = self.resources.len();
        if let Some(url) = &resource.url {
            self.by_url.entry(url.clone()).or_default().push(index);
        }
        self.resources.push(Arc::new(resource));
        // A new resource may change what an URL resolves to.
        self.structures.get_mut().map(HashMap::clear).unwrap_or(());
        self.types.get_mut().map(HashMap::clear).unwrap_or(());
        self.children.get_mut().map(HashMap::clear).unwrap_or(());
        self.orders.get_mut().map(HashMap::clear).unwrap_or(());
    }

    /// The packages loaded, as `name#version`.
    pub fn packages(&self) -> &[String] {
        &self.packages
    }

    /// Resolves a canonical reference (`url` or `url|version`) to the resource entry.
    pub fn resolve_entry(&self, canonical: &str) -> Option<&Arc<PackageResource>> {
        let (url, version) = match canonical.split_once('|') {
            Some((u, v)) => (u, Some(v)),
            None => (canonical, None),
        };
        let candidates = self.by_url.get(url)?;
        match version {
            Some(v) => candidates
                .iter()
                .rev()
                .map(|&i| &self.resources[i])
                .find(|r| r.version.as_deref().is_some_and(|rv| rv == v || version_matches(rv, v))),
            None => candidates.iter().rev().map(|&i| &self.resources[i]).max_by(|a, b| compare_versions(a.version.as_deref(), b.version.as_deref())),
        }
    }

    /// Resolves a canonical reference to the parsed resource.
    pub fn resolve(&self, canonical: &str) -> Option<Arc<Json>> {
        self.resolve_entry(canonical)?.resource()
    }

    /// All resources of one type (for listings such as `mappings check`).
    pub fn resources_of_type<'a>(&'a self, resource_type: &'a str) -> impl Iterator<Item = &'a Arc<PackageResource>> + 'a {
        self.resources.iter().filter(move |r| r.resource_type == resource_type)
    }

    /// The compiled StructureDefinition for a canonical URL (generating its snapshot if it has none).
    pub fn structure(&self, canonical: &str) -> Option<Arc<Structure>> {
        if let Some(cached) = self.structures.read().ok()?.get(canonical) {
            return cached.clone();
        }
        // Canonicals come from input (meta.profile, extension urls): only answers about loaded
        // resources are cached, so hostile input cannot grow the cache without bound.
        self.resolve_entry(canonical)?;
        let compiled = self.compile_structure(canonical);
        if let Ok(mut cache) = self.structures.write() {
            cache.insert(canonical.to_string(), compiled.clone());
        }
        compiled
    }

    /// The base StructureDefinition of a FHIR type (`Patient`, `HumanName`, `string`).
    pub fn type_structure(&self, type_name: &str) -> Option<Arc<Structure>> {
        // The walk asks for the type of elements that have none (backbone elements) often.
        if type_name.is_empty() {
            return None;
        }
        if type_name.starts_with("http:") || type_name.starts_with("https:") {
            return self.structure(type_name);
        }
        if let Some(hit) = self.types.read().ok()?.get(type_name) {
            return Some(hit.clone());
        }
        let structure = self.structure(&format!("{CORE_SD_BASE}{type_name}"))?;
        if let Ok(mut types) = self.types.write() {
            types.insert(type_name.into(), structure.clone());
        }
        Some(structure)
    }

    fn compile_structure(&self, canonical: &str) -> Option<Arc<Structure>> {
        let entry = self.resolve_entry(canonical)?;
        if entry.resource_type != "StructureDefinition" {
            return None;
        }
        let resource = entry.resource()?;
        let result = if resource.get("snapshot").is_some() {
            Structure::compile(&resource)
        } else {
            snapshot::generate(&resource, self).and_then(|snapshot| Structure::compile(&snapshot))
        };
        match result {
            Ok(mut structure) => {
                // A profile has the kind of the type it constrains, whatever it declares (some say complex-type for a resource).
                if !structure.derivation_is_specialization() && structure.kind != StructureKind::Logical {
                    let base_kind = self.type_structure(&structure.type_name).filter(|b| b.url != structure.url).map(|b| b.kind);
                    if let Some(kind) = base_kind {
                        structure.kind = kind;
                    }
                }
                Some(Arc::new(structure))
            }
            Err(problem) => {
                if let Ok(mut problems) = self.compile_problems.write() {
                    problems.push(format!("{}: {problem}", entry.source));
                }
                None
            }
        }
    }

    /// Why the snapshot of a differential-only StructureDefinition cannot be generated, if it cannot.
    ///
    /// A profile whose differential does not fit its base is broken even when no instance uses it yet.
    pub fn snapshot_problem(&self, structure_definition: &Json) -> Option<String> {
        if structure_definition.get("snapshot").is_some() || structure_definition.get("differential").is_none() {
            return None;
        }
        let base = structure_definition.get("baseDefinition").and_then(Json::as_str)?;
        // A base that is not loaded is reported where it is used; here nothing can be said.
        self.resolve_entry(base)?;
        snapshot::generate(structure_definition, self).err()
    }

    /// Problems met while compiling profiles so far (a profile that cannot be used is not silently ignored).
    pub fn compile_problems(&self) -> Vec<String> {
        self.compile_problems.read().map(|p| p.clone()).unwrap_or_default()
    }

    /// Whether `type_name` names a resource type of the base specification.
    pub fn is_resource_type(&self, type_name: &str) -> bool {
        self.type_structure(type_name).is_some_and(|s| s.kind == StructureKind::Resource && s.derivation_is_specialization())
    }

    /// The names of the children of a type or backbone element path, in definition order, slices left out.
    fn compute_order(&self, type_name: &str) -> Option<Vec<String>> {
        let root = type_name.split('.').next()?;
        let structure = self.type_structure(root)?;
        let mut index = structure.index_of_path(type_name)?;
        if let Some(reference) = &structure.elements[index].content_reference {
            index = structure.index_of_path(reference.trim_start_matches('#'))?;
        }
        let mut names: Vec<String> = Vec::new();
        for &child in structure.children(index) {
            let element = &structure.elements[child];
            if element.slice_name.is_none() && !names.contains(&element.name) {
                names.push(element.name.clone());
            }
        }
        Some(names)
    }

    fn compute_child(&self, parent: &str, name: &str) -> Option<ChildElement> {
        let root = parent.split('.').next()?;
        let structure = self.type_structure(root)?;
        let parent_index = structure.index_of_path(parent)?;
        let child_index = structure.child_named(parent_index, name)?;
        let element = &structure.elements[child_index];
        let types = if let Some(reference) = &element.content_reference {
            vec![reference.trim_start_matches('#').to_string()]
        } else {
            element
                .types
                .iter()
                .map(|t| if t.code == "BackboneElement" || t.code == "Element" && element.path.contains('.') { element.path.clone() } else { t.code.clone() })
                .collect()
        };
        Some(ChildElement { types, is_choice: element.is_choice(), many: element.max != Some(1) })
    }
}

impl TypeModel for Definitions {
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement> {
        let key = (parent.to_string(), name.to_string());
        if let Some(found) = self.children.read().ok()?.get(&key) {
            return found.clone();
        }
        let computed = self.compute_child(parent, name);
        // Element names come from input; unknown ones are not remembered (see `structure`).
        if computed.is_some()
            && let Ok(mut cache) = self.children.write()
        {
            cache.insert(key, computed.clone());
        }
        computed
    }

    fn element_order(&self, type_name: &str) -> Option<Vec<String>> {
        if let Some(found) = self.orders.read().ok()?.get(type_name) {
            return found.as_deref().cloned();
        }
        let computed = self.compute_order(type_name).map(Arc::new);
        if let Ok(mut cache) = self.orders.write() {
            cache.insert(type_name.to_string(), computed.clone());
        }
        computed.as_deref().cloned()
    }

    fn base_type(&self, type_name: &str) -> Option<String> {
        if type_name.contains('.') {
            return Some("BackboneElement".to_string());
        }
        let structure = self.type_structure(type_name)?;
        let base = structure.base_definition.as_deref()?;
        Some(base.strip_prefix(CORE_SD_BASE).unwrap_or(base).to_string())
    }
}

/// `4.0` matches `4.0.1`: a shorter version pins only the parts it gives (FHIR package convention).
fn version_matches(actual: &str, wanted: &str) -> bool {
    actual.starts_with(wanted) && actual.as_bytes().get(wanted.len()) == Some(&b'.')
}

fn compare_versions(a: Option<&str>, b: Option<&str>) -> std::cmp::Ordering {
    let parts = |v: Option<&str>| -> Vec<u64> { v.unwrap_or("").split(['.', '-']).map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_core_types_and_children() {
        let definitions = Definitions::base();
        let patient = definitions.type_structure("Patient").expect("Patient");
        assert_eq!(patient.type_name, "Patient");
        assert_eq!(definitions.child("Patient", "name").map(|c| (c.types, c.many)), Some((vec!["HumanName".to_string()], true)));
        assert_eq!(definitions.child("Patient", "contact").map(|c| c.types), Some(vec!["Patient.contact".to_string()]));
        assert_eq!(definitions.child("Patient.contact", "name").map(|c| c.types), Some(vec!["HumanName".to_string()]));
        let value = definitions.child("Observation", "value").expect("value[x]");
        assert!(value.is_choice && value.types.contains(&"Quantity".to_string()));
        assert_eq!(definitions.child("Questionnaire.item", "item").map(|c| c.types), Some(vec!["Questionnaire.item".to_string()]));
        assert_eq!(definitions.base_type("Patient").as_deref(), Some("DomainResource"));
        assert_eq!(definitions.base_type("code").as_deref(), Some("string"));
        assert!(definitions.child("Patient", "nickname").is_none());
    }

    #[test]
    fn gives_element_order_for_the_xml_reader() {
        let definitions = Definitions::base();
        let order = definitions.element_order("Patient").expect("Patient");
        let at = |name: &str| order.iter().position(|n| n == name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(at("id") < at("meta") && at("identifier") < at("active") && at("active") < at("name"));
        assert!(order.contains(&"deceased".to_string()));
        let contact = definitions.element_order("Patient.contact").expect("Patient.contact");
        assert!(contact.iter().position(|n| n == "relationship") < contact.iter().position(|n| n == "name"));
        assert_eq!(definitions.element_order("Questionnaire.item.item"), definitions.element_order("Questionnaire.item"));
    }

    #[test]
    fn exchange_packages_compile_and_win_unversioned_canonicals() {
        let definitions = Definitions::new_with_exchange_packages();
        assert!(definitions.packages().ends_with(&["hl7.fhir.us.core#6.1.0".to_string(), "hl7.fhir.us.davinci-pas#2.2.1".to_string()]));
        // Every profile and extension of the IGs compiles from its prose-free snapshot.
        let urls: Vec<String> = definitions
            .resources_of_type("StructureDefinition")
            .filter(|r| r.source.starts_with("hl7.fhir.us."))
            .filter_map(|r| r.url.clone())
            .collect();
        assert!(urls.len() > 130, "{} structures", urls.len());
        for url in &urls {
            assert!(definitions.structure(url).is_some(), "{url} does not compile");
        }
        assert_eq!(definitions.compile_problems(), Vec::<String>::new());
        // The mappings claim US Core without a version: that is 6.1.0, the version PAS 2.2.1 complies with.
        let patient = definitions.resolve_entry("http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient").expect("US Core Patient");
        assert_eq!(patient.version.as_deref(), Some("6.1.0"));
        let request = definitions.structure("http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-pas-request-bundle|2.2.1");
        assert_eq!(request.map(|s| s.type_name.clone()).as_deref(), Some("Bundle"));
        // The R4-only and default sets are untouched.
        assert!(Definitions::new_default().resolve("http://hl7.org/fhir/us/davinci-pas/StructureDefinition/profile-claim").is_none());
    }

    #[test]
    fn resolves_versions() {
        let definitions = Definitions::base();
        assert!(definitions.resolve("http://hl7.org/fhir/ValueSet/administrative-gender|4.0.1").is_some());
        assert!(definitions.resolve("http://hl7.org/fhir/ValueSet/administrative-gender|4.0").is_some());
        assert!(definitions.resolve("http://hl7.org/fhir/ValueSet/administrative-gender|3.0.2").is_none());
    }
}
