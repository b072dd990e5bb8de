//! QuestionnaireResponse against its Questionnaire ([spec](https://hl7.org/fhir/R4/questionnaireresponse.html)): linkIds, required and repeating items, answer types, options, value sets, limits and enableWhen.
//!
//! The answers of a response only mean something relative to the questionnaire's items, so these
//! checks run once per response, after the structural walk, when its `questionnaire` resolves to
//! a loaded or contained Questionnaire. Missing required answers are errors only once the response
//! claims to be finished (`completed`, `amended`); while it is in progress they are information.

use std::cmp::Ordering;
use std::sync::Arc;

use crate::json::{Json, Object};
use crate::outcome::{IssueCode, Severity};

use super::terminology::{Expansion, Membership};
use super::walk::Walker;

const EXT_MIN_VALUE: &str = "http://hl7.org/fhir/StructureDefinition/minValue";
const EXT_MAX_VALUE: &str = "http://hl7.org/fhir/StructureDefinition/maxValue";
const EXT_MIN_LENGTH: &str = "http://hl7.org/fhir/StructureDefinition/minLength";
const EXT_MAX_DECIMALS: &str = "http://hl7.org/fhir/StructureDefinition/maxDecimalPlaces";
const EXT_MAX_OCCURS: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-maxOccurs";
const EXT_UNIT_OPTION: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-unitOption";
const EXT_UNIT_VALUE_SET: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-unitValueSet";
const EXT_REFERENCE_RESOURCE: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-referenceResource";
const EXT_OPTION_EXCLUSIVE: &str = "http://hl7.org/fhir/StructureDefinition/questionnaire-optionExclusive";
const EXT_MIN_QUANTITY: &str = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-minQuantity";
const EXT_MAX_QUANTITY: &str = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-maxQuantity";

/// How deep nested items are followed (questionnaires nest a few levels; this stops hostile input).
const MAX_ITEM_DEPTH: usize = 64;

struct Context<'q, 'a> {
    questionnaire: &'q Json,
    /// Whether the response claims to be finished, which makes missing required answers errors.
    finished: bool,
    /// The response's item lists from the root down to the one being checked, for enableWhen.
    scopes: Vec<&'a [Json]>,
}

/// Checks a QuestionnaireResponse against the Questionnaire it names; the walker's path is the response's.
pub(super) fn check<'a>(walker: &mut Walker<'_, 'a>, response: &'a Object) {
    let Some(canonical) = response.get("questionnaire").and_then(Json::as_str) else { return };
    let resolved: Option<Arc<Json>>;
    let questionnaire: &Json = if let Some(id) = canonical.strip_prefix('#') {
        let contained = response.get("contained").and_then(Json::as_array).unwrap_or_default();
        match contained.iter().find(|c| c.get("id").and_then(Json::as_str) == Some(id)) {
            Some(q) => q,
            None => return, // an unresolved contained reference is reported by the reference check
        }
    } else {
        resolved = walker.validator.definitions.resolve(canonical);
        match resolved.as_deref() {
            Some(q) => q,
            None => {
                walker.report(
                    Severity::Warning,
                    IssueCode::NotFound,
                    format!("the questionnaire '{canonical}' could not be found, so the answers were not checked against it"),
                );
                return;
            }
        }
    };
    if questionnaire.get("resourceType").and_then(Json::as_str) != Some("Questionnaire") {
        walker.error(IssueCode::Invalid, format!("'{canonical}' is not a Questionnaire"));
        return;
    }
    let finished = matches!(response.get("status").and_then(Json::as_str), Some("completed" | "amended"));
    let root_items = response.get("item").and_then(Json::as_array).unwrap_or_default();
    let mut context = Context { questionnaire, finished, scopes: vec![root_items] };
    let q_items = questionnaire.get("item").and_then(Json::as_array).unwrap_or_default();
    items(walker, &mut context, q_items, root_items, 0);
}

/// Checks the enableWhen conditions of a Questionnaire; the walker's path is the Questionnaire's.
///
/// An item's own answers (and those of the items inside it) only exist once it is enabled, so a
/// condition on them could never become true.
pub(super) fn check_definition(walker: &mut Walker<'_, '_>, questionnaire: &Object) {
    let items = questionnaire.get("item").and_then(Json::as_array).unwrap_or_default();
    definition_items(walker, items, 0);
}

fn definition_items(walker: &mut Walker<'_, '_>, items: &[Json], depth: usize) {
    if depth > MAX_ITEM_DEPTH {
        return;
    }
    let base_len = walker.path.len();
    for (i, item) in items.iter().enumerate() {
        walker.path.push_str(&format!(".item[{i}]"));
        let conditions = item.get("enableWhen").and_then(Json::as_array).unwrap_or_default();
        for condition in conditions {
            let Some(question) = condition.get("question").and_then(Json::as_str) else { continue };
            let mut inner = Vec::new();
            collect_link_ids(std::slice::from_ref(item), &mut inner, 0);
            if inner.contains(&question) {
                walker.error(IssueCode::BusinessRule, format!("the enableWhen condition refers to '{question}', which is this item or one inside it"));
            }
        }
        definition_items(walker, item.get("item").and_then(Json::as_array).unwrap_or_default(), depth + 1);
        walker.path.truncate(base_len);
    }
}

fn collect_link_ids<'j>(items: &'j [Json], out: &mut Vec<&'j str>, depth: usize) {
    if depth > MAX_ITEM_DEPTH {
        return;
    }
    for item in items {
        if let Some(link_id) = item.get("linkId").and_then(Json::as_str) {
            out.push(link_id);
        }
        collect_link_ids(item.get("item").and_then(Json::as_array).unwrap_or_default(), out, depth + 1);
    }
}

/// Matches a list of response items against the questionnaire items at the same level.
fn items<'a>(walker: &mut Walker<'_, 'a>, context: &mut Context<'_, 'a>, q_items: &[Json], qr_items: &'a [Json], depth: usize) {
    if depth > MAX_ITEM_DEPTH {
        return;
    }
    let base_len = walker.path.len();
    for (i, qr_item) in qr_items.iter().enumerate() {
        walker.path.push_str(&format!(".item[{i}]"));
        let link_id = qr_item.get("linkId").and_then(Json::as_str).unwrap_or_default();
        match q_items.iter().find(|q| q.get("linkId").and_then(Json::as_str) == Some(link_id)) {
            Some(q_item) => item(walker, context, q_item, qr_item, depth),
            None => walker.error(IssueCode::Structure, format!("linkId '{link_id}' is not an item of the questionnaire at this level")),
        }
        walker.path.truncate(base_len);
    }
    for q_item in q_items {
        let Some(link_id) = q_item.get("linkId").and_then(Json::as_str) else { continue };
        let matching: Vec<usize> =
            qr_items.iter().enumerate().filter(|(_, r)| r.get("linkId").and_then(Json::as_str) == Some(link_id)).map(|(i, _)| i).collect();
        let kind = q_item.get("type").and_then(Json::as_str).unwrap_or_default();
        let repeats = q_item.get("repeats").and_then(Json::as_bool).unwrap_or(false);
        if matching.len() > 1 && !(kind == "group" && repeats) {
            walker.path.push_str(&format!(".item[{}]", matching[1]));
            walker.error(IssueCode::Structure, format!("only one item with linkId '{link_id}' is allowed here (the item does not repeat)"));
            walker.path.truncate(base_len);
        }
        if matching.is_empty() && q_item.get("required").and_then(Json::as_bool) == Some(true) && kind != "display" && is_enabled(context, q_item) {
            missing_required(walker, context, link_id);
        }
    }
}

fn missing_required(walker: &mut Walker<'_, '_>, context: &Context<'_, '_>, link_id: &str) {
    let severity = if context.finished { Severity::Error } else { Severity::Information };
    walker.report(severity, IssueCode::Required, format!("no answer was found for the required item '{link_id}'"));
}

/// Checks one response item (the walker's path is the item's) against its questionnaire item.
fn item<'a>(walker: &mut Walker<'_, 'a>, context: &mut Context<'_, 'a>, q_item: &Json, qr_item: &'a Json, depth: usize) {
    let kind = q_item.get("type").and_then(Json::as_str).unwrap_or_default();
    let link_id = q_item.get("linkId").and_then(Json::as_str).unwrap_or_default();
    let answers = qr_item.get("answer").and_then(Json::as_array).unwrap_or_default();
    let children = qr_item.get("item").and_then(Json::as_array).unwrap_or_default();
    let q_children = q_item.get("item").and_then(Json::as_array).unwrap_or_default();
    let enabled = is_enabled(context, q_item);
    let required = q_item.get("required").and_then(Json::as_bool) == Some(true);

    if !enabled && (!answers.is_empty() || !children.is_empty()) {
        walker.error(IssueCode::Structure, format!("item '{link_id}' has answers, but it is not enabled (enableWhen)"));
    }
    if matches!(kind, "group" | "display") {
        if !answers.is_empty() {
            walker.error(IssueCode::Structure, format!("items of type {kind} cannot have answers"));
        }
        if kind == "group" {
            if required && enabled && children.is_empty() {
                let severity = if context.finished { Severity::Error } else { Severity::Information };
                walker.report(severity, IssueCode::Required, format!("the required group '{link_id}' has no items"));
            }
            context.scopes.push(children);
            items(walker, context, q_children, children, depth + 1);
            context.scopes.pop();
        }
        return;
    }

    if required && enabled && answers.is_empty() {
        missing_required(walker, context, link_id);
    }
    let repeats = q_item.get("repeats").and_then(Json::as_bool).unwrap_or(false);
    if !repeats && answers.len() > 1 {
        walker.error(IssueCode::Structure, format!("item '{link_id}' does not repeat, so it can have only one answer (found {})", answers.len()));
    }
    if let Some(max) = extension_value(q_item, EXT_MAX_OCCURS).and_then(as_number)
        && answers.len() as f64 > max
    {
        walker.error(IssueCode::Structure, format!("item '{link_id}' allows at most {max} answers, but has {}", answers.len()));
    }
    if !children.is_empty() {
        walker.error(IssueCode::Structure, format!("items nested in the question '{link_id}' belong in its answers (answer.item), not in item.item"));
    }

    let base_len = walker.path.len();
    let exclusive: Vec<&Json> = options(q_item).filter(|o| extension_value(o, EXT_OPTION_EXCLUSIVE).and_then(Json::as_bool) == Some(true)).collect();
    for (j, answer) in answers.iter().enumerate() {
        walker.path.push_str(&format!(".answer[{j}]"));
        if let Some((name, value)) = answer_value(answer) {
            if answers.len() > 1 && exclusive.iter().any(|o| option_value(o).is_some_and(|(_, ov)| same_answer(ov, value))) {
                walker.error(IssueCode::Structure, "this answer is an exclusive option, so no other answer may be selected with it");
            }
            let value_len = walker.path.len();
            walker.path.push('.');
            walker.path.push_str(name);
            let value_type = &name["value".len()..];
            answer_check(walker, context, q_item, kind, value_type, value);
            walker.path.truncate(value_len);
        }
        let nested = answer.get("item").and_then(Json::as_array).unwrap_or_default();
        if !nested.is_empty() || !q_children.is_empty() {
            context.scopes.push(nested);
            items(walker, context, q_children, nested, depth + 1);
            context.scopes.pop();
        }
        walker.path.truncate(base_len);
    }
}

/// The `value[x]` of an answer, as (JSON name, value).
fn answer_value(answer: &Json) -> Option<(&str, &Json)> {
    answer.as_object()?.iter().find(|(k, _)| k.starts_with("value"))
}

fn options(q_item: &Json) -> impl Iterator<Item = &Json> {
    q_item.get("answerOption").and_then(Json::as_array).unwrap_or_default().iter()
}

fn option_value(option: &Json) -> Option<(&str, &Json)> {
    option.as_object()?.iter().find(|(k, _)| k.starts_with("value")).map(|(k, v)| (&k["value".len()..], v))
}

/// The answer types a question of this type takes (R4 `Questionnaire.item.type`).
fn expected_types(kind: &str) -> &'static [&'static str] {
    match kind {
        "boolean" => &["Boolean"],
        "decimal" => &["Decimal"],
        "integer" => &["Integer"],
        "date" => &["Date"],
        "dateTime" => &["DateTime"],
        "time" => &["Time"],
        "string" | "text" => &["String"],
        "url" => &["Uri"],
        "choice" => &["Coding"],
        "open-choice" => &["Coding", "String"],
        "attachment" => &["Attachment"],
        "reference" => &["Reference"],
        "quantity" => &["Quantity"],
        _ => &[],
    }
}

/// Checks one answer value; the walker's path is the value's.
fn answer_check(walker: &mut Walker<'_, '_>, context: &Context<'_, '_>, q_item: &Json, kind: &str, value_type: &str, value: &Json) {
    let expected = expected_types(kind);
    // Options may be of other types than Coding (`valueString`, `valueInteger` ...), which choice questions then take.
    let option_types: Vec<&str> = options(q_item).filter_map(|o| option_value(o).map(|(t, _)| t)).collect();
    let type_ok = expected.is_empty() || expected.contains(&value_type) || (kind.ends_with("choice") && option_types.contains(&value_type));
    if !type_ok {
        walker.error(
            IssueCode::Structure,
            format!("the answer must be of type {} for a {kind} question, not {value_type}", expected.join(" or ")),
        );
        return;
    }
    match value_type {
        "String" => string_answer(walker, q_item, kind, value),
        "Integer" | "Decimal" | "Date" | "DateTime" | "Time" => limits(walker, q_item, value_type, value),
        "Quantity" => quantity_answer(walker, context, q_item, value),
        "Reference" => reference_answer(walker, q_item, value),
        _ => {}
    }
    let has_options = q_item.get("answerOption").is_some();
    if has_options && kind != "open-choice" {
        let matched = options(q_item).filter_map(option_value).any(|(t, ov)| t == value_type && same_answer(ov, value));
        if !matched {
            walker.error(IssueCode::CodeInvalid, format!("{} is not one of the permitted answer options", describe(value)));
        }
    }
    if let Some(url) = q_item.get("answerValueSet").and_then(Json::as_str) {
        value_set_answer(walker, context, url, value_type, value);
    }
}

fn string_answer(walker: &mut Walker<'_, '_>, q_item: &Json, kind: &str, value: &Json) {
    let Some(text) = value.as_str() else { return };
    let length = text.chars().count();
    if let Some(max) = q_item.get("maxLength").and_then(as_number)
        && length as f64 > max
    {
        walker.error(IssueCode::TooLong, format!("the answer is {length} characters long, more than the allowed maximum of {max}"));
    }
    if let Some(min) = extension_value(q_item, EXT_MIN_LENGTH).and_then(as_number)
        && (length as f64) < min
    {
        walker.error(IssueCode::Value, format!("the answer is {length} characters long, less than the required minimum of {min}"));
    }
    if kind == "string" && text.contains(['\n', '\r']) {
        walker.report(Severity::Warning, IssueCode::Value, "a string answer should not contain line breaks (use a text question for those)");
    }
}

/// `minValue`, `maxValue` and `maxDecimalPlaces` for numbers, dates and times.
fn limits(walker: &mut Walker<'_, '_>, q_item: &Json, value_type: &str, value: &Json) {
    for (url, is_min) in [(EXT_MIN_VALUE, true), (EXT_MAX_VALUE, false)] {
        let Some(limit) = extension_value(q_item, url) else { continue };
        let Some(order) = compare(value, limit) else { continue };
        if is_min && order == Ordering::Less {
            walker.error(IssueCode::Value, format!("{} is less than the allowed minimum of {}", describe(value), describe(limit)));
        }
        if !is_min && order == Ordering::Greater {
            walker.error(IssueCode::Value, format!("{} is greater than the allowed maximum of {}", describe(value), describe(limit)));
        }
    }
    if value_type == "Decimal"
        && let (Some(places), Json::Number(text)) = (extension_value(q_item, EXT_MAX_DECIMALS).and_then(as_number), value)
    {
        let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
        let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len());
        if decimals as f64 > places {
            walker.error(IssueCode::Value, format!("{text} has {decimals} decimal places, more than the allowed {places}"));
        }
    }
}

fn quantity_answer(walker: &mut Walker<'_, '_>, context: &Context<'_, '_>, q_item: &Json, value: &Json) {
    let system = value.get("system").and_then(Json::as_str);
    let code = value.get("code").and_then(Json::as_str);
    let shown = || format!("{} {}", value.get("value").map(Json::to_string_compact).unwrap_or_default(), value.get("unit").and_then(Json::as_str).or(code).unwrap_or(""));
    let unit_options: Vec<&Json> = extensions(q_item, EXT_UNIT_OPTION).collect();
    if !unit_options.is_empty() {
        let matched = unit_options.iter().any(|o| o.get("system").and_then(Json::as_str) == system && o.get("code").and_then(Json::as_str) == code && code.is_some());
        if !matched {
            let allowed: Vec<String> = unit_options.iter().filter_map(|o| o.get("code").and_then(Json::as_str)).map(str::to_string).collect();
            walker.error(IssueCode::CodeInvalid, format!("the unit of {} is not one of the allowed units ({})", shown(), allowed.join(", ")));
        }
    }
    if let Some(url) = extension_value(q_item, EXT_UNIT_VALUE_SET).and_then(Json::as_str) {
        let membership = match code {
            Some(code) => expansion(walker, context, url).map(|e| e.contains(system, code)),
            None => Some(Membership::NotIn),
        };
        if membership == Some(Membership::NotIn) {
            walker.error(IssueCode::CodeInvalid, format!("the unit of {} is not in the unit value set {url}", shown()));
        }
    }
    for (url, is_min) in [(EXT_MIN_QUANTITY, true), (EXT_MAX_QUANTITY, false)] {
        let Some(limit) = extension_value(q_item, url) else { continue };
        let which = if is_min { "minimum" } else { "maximum" };
        let limit_code = limit.get("code").and_then(Json::as_str);
        let limit_system = limit.get("system").and_then(Json::as_str);
        let comparable = code.is_some() && system.is_some() && code == limit_code && system == limit_system;
        if !comparable {
            // Without the same formal unit (system and code) on both, the value cannot be shown to be in range.
            walker.error(IssueCode::Value, format!("{} cannot be compared with the allowed {which} because they do not share a coded unit", shown()));
            continue;
        }
        let (Some(v), Some(l)) = (value.get("value"), limit.get("value")) else { continue };
        match compare(v, l) {
            Some(Ordering::Less) if is_min => walker.error(IssueCode::Value, format!("{} is less than the allowed minimum", shown())),
            Some(Ordering::Greater) if !is_min => walker.error(IssueCode::Value, format!("{} is greater than the allowed maximum", shown())),
            _ => {}
        }
    }
}

fn reference_answer(walker: &mut Walker<'_, '_>, q_item: &Json, value: &Json) {
    let Some(reference) = value.get("reference").and_then(Json::as_str) else { return };
    if reference.starts_with('#') || reference.starts_with("urn:") {
        return;
    }
    let without_history = super::bundle::without_history(reference);
    let mut segments = without_history.rsplit('/');
    let (Some(_id), Some(type_name)) = (segments.next(), segments.next()) else { return };
    let definitions = &walker.validator.definitions;
    // `Type/id` (absolute or not): the type segment of a RESTful reference must be a resource type.
    let looks_restful = type_name.starts_with(|c: char| c.is_ascii_uppercase()) && type_name.bytes().all(|b| b.is_ascii_alphanumeric());
    if !looks_restful {
        return;
    }
    if !definitions.is_resource_type(type_name) {
        walker.error(IssueCode::Structure, format!("'{type_name}' in the reference {reference} is not a resource type"));
        return;
    }
    let allowed: Vec<&str> = extensions(q_item, EXT_REFERENCE_RESOURCE).filter_map(Json::as_str).collect();
    if !allowed.is_empty() && !allowed.contains(&type_name) && !allowed.contains(&"Resource") {
        walker.error(IssueCode::Structure, format!("a reference to a {type_name} is not allowed for this question (allowed: {})", allowed.join(", ")));
    }
}

fn value_set_answer(walker: &mut Walker<'_, '_>, context: &Context<'_, '_>, url: &str, value_type: &str, value: &Json) {
    let (system, code) = match value_type {
        "Coding" => (value.get("system").and_then(Json::as_str), value.get("code").and_then(Json::as_str)),
        "String" => (None, value.as_str()),
        _ => return,
    };
    let Some(code) = code else { return };
    let Some(expansion) = expansion(walker, context, url) else {
        walker.report(Severity::Warning, IssueCode::NotSupported, format!("the answer value set {url} is not available, so the answer was not checked"));
        return;
    };
    if expansion.contains(system, code) == Membership::NotIn {
        let shown = match system {
            Some(system) => format!("{system}#{code}"),
            None => format!("'{code}'"),
        };
        walker.error(IssueCode::CodeInvalid, format!("{shown} is not in the answer value set {url}"));
    }
}

/// The expansion of a value set named by a questionnaire: contained in it (`#id`) or loaded.
fn expansion(walker: &Walker<'_, '_>, context: &Context<'_, '_>, url: &str) -> Option<Arc<Expansion>> {
    let definitions = &walker.validator.definitions;
    match url.strip_prefix('#') {
        Some(id) => {
            let contained = context.questionnaire.get("contained").and_then(Json::as_array).unwrap_or_default();
            let value_set = contained.iter().find(|c| c.get("id").and_then(Json::as_str) == Some(id))?;
            Some(Arc::new(walker.validator.terminology.expand_resource(definitions, value_set)))
        }
        None => walker.validator.terminology.expansion(definitions, url),
    }
}

/// Whether an item's enableWhen conditions hold (no conditions: enabled).
fn is_enabled(context: &Context<'_, '_>, q_item: &Json) -> bool {
    let conditions = q_item.get("enableWhen").and_then(Json::as_array).unwrap_or_default();
    if conditions.is_empty() {
        return true;
    }
    let any = q_item.get("enableBehavior").and_then(Json::as_str) == Some("any");
    let mut results = conditions.iter().map(|c| condition_holds(context, c));
    if any { results.any(|r| r) } else { results.all(|r| r) }
}

fn condition_holds(context: &Context<'_, '_>, condition: &Json) -> bool {
    let Some(question) = condition.get("question").and_then(Json::as_str) else { return true };
    let operator = condition.get("operator").and_then(Json::as_str).unwrap_or("=");
    let Some((_, expected)) = condition.as_object().and_then(|o| o.iter().find(|(k, _)| k.starts_with("answer"))) else { return true };
    // The question is looked up in the nearest enclosing scope that has it, so repeating groups see their own answers.
    let mut answers = Vec::new();
    for scope in context.scopes.iter().rev() {
        collect_answers(scope, question, &mut answers, 0);
        if !answers.is_empty() {
            break;
        }
    }
    match operator {
        "exists" => expected.as_bool().unwrap_or(true) != answers.is_empty(),
        "=" => answers.iter().any(|a| same_answer(expected, a)),
        "!=" => !answers.is_empty() && answers.iter().all(|a| !same_answer(expected, a)),
        ">" | "<" | ">=" | "<=" => answers.iter().any(|a| {
            compare(a, expected).is_some_and(|o| match operator {
                ">" => o == Ordering::Greater,
                "<" => o == Ordering::Less,
                ">=" => o != Ordering::Less,
                _ => o != Ordering::Greater,
            })
        }),
        _ => true,
    }
}

fn collect_answers<'a>(items: &'a [Json], link_id: &str, out: &mut Vec<&'a Json>, depth: usize) {
    if depth > MAX_ITEM_DEPTH {
        return;
    }
    for item in items {
        let answers = item.get("answer").and_then(Json::as_array).unwrap_or_default();
        if item.get("linkId").and_then(Json::as_str) == Some(link_id) {
            out.extend(answers.iter().filter_map(|a| answer_value(a).map(|(_, v)| v)));
        }
        collect_answers(item.get("item").and_then(Json::as_array).unwrap_or_default(), link_id, out, depth + 1);
        for answer in answers {
            collect_answers(answer.get("item").and_then(Json::as_array).unwrap_or_default(), link_id, out, depth + 1);
        }
    }
}

/// Whether two answer values are the same answer: Codings by system and code, others by value.
fn same_answer(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) if x.get("code").is_some() || y.get("code").is_some() => {
            let system = |o: &Object| o.get("system").and_then(Json::as_str).map(str::to_string);
            x.get("code") == y.get("code") && (system(x) == system(y) || system(x).is_none() || system(y).is_none())
        }
        (Json::Object(x), Json::Object(y)) if x.get("reference").is_some() => x.get("reference") == y.get("reference"),
        (Json::Number(_), Json::Number(_)) => compare(a, b) == Some(Ordering::Equal),
        _ => a == b,
    }
}

/// Orders two numbers, or two dates/times of the same kind (compared on the precision both have).
fn compare(a: &Json, b: &Json) -> Option<Ordering> {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.parse::<f64>().ok()?.partial_cmp(&y.parse::<f64>().ok()?),
        (Json::String(x), Json::String(y)) => {
            let n = x.len().min(y.len());
            Some(x.get(..n)?.cmp(y.get(..n)?))
        }
        _ => None,
    }
}

fn describe(value: &Json) -> String {
    match value {
        Json::String(s) => format!("'{s}'"),
        Json::Object(o) => match (o.get("system").and_then(Json::as_str), o.get("code").and_then(Json::as_str)) {
            (Some(s), Some(c)) => format!("{s}#{c}"),
            (None, Some(c)) => format!("'{c}'"),
            _ => value.to_string_compact(),
        },
        other => other.to_string_compact(),
    }
}

fn as_number(value: &Json) -> Option<f64> {
    match value {
        Json::Number(n) => n.parse().ok(),
        _ => None,
    }
}

/// The values of the extensions with this url on a questionnaire item or option.
fn extensions<'j>(on: &'j Json, url: &'j str) -> impl Iterator<Item = &'j Json> + 'j {
    on.get("extension")
        .and_then(Json::as_array)
        .unwrap_or_default()
        .iter()
        .filter(move |e| e.get("url").and_then(Json::as_str) == Some(url))
        .filter_map(|e| e.as_object()?.iter().find(|(k, _)| k.starts_with("value")).map(|(_, v)| v))
}

fn extension_value<'j>(on: &'j Json, url: &'j str) -> Option<&'j Json> {
    extensions(on, url).next()
}
