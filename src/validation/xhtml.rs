//! Narrative XHTML rules ([spec](https://hl7.org/fhir/R4/narrative.html#xhtml)): a well-formed `div` in the XHTML namespace, with no scripts, forms, event handlers or external content.

use quick_xml::events::Event;

/// Elements the FHIR narrative allows (basic HTML formatting only).
fn is_allowed(name: &[u8]) -> bool {
    matches!(
        name,
        b"a" | b"abbr" | b"acronym" | b"b" | b"big" | b"blockquote" | b"br" | b"caption" | b"cite" | b"code" | b"col" |
        b"colgroup" | b"dd" | b"dfn" | b"div" | b"dl" | b"dt" | b"em" | b"h1" | b"h2" | b"h3" | b"h4" | b"h5" | b"h6" | b"hr" |
        b"i" | b"img" | b"kbd" | b"li" | b"ol" | b"p" | b"pre" | b"q" | b"samp" | b"small" | b"span" | b"strong" | b"sub" |
        b"sup" | b"table" | b"tbody" | b"td" | b"tfoot" | b"th" | b"thead" | b"tr" | b"tt" | b"ul" | b"var" | b"s" | b"u" |
        b"strike" | b"del" | b"ins" | b"address" | b"center" | b"font" | b"label" | b"bdo" | b"wbr" | b"section" | b"article" |
        b"header" | b"footer" | b"nav" | b"aside" | b"figure" | b"figcaption" | b"mark" | b"time"
    )
}

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
    let name = e.local_name();
    if !is_allowed(name.as_ref()) {
        return Err(format!("illegal element name in the narrative: '{}'", String::from_utf8_lossy(name.as_ref())));
    }
    let mut has_namespace = false;
    for attribute in e.attributes() {
        let attribute = attribute.map_err(|err| format!("the narrative is not well-formed XHTML: {err}"))?;
        let key = attribute.key.as_ref();
        let value = &*attribute.value;
        if key.eq_ignore_ascii_case(b"xmlns") {
            if value != b"http://www.w3.org/1999/xhtml" {
                return Err("the narrative <div> must be in the XHTML namespace".to_string());
            }
            has_namespace = true;
        } else if key.len() >= 2 && key[..2].eq_ignore_ascii_case(b"on") {
            let key = String::from_utf8_lossy(key).to_lowercase();
            return Err(format!("illegal attribute in the narrative: '{key}' (event handlers are not allowed)"));
        } else if key.eq_ignore_ascii_case(b"href") || key.eq_ignore_ascii_case(b"src") {
            let start = value.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(value.len());
            if value[start..].len() >= 11 && value[start..start + 11].eq_ignore_ascii_case(b"javascript:") {
                let key = String::from_utf8_lossy(key).to_lowercase();
                return Err(format!("illegal {key} in the narrative: scripts are not allowed"));
            }
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
