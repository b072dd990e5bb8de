//! The mapping file format as written (TOML), before any checking: the doc comments here are the reference for `mappings/*.toml`.
//!
//! Every value keeps its byte span so that the compiler can name the line of a problem.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// One mapping file: `<record_type>.to-fhir.toml` or `<record_type>.from-fhir.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingFile {
    /// The IOP record type this file maps (`session`); its schema is `<record>.schema.json`.
    pub record: Spanned<String>,
    /// `to-fhir` (an IOP record becomes FHIR resources) or `from-fhir` (FHIR resources become an IOP record).
    pub direction: Spanned<String>,
    /// Code maps, by name: source value → target value. For `to-fhir`, a target is a FHIR code
    /// (`"finished"`) or a Coding (`{ system = "http://loinc.org", code = "44249-1" }`); for
    /// `from-fhir` the source is a FHIR code and the target an IOP value.
    #[serde(default)]
    pub codes: BTreeMap<String, Spanned<BTreeMap<String, Spanned<toml::Value>>>>,
    /// `to-fhir`: the resources one record produces.
    #[serde(default)]
    pub resource: Vec<ResourceSpec>,
    /// `from-fhir`: the resource type of which each instance in the input yields one record (`Task`).
    pub focus: Option<Spanned<String>>,
    /// `from-fhir`: only focus resources whose `meta.profile` or code match this condition (FHIR paths).
    pub focus_when: Option<Spanned<String>>,
    /// `from-fhir`: the rules filling the record; `path` is the record path, `from` a FHIR path relative to the focus resource.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
}

/// One FHIR resource (or one per element, with `each`) produced from a record.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// A name for references from other resources of the same file (`ref = "encounter"`).
    pub name: Spanned<String>,
    /// The FHIR resource type.
    #[serde(rename = "type")]
    pub resource_type: Spanned<String>,
    /// Profiles the resource claims (`meta.profile`); each loaded one is checked against every rule's target path.
    #[serde(default)]
    pub profiles: Vec<Spanned<String>>,
    /// A profile that depends on a record value (`{ from = "instrument", codes = "panel_profile" }`): the
    /// code map gives the canonical for each value, and it is claimed before the fixed `profiles`.
    pub profile_by: Option<Spanned<ProfileBy>>,
    /// The identity of the resource as a template over record values (`"screening:{id}:item:{items[*].number}"`).
    /// The resource id is a hash of the resource type and this text, so a re-sent record updates the same resource.
    pub id: Spanned<String>,
    /// One resource per element of this record array (`items[*]`).
    pub each: Option<Spanned<String>>,
    /// Only produce the resource when this condition holds.
    pub when: Option<Spanned<String>>,
    /// For a `Bundle` of type `collection`: the name of the resource of this file that is its first
    /// entry. When the whole batch is mapped, the gateway adds that resource and every resource it
    /// references, transitively, from the batch's output (each once), so the Bundle stands on its
    /// own (a PAS request Bundle: the Claim first, then its Patient, Coverage, payer, provider, ...).
    pub collect: Option<Spanned<String>>,
    /// The resource adds to the resource of the same identity that another record of the batch
    /// produces (a discharge finishes the enrollment's EpisodeOfCare) instead of standing alone:
    /// objects merge member by member, values and lists replace, except lists of extensions, which
    /// merge by `url`. A batch without that other resource is an error.
    #[serde(default)]
    pub merge: bool,
    /// How the resource is filled, in order.
    #[serde(default)]
    pub rules: Vec<Spanned<RuleSpec>>,
}

/// A record value and the code map that turns it into a profile canonical.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileBy {
    pub from: Spanned<String>,
    pub codes: Spanned<String>,
}

/// Sets one target path. Exactly one of `value`, `from`, `ref` says where the value comes from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The target path, relative to the resource (`identifier[system=http://x].value`) or to the record.
    pub path: Spanned<String>,
    /// A constant (a string, number, boolean, or a table for a complex value such as a Coding).
    pub value: Option<Spanned<toml::Value>>,
    /// A source path (`birth_date`, `contacts[*].phone`, `@score.total`).
    pub from: Option<Spanned<String>>,
    /// Translate the source value through this code map.
    pub codes: Option<Spanned<String>>,
    /// Instead of `from`: a template whose text is looked up in `codes`, for codes that depend on
    /// several values (`"{instrument}:{items[*].number}"` picks an instrument's item code).
    pub key: Option<Spanned<String>>,
    /// Text rendered from record values (`"<div xmlns=\"http://www.w3.org/1999/xhtml\">Plan {id}</div>"`);
    /// values going into `xhtml` are escaped. The rule is skipped when a value is absent.
    pub text: Option<Spanned<String>>,
    /// A Reference: to a resource of this file by its `name`, or to a resource type when `id` is given.
    #[serde(rename = "ref")]
    pub reference: Option<Spanned<String>>,
    /// The 1-based position of each element of this record array (`"diagnoses[*]"`), for the
    /// `sequence` numbers that FHIR lists cross-reference (`Claim.diagnosis.sequence`, `item.diagnosisSequence`).
    pub position: Option<Spanned<String>>,
    /// With `ref = "<ResourceType>"`: the id template of the referenced resource (`"client:{client_id}"`).
    pub id: Option<Spanned<String>>,
    /// Only apply the rule when this condition holds.
    pub when: Option<Spanned<String>>,
}

/// The 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}
