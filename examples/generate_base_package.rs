//! Generates the compiled-in, prose-free FHIR packages of `definitions/` (the R4 base and the exchange IGs) from official packages.
//!
//! Usage: `cargo run --example generate_base_package -- PATH/TO/PACKAGE.tgz [OUTPUT.tgz]`
//! (the source defaults to `../shared/corpus/definitions/packages/hl7.fhir.r4.core-4.0.1.tgz`).
//! The output defaults to `definitions/hl7.fhir.r4.core.tgz` for the R4 base, whose name the
//! build has always used, and to `definitions/<name>-<version>.tgz` for any other package, since
//! several versions of one IG (US Core) may be bundled side by side.
//!
//! The same reduction serves the base and implementation guides: an IG's profiles, extensions,
//! ValueSets, CodeSystems and SearchParameters are read exactly like the base's, and its
//! CapabilityStatements, ImplementationGuide, examples and other documentation are dropped.
//! An IG's `package.json` keeps its `dependencies`, so a reader can see what the IG declares even
//! where the gateway bundles only part of it (see `definitions/README.md`).
//!
//! The output keeps only what software reads: snapshots without their prose (`short`,
//! `definition`, `comment`, `requirements`, mappings, examples), ValueSet composes, CodeSystem
//! concept trees without definitions or designations, SearchParameters, OperationDefinitions and
//! CompartmentDefinitions. Narrative (`text`), descriptions, contacts and other documentation are
//! dropped. The result is an ordinary FHIR NPM package, so the runtime loads it with the same code
//! as any other package.

use std::io::Read;

use iop_gateway::json::{self, Json, Object};

/// Resource types carried into the base package; everything else is documentation or examples.
const KEPT_TYPES: &[&str] =
    &["StructureDefinition", "ValueSet", "CodeSystem", "SearchParameter", "OperationDefinition", "CompartmentDefinition"];

/// Members kept on every kept resource, whatever its type.
const COMMON: &[&str] = &["resourceType", "id", "url", "version", "name", "status", "experimental"];

fn main() {
    let source = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/corpus/definitions/packages/hl7.fhir.r4.core-4.0.1.tgz".to_string());
    let output = std::env::args().nth(2);
    let bytes = std::fs::read(&source).unwrap_or_else(|e| panic!("cannot read {source}: {e}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut n_read = 0;
    let mut manifest = None;
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("tar path").to_string_lossy().into_owned();
        let Some(name) = path.strip_prefix("package/") else { continue };
        if name.contains('/') || !name.ends_with(".json") {
            continue;
        }
        let mut content = Vec::new();
        entry.read_to_end(&mut content).expect("tar read");
        if name == "package.json" {
            manifest = Some(json::parse(&content).expect("package.json is JSON"));
            continue;
        }
        n_read += 1;
        let Ok(Json::Object(resource)) = json::parse(&content) else { continue };
        let Some(resource_type) = resource.get("resourceType").and_then(Json::as_str) else { continue };
        if !KEPT_TYPES.contains(&resource_type) {
            continue;
        }
        let Some(stripped) = strip_resource(resource_type, &resource) else { continue };
        files.push((name.to_string(), Json::Object(stripped).to_string_compact().into_bytes()));
    }
    let manifest = manifest.unwrap_or_else(|| panic!("{source} has no package/package.json"));
    let text = |key: &str| manifest.get(key).and_then(Json::as_str).unwrap_or_else(|| panic!("package.json has no {key}")).to_string();
    let (name, version) = (text("name"), text("version"));
    let output = output.unwrap_or_else(|| default_output(&name, &version));
    files.push(("package.json".to_string(), strip_manifest(&manifest, &name, &version).into_bytes()));
    files.sort();
    let index = build_index(&files);
    files.insert(0, (".index.json".to_string(), index.into_bytes()));

    let out = std::fs::File::create(&output).unwrap_or_else(|e| panic!("cannot create {output}: {e}"));
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    let mut builder = tar::Builder::new(gz);
    let mut n_bytes = 0;
    for (name, content) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, format!("package/{name}"), &content[..]).expect("tar write");
        n_bytes += content.len();
    }
    builder.into_inner().expect("tar finish").finish().expect("gzip finish");
    eprintln!("read {n_read} resources, wrote {} files ({n_bytes} bytes before compression) to {output}", files.len());
}

/// Where a package is written when no output is given: the R4 base keeps the name `src/package.rs` embeds.
fn default_output(name: &str, version: &str) -> String {
    if name == "hl7.fhir.r4.core" { "definitions/hl7.fhir.r4.core.tgz".to_string() } else { format!("definitions/{name}-{version}.tgz") }
}

fn strip_manifest(manifest: &Json, name: &str, version: &str) -> String {
    let mut out = Object::new();
    for key in ["name", "version", "fhirVersions", "type", "license", "canonical", "url", "dependencies"] {
        if let Some(v) = manifest.get(key) {
            out.insert(key, v.clone());
        }
    }
    out.insert(
        "description",
        Json::string(format!("{name} {version} reduced to machine-readable content by iop-gateway (examples/generate_base_package.rs)")),
    );
    Json::Object(out).to_string_pretty()
}

fn keep(source: &Object, names: &[&str]) -> Object {
    let mut out = Object::new();
    for (k, v) in source.iter() {
        if names.contains(&k) || COMMON.contains(&k) {
            out.insert(k, v.clone());
        }
    }
    out
}

fn strip_resource(resource_type: &str, resource: &Object) -> Option<Object> {
    Some(match resource_type {
        "StructureDefinition" => {
            let mut out = keep(
                resource,
                &[
                    "fhirVersion",
                    "kind",
                    "abstract",
                    "contextType",
                    "context",
                    "contextInvariant",
                    "type",
                    "baseDefinition",
                    "derivation",
                ],
            );
            let snapshot = resource.get("snapshot")?.get("element")?.as_array()?;
            let elements = snapshot.iter().filter_map(Json::as_object).map(strip_element).map(Json::Object).collect();
            let mut snapshot_out = Object::new();
            snapshot_out.insert("element", Json::Array(elements));
            out.insert("snapshot", Json::Object(snapshot_out));
            out
        }
        "ValueSet" => {
            let mut out = keep(resource, &["immutable", "compose", "expansion"]);
            if let Some(Json::Object(compose)) = out.get_mut("compose") {
                strip_designations(compose);
            }
            out
        }
        "CodeSystem" => {
            let mut out = keep(
                resource,
                &["caseSensitive", "valueSet", "hierarchyMeaning", "compositional", "versionNeeded", "content", "supplements", "count", "filter", "property", "concept"],
            );
            if let Some(Json::Array(concepts)) = out.get_mut("concept") {
                strip_concepts(concepts);
            }
            if let Some(Json::Array(properties)) = out.get_mut("property") {
                for p in properties.iter_mut().filter_map(Json::as_object_mut) {
                    p.remove("description");
                }
            }
            out
        }
        "SearchParameter" => keep(
            resource,
            &["code", "base", "type", "expression", "xpathUsage", "target", "multipleOr", "multipleAnd", "comparator", "modifier", "chain", "component"],
        ),
        "OperationDefinition" => {
            let mut out = keep(resource, &["kind", "code", "resource", "system", "type", "instance", "affectsState", "parameter"]);
            if let Some(Json::Array(parameters)) = out.get_mut("parameter") {
                strip_documentation(parameters);
            }
            out
        }
        "CompartmentDefinition" => {
            let mut out = keep(resource, &["code", "search", "resource"]);
            if let Some(Json::Array(entries)) = out.get_mut("resource") {
                strip_documentation(entries);
            }
            out
        }
        _ => return None,
    })
}

/// Keeps what validation, FHIRPath typing and XML reading need from one snapshot element.
fn strip_element(element: &Object) -> Object {
    const KEPT: &[&str] = &[
        "id",
        "path",
        "representation",
        "sliceName",
        "sliceIsConstraining",
        "slicing",
        "min",
        "max",
        "base",
        "contentReference",
        "type",
        "maxLength",
        "condition",
        "constraint",
        "mustSupport",
        "isModifier",
        "isSummary",
        "binding",
    ];
    let mut out = Object::new();
    for (k, v) in element.iter() {
        let is_value = ["fixed", "pattern", "minValue", "maxValue", "defaultValue"].iter().any(|p| k.starts_with(p));
        if KEPT.contains(&k) || is_value {
            out.insert(k, v.clone());
        }
    }
    if let Some(Json::Object(slicing)) = out.get_mut("slicing") {
        slicing.remove("description");
    }
    if let Some(Json::Object(binding)) = out.get_mut("binding") {
        binding.remove("description");
        binding.remove("extension");
    }
    if let Some(Json::Array(constraints)) = out.get_mut("constraint") {
        for c in constraints.iter_mut().filter_map(Json::as_object_mut) {
            c.remove("xpath");
            c.remove("requirements");
            c.remove("extension");
        }
    }
    out
}

fn strip_concepts(concepts: &mut [Json]) {
    for concept in concepts.iter_mut().filter_map(Json::as_object_mut) {
        concept.remove("definition");
        concept.remove("designation");
        concept.remove("extension");
        if let Some(Json::Array(children)) = concept.get_mut("concept") {
            strip_concepts(children);
        }
    }
}

fn strip_designations(compose: &mut Object) {
    for part in ["include", "exclude"] {
        if let Some(Json::Array(sets)) = compose.get_mut(part) {
            for set in sets.iter_mut().filter_map(Json::as_object_mut) {
                if let Some(Json::Array(concepts)) = set.get_mut("concept") {
                    for c in concepts.iter_mut().filter_map(Json::as_object_mut) {
                        c.remove("designation");
                        c.remove("extension");
                    }
                }
            }
        }
    }
}

fn strip_documentation(items: &mut [Json]) {
    for item in items.iter_mut().filter_map(Json::as_object_mut) {
        item.remove("documentation");
        if let Some(Json::Array(parts)) = item.get_mut("part") {
            strip_documentation(parts);
        }
    }
}

/// Writes the `.index.json` of the FHIR package specification so loaders find resources without parsing them.
fn build_index(files: &[(String, Vec<u8>)]) -> String {
    let mut entries = Vec::new();
    for (name, content) in files {
        let Ok(resource) = json::parse(content) else { continue };
        let mut entry = Object::new();
        entry.insert("filename", Json::string(name.as_str()));
        for key in ["resourceType", "id", "url", "version", "kind", "type"] {
            if let Some(v) = resource.get(key).filter(|v| v.as_str().is_some()) {
                entry.insert(key, v.clone());
            }
        }
        if resource.get("resourceType").is_some() {
            entries.push(Json::Object(entry));
        }
    }
    let mut index = Object::new();
    index.insert("index-version", Json::Number("1".into()));
    index.insert("files", Json::Array(entries));
    Json::Object(index).to_string_compact()
}
