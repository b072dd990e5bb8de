//! Instrument scoring from item answers (PHQ-9, PHQ-2, GAD-7, PCL-5, AUDIT-C, C-SSRS screener, Y-BOCS): totals, severity bands, and flags for a sent total that disagrees with its items and for a positive C-SSRS.
//!
//! The results are the record's computed values, read by mappings as `@score.total`,
//! `@score.band`, … and described by [`computed_schema`] so that mapping rules over them are
//! type-checked like any record path.

use crate::json::{Json, Object};

/// One instrument's item count, answer range and severity bands (upper bounds, inclusive).
struct Instrument {
    name: &'static str,
    n_items: usize,
    max_answer: u32,
    bands: &'static [(u32, &'static str)],
    /// Whether the instrument has a summed total at all (the C-SSRS screener does not).
    summed: bool,
}

const INSTRUMENTS: &[Instrument] = &[
    Instrument {
        name: "phq9",
        n_items: 9,
        max_answer: 3,
        bands: &[(4, "minimal"), (9, "mild"), (14, "moderate"), (19, "moderately-severe"), (27, "severe")],
        summed: true,
    },
    Instrument { name: "phq2", n_items: 2, max_answer: 3, bands: &[(2, "negative"), (6, "positive")], summed: true },
    Instrument { name: "gad7", n_items: 7, max_answer: 3, bands: &[(4, "minimal"), (9, "mild"), (14, "moderate"), (21, "severe")], summed: true },
    // 31–33 is the usual provisional PTSD cut-off range; 33 is the one the National Center for PTSD cites.
    Instrument { name: "pcl5", n_items: 20, max_answer: 4, bands: &[(32, "negative"), (80, "positive")], summed: true },
    // The AUDIT-C cut-off depends on sex (3 or 4), which a screening record does not carry: no band.
    Instrument { name: "auditc", n_items: 3, max_answer: 4, bands: &[], summed: true },
    Instrument { name: "cssrs", n_items: 6, max_answer: 1, bands: &[], summed: false },
    Instrument {
        name: "ybocs",
        n_items: 10,
        max_answer: 4,
        bands: &[(7, "subclinical"), (15, "mild"), (23, "moderate"), (31, "severe"), (40, "extreme")],
        summed: true,
    },
];

/// Every severity band any instrument uses (the schema enumeration of `@score.band`).
pub fn all_bands() -> Vec<&'static str> {
    let mut bands: Vec<&'static str> = INSTRUMENTS.iter().flat_map(|i| i.bands.iter().map(|(_, b)| *b)).collect();
    bands.sort_unstable();
    bands.dedup();
    bands
}

/// A finding about a screening's scores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScoreFinding {
    /// Whether the record cannot be mapped (bad items) rather than merely flagged.
    pub is_error: bool,
    pub path: String,
    pub message: String,
}

/// Scores a screening record: its computed values and what was found on the way.
pub fn score(record: &Json) -> (Json, Vec<ScoreFinding>) {
    let mut findings = Vec::new();
    let mut score = Object::new();
    let name = record.get("instrument").and_then(Json::as_str).unwrap_or_default();
    let Some(instrument) = INSTRUMENTS.iter().find(|i| i.name == name) else {
        return (computed(score), findings);
    };
    let items = record.get("items").and_then(Json::as_array).unwrap_or_default();
    let mut answers: Vec<Option<u32>> = vec![None; instrument.n_items];
    for (i, item) in items.iter().enumerate() {
        let number = item.get("number").and_then(as_u32);
        let answer = item.get("answer").and_then(as_u32);
        let slot = number.and_then(|n| n.checked_sub(1)).and_then(|n| answers.get_mut(n as usize));
        match (slot, answer) {
            (None, _) => findings.push(error(format!("items[{i}].number"), format!("{name} has items 1 to {}", instrument.n_items))),
            (Some(_), None) => findings.push(error(format!("items[{i}].answer"), "the answer is not a whole number")),
            (Some(_), Some(a)) if a > instrument.max_answer => {
                findings.push(error(format!("items[{i}].answer"), format!("{name} answers range from 0 to {}", instrument.max_answer)))
            }
            (Some(Some(_)), Some(_)) => findings.push(error(format!("items[{i}].number"), "this item is answered twice")),
            (Some(slot), Some(a)) => *slot = Some(a),
        }
    }
    let missing: Vec<String> = answers.iter().enumerate().filter(|(_, a)| a.is_none()).map(|(n, _)| (n + 1).to_string()).collect();
    if !missing.is_empty() {
        findings.push(error("items".to_string(), format!("{name} items not answered: {}", missing.join(", "))));
    }
    if findings.iter().any(|f| f.is_error) {
        return (computed(score), findings);
    }
    let answers: Vec<u32> = answers.into_iter().flatten().collect();
    if instrument.summed {
        let total: u32 = answers.iter().sum();
        score.insert("total", Json::Number(total.to_string().into()));
        if let Some((_, band)) = instrument.bands.iter().find(|(upper, _)| total <= *upper) {
            score.insert("band", Json::string(*band));
        }
        if let Some(sent) = record.get("total") {
            let disagrees = as_u32(sent) != Some(total);
            score.insert("total_disagrees", Json::Bool(disagrees));
            if disagrees {
                findings.push(ScoreFinding {
                    is_error: false,
                    path: "total".to_string(),
                    message: format!("the sent total {sent} disagrees with the items, which add up to {total}; the computed total is used"),
                });
            }
        }
    }
    if instrument.name == "cssrs" {
        let positive_items: Vec<String> = answers.iter().enumerate().filter(|(_, a)| **a > 0).map(|(n, _)| (n + 1).to_string()).collect();
        let positive = !positive_items.is_empty();
        score.insert("positive", Json::Bool(positive));
        score.insert("urgent", Json::Bool(positive));
        if positive {
            findings.push(ScoreFinding {
                is_error: false,
                path: "items".to_string(),
                message: format!("URGENT: C-SSRS screener positive (item {} answered yes); follow the program's suicide-risk protocol", positive_items.join(", ")),
            });
        }
    }
    (computed(score), findings)
}

fn computed(score: Object) -> Json {
    let mut root = Object::new();
    root.insert("score", Json::Object(score));
    Json::Object(root)
}

fn error(path: String, message: impl Into<String>) -> ScoreFinding {
    ScoreFinding { is_error: true, path, message: message.into() }
}

fn as_u32(value: &Json) -> Option<u32> {
    match value {
        Json::Number(n) => n.parse().ok(),
        _ => None,
    }
}

/// The JSON Schema of the computed values, for checking mapping rules that read them.
pub fn computed_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "score": {
                "type": "object",
                "properties": {
                    "total": {"type": "integer", "minimum": 0},
                    "band": {"type": "string", "enum": all_bands()},
                    "total_disagrees": {"type": "boolean"},
                    "positive": {"type": "boolean"},
                    "urgent": {"type": "boolean"}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screening(instrument: &str, answers: &[u32], total: Option<u32>) -> Json {
        let items: Vec<String> = answers.iter().enumerate().map(|(i, a)| format!(r#"{{"number": {}, "answer": {a}}}"#, i + 1)).collect();
        let total = total.map(|t| format!(r#", "total": {t}"#)).unwrap_or_default();
        let text = format!(r#"{{"instrument": "{instrument}", "items": [{}]{total}}}"#, items.join(","));
        crate::json::parse(text.as_bytes()).unwrap()
    }

    fn total_and_band(record: &Json) -> (Option<String>, Option<String>) {
        let (computed, _) = score(record);
        let score = &computed["score"];
        (score.get("total").map(|t| t.to_string()), score.get("band").and_then(Json::as_str).map(str::to_string))
    }

    #[test]
    fn phq9_bands_follow_the_published_cut_offs() {
        for (answers, total, band) in [
            ([0, 0, 0, 0, 0, 0, 0, 0, 0], "0", "minimal"),
            ([1, 1, 1, 1, 0, 0, 0, 0, 0], "4", "minimal"),
            ([1, 1, 1, 1, 1, 0, 0, 0, 0], "5", "mild"),
            ([2, 2, 2, 2, 1, 0, 0, 0, 0], "9", "mild"),
            ([2, 2, 2, 2, 2, 0, 0, 0, 0], "10", "moderate"),
            ([2, 2, 2, 2, 2, 2, 2, 0, 0], "14", "moderate"),
            ([3, 3, 3, 3, 3, 0, 0, 0, 0], "15", "moderately-severe"),
            ([3, 3, 3, 3, 3, 3, 1, 0, 0], "19", "moderately-severe"),
            ([3, 3, 3, 3, 3, 3, 2, 0, 0], "20", "severe"),
            ([3, 3, 3, 3, 3, 3, 3, 3, 3], "27", "severe"),
        ] {
            assert_eq!(total_and_band(&screening("phq9", &answers, None)), (Some(total.into()), Some(band.into())), "{answers:?}");
        }
    }

    #[test]
    fn gad7_bands_change_between_4_and_5_9_and_10_14_and_15() {
        for (answers, total, band) in [
            ([1, 1, 1, 1, 0, 0, 0], "4", "minimal"),
            ([1, 1, 1, 1, 1, 0, 0], "5", "mild"),
            ([2, 2, 2, 2, 1, 0, 0], "9", "mild"),
            ([2, 2, 2, 2, 2, 0, 0], "10", "moderate"),
            ([2, 2, 2, 2, 2, 2, 2], "14", "moderate"),
            ([3, 3, 3, 2, 2, 1, 1], "15", "severe"),
        ] {
            assert_eq!(total_and_band(&screening("gad7", &answers, None)), (Some(total.into()), Some(band.into())), "{answers:?}");
        }
    }

    #[test]
    fn pcl5_is_positive_from_33() {
        let answers_adding_to = |total: u32| -> Vec<u32> { (0..20).map(|i| (total / 20 + u32::from(i < total % 20)).min(4)).collect() };
        for (total, band) in [(0, "negative"), (32, "negative"), (33, "positive"), (80, "positive")] {
            let answers = answers_adding_to(total);
            assert_eq!(answers.iter().sum::<u32>(), total);
            assert_eq!(total_and_band(&screening("pcl5", &answers, None)), (Some(total.to_string()), Some(band.into())), "{answers:?}");
        }
    }

    #[test]
    fn ranges_of_the_other_instruments() {
        assert_eq!(total_and_band(&screening("gad7", &[3; 7], None)), (Some("21".into()), Some("severe".into())));
        assert_eq!(total_and_band(&screening("pcl5", &[4; 20], None)).0, Some("80".into()));
        assert_eq!(total_and_band(&screening("auditc", &[4; 3], None)), (Some("12".into()), None));
        assert_eq!(total_and_band(&screening("ybocs", &[2; 10], None)), (Some("20".into()), Some("moderate".into())));
    }

    #[test]
    fn a_sent_total_that_disagrees_is_flagged_not_trusted() {
        let (computed, findings) = score(&screening("phq9", &[1; 9], Some(12)));
        assert_eq!(computed["score"]["total"], Json::Number("9".into()));
        assert_eq!(computed["score"]["total_disagrees"], Json::Bool(true));
        assert_eq!(findings.len(), 1);
        assert!(!findings[0].is_error && findings[0].path == "total", "{findings:?}");
        let (computed, findings) = score(&screening("phq9", &[1; 9], Some(9)));
        assert_eq!(computed["score"]["total_disagrees"], Json::Bool(false));
        assert!(findings.is_empty());
    }

    #[test]
    fn a_positive_cssrs_item_is_urgent() {
        let (computed, findings) = score(&screening("cssrs", &[0, 1, 0, 0, 0, 0], None));
        assert_eq!(computed["score"]["urgent"], Json::Bool(true));
        assert!(findings[0].message.starts_with("URGENT"), "{findings:?}");
        let (computed, findings) = score(&screening("cssrs", &[0; 6], None));
        assert_eq!(computed["score"]["urgent"], Json::Bool(false));
        assert!(findings.is_empty());
    }

    #[test]
    fn missing_duplicate_and_out_of_range_items_are_errors() {
        let (_, findings) = score(&screening("phq9", &[1; 8], None));
        assert!(findings.iter().any(|f| f.is_error && f.message.contains("not answered: 9")), "{findings:?}");
        let (_, findings) = score(&screening("gad7", &[1, 1, 1, 1, 1, 1, 9], None));
        assert!(findings.iter().any(|f| f.is_error && f.path == "items[6].answer"), "{findings:?}");
        let record = crate::json::parse(br#"{"instrument": "phq2", "items": [{"number": 1, "answer": 1}, {"number": 1, "answer": 2}]}"#).unwrap();
        let (computed, findings) = score(&record);
        assert!(findings.iter().any(|f| f.is_error && f.message.contains("twice")), "{findings:?}");
        assert!(computed["score"].get("total").is_none());
    }
}
