//! FHIRPath (N1, as used by FHIR R4): parse expressions and evaluate them over [`crate::json::Json`] resources.
//!
//! The engine is untyped JSON plus a [`TypeModel`] that tells it the declared FHIR type of each
//! element, which `is`, `as`, `ofType`, choice elements (`Observation.value`) and primitive
//! conversions need. The validator supplies a model built from the loaded StructureDefinitions.

/// What the engine needs to know about FHIR types; implemented from StructureDefinitions.
///
/// A type is named by its FHIR type code (`Patient`, `HumanName`, `string`) or, for an anonymous
/// BackboneElement, by its element path (`Patient.contact`, `Questionnaire.item`).
pub trait TypeModel: Send + Sync {
    /// The declared child `name` of a value of type `parent`, or `None` when the model has no such element.
    fn child(&self, parent: &str, name: &str) -> Option<ChildElement>;

    /// The type `type_name` derives from (`Patient` → `DomainResource`, `code` → `string`), if any.
    fn base_type(&self, type_name: &str) -> Option<String>;
}

/// One declared child element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildElement {
    /// Its possible types; more than one only for choice elements (`value[x]`).
    pub types: Vec<String>,
    /// Whether the element is a choice (`value[x]`), spelled `valueQuantity` etc. in JSON.
    pub is_choice: bool,
    /// Whether the element may repeat (max is not 1).
    pub many: bool,
}
