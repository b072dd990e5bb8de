//! Narrative XHTML rules ([spec](https://hl7.org/fhir/R4/narrative.html#xhtml)): a well-formed `div` in the XHTML namespace, with no scripts, forms, event handlers or external content.

use quick_xml::events::Event;

/// Elements the FHIR narrative allows (basic HTML formatting only).
const ALLOWED: &[&str] = &[
    "a", "abbr", "acronym", "b", "big", "blockquote", "br", "caption", "cite", "code", "col", "colgroup", "dd", "dfn", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre", "q", "samp", "small", "span", "strong",
    "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "ul", "var", "s", "u", "strike", "del", "ins", "address",
    "center", "font", "label", "bdo", "wbr", "section", "article", "header", "footer", "nav", "aside", "figure", "figcaption", "mark",
    "time", "small",
];

/// Checks a `Narrative.div` value.
pub fn check(text: &str) -> Result<(), String> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with("<div") {
        return Err("the narrative must be a single <div> element".to_string());
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    let mut saw_root = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) if depth == 0 && saw_root => {
                let _ = e;
                return Err("the narrative must be a single <div> element".to_string());
            }
            Ok(Event::Start(e)) => {
                check_element(&e, depth == 0)?;
                saw_root = true;
                depth += 1;
                if depth > 200 {
                    return Err("the narrative nests too deeply".to_string());
                }
            }
            Ok(Event::Empty(e)) => {
                check_element(&e, depth == 0)?;
                saw_root = true;
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::DocType(_)) => return Err("the narrative must not contain a DOCTYPE".to_string()),
            Ok(Event::PI(_)) => return Err("the narrative must not contain processing instructions".to_string()),
            Ok(Event::Text(t)) if depth == 0 && !t.iter().all(u8::is_ascii_whitespace) => {
                return Err("text outside the narrative <div>".to_string());
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("the narrative is not well-formed XHTML: {e}")),
        }
    }
    if depth != 0 {
        return Err("the narrative is not well-formed XHTML: unclosed element".to_string());
    }
    Ok(())
}

fn check_element(e: &quick_xml::events::BytesStart<'_>, is_root: bool) -> Result<(), String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).to_string();
    if !ALLOWED.contains(&name.as_str()) {
        return Err(format!("illegal element name in the narrative: '{name}'"));
    }
    let mut has_namespace = false;
    for attribute in e.attributes() {
        let attribute = attribute.map_err(|err| format!("the narrative is not well-formed XHTML: {err}"))?;
        let key = String::from_utf8_lossy(attribute.key.as_ref()).to_lowercase();
        let value = String::from_utf8_lossy(&attribute.value).to_string();
        if key == "xmlns" {
            if value != "http://www.w3.org/1999/xhtml" {
                return Err("the narrative <div> must be in the XHTML namespace".to_string());
            }
            has_namespace = true;
        } else if key.starts_with("on") {
            return Err(format!("illegal attribute in the narrative: '{key}' (event handlers are not allowed)"));
        } else if (key == "href" || key == "src") && value.trim_start().to_lowercase().starts_with("javascript:") {
            return Err(format!("illegal {key} in the narrative: scripts are not allowed"));
        }
    }
    if is_root && !has_namespace {
        return Err("the narrative <div> must be in the XHTML namespace (xmlns=\"http://www.w3.org/1999/xhtml\")".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_narrative_and_refuses_scripts() {
        assert!(check(r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>Hi <b>there</b></p></div>"#).is_ok());
        assert!(check("<div><p>no namespace</p></div>").is_err());
        assert!(check(r#"<div xmlns="http://www.w3.org/1999/xhtml"><script>x</script></div>"#).is_err());
        assert!(check(r#"<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x()">a</p></div>"#).is_err());
        assert!(check(r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>unclosed</div>"#).is_err());
        assert!(check("plain text").is_err());
    }
}
