//! Local terminology: CodeSystem lookups and ValueSet membership from loaded packages only, with no terminology server.
//!
//! An expansion records which codes are in a ValueSet and which code systems it includes but
//! that are not loaded (or not enumerable, like UCUM or SNOMED CT): a code from such a system can
//! be neither confirmed nor refuted, which the validator reports as a warning.

use foldhash::{HashMap, HashMapExt};
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::definitions::Definitions;
use crate::json::Json;

/// Deepest ValueSet-includes-ValueSet chain followed (cycles exist in broken packages).
const MAX_NESTING: usize = 12;

/// A CodeSystem reduced to its codes.
#[derive(Debug, Default)]
pub struct CodeSystemCodes {
    pub case_sensitive: bool,
    /// `true` when the resource lists every code (`content = complete`).
    pub complete: bool,
    /// A supplement adds to another code system and defines no codes of its own.
    pub supplement: bool,
    /// code → (display, parent codes)
    pub concepts: HashMap<String, Concept>,
}

#[derive(Debug, Default)]
pub struct Concept {
    pub display: Option<String>,
    pub parents: Vec<String>,
    /// Marked `notSelectable`/`abstract` in the CodeSystem.
    pub abstract_: bool,
}

impl CodeSystemCodes {
    pub fn lookup(&self, code: &str) -> Option<&Concept> {
        if self.case_sensitive {
            return self.concepts.get(code);
        }
        self.concepts.get(code).or_else(|| self.concepts.iter().find(|(k, _)| k.eq_ignore_ascii_case(code)).map(|(_, v)| v))
    }

    fn is_a(&self, code: &str, ancestor: &str) -> bool {
        let mut seen = HashSet::new();
        let mut stack = vec![code.to_string()];
        while let Some(current) = stack.pop() {
            if current == ancestor {
                return true;
            }
            if !seen.insert(current.clone()) {
                continue;
            }
            if let Some(concept) = self.concepts.get(&current) {
                stack.extend(concept.parents.iter().cloned());
            }
        }
        false
    }
}

/// The membership of a ValueSet as far as local definitions allow.
#[derive(Debug, Default)]
pub struct Expansion {
    /// (system, code) pairs known to be in the ValueSet.
    pub codes: HashSet<(String, String)>,
    /// Systems included wholly or by filter whose codes cannot be enumerated here.
    pub unchecked_systems: HashSet<String>,
    /// Why the expansion is incomplete, if it is (a missing nested ValueSet, an unsupported filter).
    pub incomplete: Option<String>,
    /// The systems of each code in `codes`, built on first use: a membership check then neither
    /// allocates nor scans.
    by_code: std::sync::OnceLock<HashMap<String, Vec<String>>>,
}

/// What a membership check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Membership {
    In,
    NotIn,
    /// The answer needs a code system or ValueSet that is not loaded.
    Unknown(String),
}

impl Expansion {
    fn systems_of(&self, code: &str) -> Option<&[String]> {
        let by_code = self.by_code.get_or_init(|| {
            let mut by_code: HashMap<String, Vec<String>> = HashMap::new();
            for (system, code) in &self.codes {
                by_code.entry(code.clone()).or_default().push(system.clone());
            }
            by_code
        });
        by_code.get(code).map(Vec::as_slice)
    }

    pub fn contains(&self, system: Option<&str>, code: &str) -> Membership {
        match system {
            Some(system) => {
                if self.systems_of(code).is_some_and(|systems| systems.iter().any(|s| s == system)) {
                    Membership::In
                } else if self.unchecked_systems.contains(system) {
                    Membership::Unknown(format!("the code system {system} is not available here"))
                } else if let Some(why) = &self.incomplete {
                    Membership::Unknown(why.clone())
                } else {
                    Membership::NotIn
                }
            }
            // A bare `code` element: its system is implied by the binding.
            None => {
                if self.systems_of(code).is_some() {
                    Membership::In
                } else if let Some(why) = &self.incomplete {
                    Membership::Unknown(why.clone())
                } else if !self.unchecked_systems.is_empty() {
                    Membership::Unknown("the ValueSet includes code systems that are not available here".to_string())
                } else {
                    Membership::NotIn
                }
            }
        }
    }
}

/// Caches code systems and expansions over one set of definitions.
#[derive(Debug, Default)]
pub struct Terminology {
    code_systems: RwLock<HashMap<String, Option<Arc<CodeSystemCodes>>>>,
    expansions: RwLock<HashMap<String, Option<Arc<Expansion>>>>,
}

impl Terminology {
    pub fn code_system(&self, definitions: &Definitions, url: &str) -> Option<Arc<CodeSystemCodes>> {
        if let Some(found) = self.code_systems.read().ok()?.get(url) {
            return found.clone();
        }
        // Code system URLs come from input: only loaded ones are cached, so the cache stays bounded.
        definitions.resolve_entry(url)?;
        let built = definitions
            .resolve(url)
            .filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("CodeSystem"))
            .map(|r| Arc::new(build_code_system(&r)));
        if let Ok(mut cache) = self.code_systems.write() {
            cache.insert(url.to_string(), built.clone());
        }
        built
    }

    /// The expansion of a ValueSet, or `None` when the ValueSet is not loaded.
    pub fn expansion(&self, definitions: &Definitions, url: &str) -> Option<Arc<Expansion>> {
        self.expansion_at_depth(definitions, url, 0)
    }

    /// The expansion of a ValueSet resource that is not loaded by URL (a contained one); not cached.
    pub fn expand_resource(&self, definitions: &Definitions, value_set: &Json) -> Expansion {
        self.expand(definitions, value_set, 0)
    }

    fn expansion_at_depth(&self, definitions: &Definitions, url: &str, depth: usize) -> Option<Arc<Expansion>> {
        if let Some(found) = self.expansions.read().ok()?.get(url) {
            return found.clone();
        }
        if depth > MAX_NESTING {
            return None;
        }
        definitions.resolve_entry(url)?;
        let value_set = definitions.resolve(url).filter(|r| r.get("resourceType").and_then(Json::as_str) == Some("ValueSet"));
        let built = value_set.map(|vs| Arc::new(self.expand(definitions, &vs, depth)));
        if let Ok(mut cache) = self.expansions.write() {
            cache.insert(url.to_string(), built.clone());
        }
        built
    }

    fn expand(&self, definitions: &Definitions, value_set: &Json, depth: usize) -> Expansion {
        let mut expansion = Expansion::default();
        // A stored expansion (rare in packages) is authoritative when present.
        if let Some(contains) = value_set.get("expansion").and_then(|e| e.get("contains")).and_then(Json::as_array) {
            collect_contains(contains, &mut expansion.codes);
            return expansion;
        }
        let compose = &value_set["compose"];
        for include in compose["include"].as_array().unwrap_or_default() {
            self.apply_part(definitions, include, depth, &mut expansion, true);
        }
        for exclude in compose["exclude"].as_array().unwrap_or_default() {
            self.apply_part(definitions, exclude, depth, &mut expansion, false);
        }
        expansion
    }

    fn apply_part(&self, definitions: &Definitions, part: &Json, depth: usize, expansion: &mut Expansion, include: bool) {
        let mut selected: Option<HashSet<(String, String)>> = None;
        let mut unknown_systems = HashSet::new();
        let mut incomplete = None;
        if let Some(system) = part["system"].as_str() {
            let mut codes = HashSet::new();
            if let Some(concepts) = part["concept"].as_array() {
                for c in concepts {
                    if let Some(code) = c["code"].as_str() {
                        codes.insert((system.to_string(), code.to_string()));
                    }
                }
            } else {
                match self.code_system(definitions, system).filter(|cs| cs.complete) {
                    Some(cs) => {
                        let filters = part["filter"].as_array().unwrap_or_default();
                        for (code, _) in cs.concepts.iter() {
                            if filters.iter().all(|f| matches_filter(&cs, code, f)) {
                                codes.insert((system.to_string(), code.clone()));
                            }
                        }
                        if filters.iter().any(|f| !is_supported_filter(f)) {
                            incomplete = Some(format!("a filter on {system} is not supported locally"));
                        }
                    }
                    None => {
                        unknown_systems.insert(system.to_string());
                    }
                }
            }
            selected = Some(codes);
        }
        for nested in part["valueSet"].as_array().unwrap_or_default() {
            let Some(url) = nested.as_str() else { continue };
            match self.expansion_at_depth(definitions, url, depth + 1) {
                Some(inner) => {
                    let inner_codes: HashSet<(String, String)> = inner.codes.clone();
                    unknown_systems.extend(inner.unchecked_systems.iter().cloned());
                    if inner.incomplete.is_some() {
                        incomplete = inner.incomplete.clone();
                    }
                    selected = Some(match selected {
                        Some(s) => s.intersection(&inner_codes).cloned().collect(),
                        None => inner_codes,
                    });
                }
                None => incomplete = Some(format!("the ValueSet {url} is not loaded")),
            }
        }
        if include {
            expansion.codes.extend(selected.unwrap_or_default());
            expansion.unchecked_systems.extend(unknown_systems);
            if incomplete.is_some() {
                expansion.incomplete = incomplete;
            }
        } else if let Some(excluded) = selected {
            expansion.codes.retain(|c| !excluded.contains(c));
        }
    }
}

fn collect_contains(contains: &[Json], codes: &mut HashSet<(String, String)>) {
    for c in contains {
        if let (Some(system), Some(code)) = (c["system"].as_str(), c["code"].as_str()) {
            codes.insert((system.to_string(), code.to_string()));
        }
        if let Some(nested) = c["contains"].as_array() {
            collect_contains(nested, codes);
        }
    }
}

fn is_supported_filter(filter: &Json) -> bool {
    matches!(filter["op"].as_str(), Some("is-a" | "descendent-of" | "is-not-a" | "=" | "in"))
        && matches!(filter["property"].as_str(), Some("concept" | "code"))
}

fn matches_filter(cs: &CodeSystemCodes, code: &str, filter: &Json) -> bool {
    let value = filter["value"].as_str().unwrap_or_default();
    match (filter["property"].as_str(), filter["op"].as_str()) {
        (Some("concept" | "code"), Some("is-a")) => cs.is_a(code, value),
        (Some("concept" | "code"), Some("descendent-of")) => code != value && cs.is_a(code, value),
        (Some("concept" | "code"), Some("is-not-a")) => !cs.is_a(code, value),
        (Some("concept" | "code"), Some("=")) => code == value,
        (Some("concept" | "code"), Some("in")) => value.split(',').any(|v| v.trim() == code),
        // Unsupported filters select everything; the expansion is then marked incomplete.
        _ => true,
    }
}

fn build_code_system(resource: &Json) -> CodeSystemCodes {
    let mut codes = CodeSystemCodes {
        case_sensitive: resource["caseSensitive"].as_bool().unwrap_or(true),
        complete: matches!(resource["content"].as_str(), Some("complete") | None) && resource.get("supplements").is_none(),
        supplement: resource["content"].as_str() == Some("supplement") || resource.get("supplements").is_some(),
        concepts: HashMap::new(),
    };
    fn walk(concepts: &[Json], parent: Option<&str>, out: &mut HashMap<String, Concept>) {
        for c in concepts {
            let Some(code) = c["code"].as_str() else { continue };
            let abstract_ = c["property"].as_array().unwrap_or_default().iter().any(|p| {
                matches!(p["code"].as_str(), Some("notSelectable" | "abstract")) && p["valueBoolean"].as_bool() == Some(true)
            });
            let entry = out.entry(code.to_string()).or_default();
            entry.display = entry.display.take().or_else(|| c["display"].as_str().map(str::to_string));
            entry.abstract_ |= abstract_;
            if let Some(parent) = parent {
                entry.parents.push(parent.to_string());
            }
            if let Some(children) = c["concept"].as_array() {
                walk(children, Some(code), out);
            }
        }
    }
    walk(resource["concept"].as_array().unwrap_or_default(), None, &mut codes.concepts);
    // `subsumedBy` properties express hierarchy in flat code systems.
    for c in resource["concept"].as_array().unwrap_or_default() {
        let Some(code) = c["code"].as_str() else { continue };
        for p in c["property"].as_array().unwrap_or_default() {
            if p["code"].as_str() == Some("subsumedBy")
                && let (Some(parent), Some(entry)) = (p["valueCode"].as_str(), codes.concepts.get_mut(code))
            {
                entry.parents.push(parent.to_string());
            }
        }
    }
    codes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_core_value_sets() {
        let definitions = Definitions::base();
        let terminology = Terminology::default();
        let gender = terminology.expansion(&definitions, "http://hl7.org/fhir/ValueSet/administrative-gender").unwrap();
        assert_eq!(gender.contains(Some("http://hl7.org/fhir/administrative-gender"), "female"), Membership::In);
        assert_eq!(gender.contains(None, "robot"), Membership::NotIn);
        // observation-status excludes nothing but lists codes; a nested include via CodeSystem works.
        let status = terminology.expansion(&definitions, "http://hl7.org/fhir/ValueSet/observation-status|4.0.1").unwrap();
        assert_eq!(status.contains(None, "final"), Membership::In);
        // UCUM is not enumerable locally.
        let units = terminology.expansion(&definitions, "http://hl7.org/fhir/ValueSet/ucum-units").unwrap();
        assert!(matches!(units.contains(Some("http://unitsofmeasure.org"), "mg"), Membership::Unknown(_)));
    }
}
