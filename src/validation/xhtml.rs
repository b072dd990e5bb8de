//! Narrative XHTML rules ([spec](https://hl7.org/fhir/R4/narrative.html#xhtml)): a well-formed `div` in the XHTML namespace, with no scripts, forms, event handlers or external content.
//!
//! A narrative is checked once for every resource that carries one, so this is a single pass
//! over the bytes written for the job rather than a general XML reader. Tags and most text runs
//! are a few bytes long, too short for a vectorized search to pay for its set-up: they are
//! scanned byte by byte, and only a long text run is handed to `memchr`. The tests compare its
//! verdicts with quick-xml's on every narrative of the corpus.

use memchr::{memchr2, memmem};

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

/// Deeper nesting is refused: no narrative needs it, and it bounds the work.
const MAX_DEPTH: usize = 200;

const SINGLE_DIV: &str = "the narrative must be a single <div> element";

fn ill_formed(problem: &str) -> String {
    format!("the narrative is not well-formed XHTML: {problem}")
}

/// XML white space (not Unicode's).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Checks a `Narrative.div` value.
pub fn check(text: &str) -> Result<(), String> {
    if !text.trim_start().starts_with("<div") {
        return Err(SINGLE_DIV.to_string());
    }
    let bytes = text.as_bytes();
    // Names of the open elements, innermost last.
    let mut open: Vec<&[u8]> = Vec::with_capacity(16);
    let mut saw_root = false;
    let mut at = 0;
    while at < bytes.len() {
        let run_end = text_run_end(bytes, at);
        if open.is_empty() && !bytes[at..run_end].iter().all(|&b| is_space(b)) {
            return Err("text outside the narrative <div>".to_string());
        }
        at = run_end;
        let Some(&first) = bytes.get(at) else { break };
        if first == b'&' {
            // A reference: its `;` must come before any other markup.
            match bytes[at + 1..].iter().position(|&b| matches!(b, b';' | b'<' | b'&')) {
                Some(i) if bytes[at + 1 + i] == b';' => {
                    if open.is_empty() {
                        return Err("text outside the narrative <div>".to_string());
                    }
                    at += i + 2;
                }
                _ => return Err(ill_formed("'&' must start a reference that ends with ';' (write &amp; for a plain ampersand)")),
            }
            continue;
        }
        let markup = &bytes[at + 1..];
        at += 1 + match markup.first() {
            Some(b'!') => special(markup, open.is_empty())?,
            Some(b'?') => return Err("the narrative must not contain processing instructions".to_string()),
            Some(b'/') => {
                let end = position(markup, b'>').ok_or_else(|| ill_formed("an end tag is not closed with '>'"))?;
                let name = trim_end(&markup[1..end]);
                match open.pop() {
                    Some(started) if started == name => {}
                    Some(started) => {
                        return Err(ill_formed(&format!(
                            "</{}> closes <{}>",
                            String::from_utf8_lossy(name),
                            String::from_utf8_lossy(started)
                        )));
                    }
                    None => return Err(ill_formed(&format!("</{}> closes no element", String::from_utf8_lossy(name)))),
                }
                end + 1
            }
            _ => {
                let end = tag_end(markup).ok_or_else(|| ill_formed("a tag is not closed with '>'"))?;
                let (content, is_empty) = match markup[..end].strip_suffix(b"/") {
                    Some(content) => (content, true),
                    None => (&markup[..end], false),
                };
                if open.is_empty() && saw_root {
                    return Err(SINGLE_DIV.to_string());
                }
                let name_end = content.iter().position(|&b| is_space(b)).unwrap_or(content.len());
                let name = &content[..name_end];
                if name.is_empty() {
                    return Err(ill_formed("'<' must start a tag (write &lt; for a plain '<')"));
                }
                check_element(name, &content[name_end..], open.is_empty())?;
                saw_root = true;
                if !is_empty {
                    open.push(name);
                    if open.len() > MAX_DEPTH {
                        return Err("the narrative nests too deeply".to_string());
                    }
                }
                end + 1
            }
        };
    }
    if !open.is_empty() {
        return Err(ill_formed("unclosed element"));
    }
    Ok(())
}

/// The length of a `<!…` construct after its `<` (comment, CDATA), or why it is refused.
fn special(markup: &[u8], outside_root: bool) -> Result<usize, String> {
    if let Some(body) = markup.strip_prefix(b"!--") {
        let end = memmem::find(body, b"-->").ok_or_else(|| ill_formed("a comment is not closed with '-->'"))?;
        return Ok(3 + end + 3);
    }
    if let Some(body) = markup.strip_prefix(b"![CDATA[") {
        let end = memmem::find(body, b"]]>").ok_or_else(|| ill_formed("a CDATA section is not closed with ']]>'"))?;
        if outside_root && !body[..end].iter().all(|&b| is_space(b)) {
            return Err("text outside the narrative <div>".to_string());
        }
        return Ok(8 + end + 3);
    }
    if markup.len() >= 8 && markup[1..8].eq_ignore_ascii_case(b"DOCTYPE") {
        return Err("the narrative must not contain a DOCTYPE".to_string());
    }
    Err(ill_formed("'<!' must start a comment or a CDATA section"))
}

/// Where the text run starting at `at` ends: at the next `<` or `&`, or at the end.
fn text_run_end(bytes: &[u8], at: usize) -> usize {
    const SHORT: usize = 16;
    let short_end = bytes.len().min(at + SHORT);
    if let Some(i) = bytes[at..short_end].iter().position(|&b| b == b'<' || b == b'&') {
        return at + i;
    }
    memchr2(b'<', b'&', &bytes[short_end..]).map_or(bytes.len(), |i| short_end + i)
}

fn position(bytes: &[u8], wanted: u8) -> Option<usize> {
    bytes.iter().position(|&b| b == wanted)
}

/// Where a start tag ends: the first `>` outside quoted attribute values.
fn tag_end(markup: &[u8]) -> Option<usize> {
    let mut quote = None;
    markup.iter().position(|&b| match quote {
        Some(q) => {
            if b == q {
                quote = None;
            }
            false
        }
        None if b == b'"' || b == b'\'' => {
            quote = Some(b);
            false
        }
        None => b == b'>',
    })
}

fn trim_end(mut name: &[u8]) -> &[u8] {
    while let [rest @ .., last] = name
        && is_space(*last)
    {
        name = rest;
    }
    name
}

/// Checks one element: `name` as written (a prefix is allowed) and the `attributes` after it.
fn check_element(name: &[u8], attributes: &[u8], is_root: bool) -> Result<(), String> {
    let local = position(name, b':').map_or(name, |i| &name[i + 1..]);
    if !is_allowed(local) {
        return Err(format!("illegal element name in the narrative: '{}'", String::from_utf8_lossy(local)));
    }
    let mut has_namespace = false;
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut at = 0;
    loop {
        while attributes.get(at).is_some_and(|&b| is_space(b)) {
            at += 1;
        }
        if at == attributes.len() {
            break;
        }
        let key_start = at;
        while attributes.get(at).is_some_and(|&b| b != b'=' && !is_space(b)) {
            at += 1;
        }
        let key = &attributes[key_start..at];
        while attributes.get(at).is_some_and(|&b| is_space(b)) {
            at += 1;
        }
        if attributes.get(at) != Some(&b'=') {
            return Err(ill_formed(&format!("attribute '{}' has no value", String::from_utf8_lossy(key))));
        }
        at += 1;
        while attributes.get(at).is_some_and(|&b| is_space(b)) {
            at += 1;
        }
        let quote = match attributes.get(at) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => return Err(ill_formed(&format!("the value of attribute '{}' must be quoted", String::from_utf8_lossy(key)))),
        };
        let value_start = at + 1;
        let value_end = value_start
            + position(&attributes[value_start..], quote).ok_or_else(|| ill_formed(&format!("the value of attribute '{}' is not closed", String::from_utf8_lossy(key))))?;
        let value = &attributes[value_start..value_end];
        at = value_end + 1;
        if seen.contains(&key) {
            return Err(ill_formed(&format!("attribute '{}' is repeated", String::from_utf8_lossy(key))));
        }
        seen.push(key);
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

    /// The well-formedness verdict of a general XML reader, for comparison.
    fn quick_xml_accepts(text: &str) -> bool {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_str(text);
        let mut depth = 0usize;
        loop {
            match reader.read_event() {
                Ok(Event::Start(e)) => {
                    if e.attributes().any(|a| a.is_err()) {
                        return false;
                    }
                    depth += 1;
                }
                Ok(Event::Empty(e)) => {
                    if e.attributes().any(|a| a.is_err()) {
                        return false;
                    }
                }
                Ok(Event::End(_)) => depth -= 1,
                Ok(Event::Eof) => return depth == 0,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Markup that is well-formed or not, whatever the narrative rules say.
    const CRAFTED: &[&str] = &[
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p class='a' id="b">x &amp; y &#160; &nbsp;</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml">a & b</div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml">a &amp b <b>c</b></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p title="a>b">x</p ></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p title="a" title="b">x</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p title=a>x</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p nowrap>x</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p title = "a"class="b">x</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><br/><br /><img src="x.png"/></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><!-- a -- comment --><![CDATA[ <b> ]]></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><!-- unclosed </div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>x</b></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"></p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>x</p></div></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p title="x>y</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>1 < 2</p></div>"#,
        r#"<div xmlns="http://www.w3.org/1999/xhtml"><x:p xmlns:x="http://www.w3.org/1999/xhtml">a</x:p></div>"#,
        "<div xmlns=\"http://www.w3.org/1999/xhtml\">\n\t<p>a</p>\n</div>\n",
    ];

    /// For each text quick-xml reads without error, ours passes or fails it for a narrative rule
    /// only; for each text quick-xml refuses, ours refuses too.
    fn assert_agrees(text: &str) {
        let ours = check(text);
        let well_formed = !matches!(&ours, Err(m) if m.starts_with("the narrative is not well-formed"));
        assert_eq!(well_formed, quick_xml_accepts(text), "{text:?}: ours {ours:?}");
    }

    #[test]
    fn well_formedness_agrees_with_quick_xml_on_crafted_markup() {
        for text in CRAFTED {
            assert_agrees(text);
        }
    }

    #[test]
    fn well_formedness_agrees_with_quick_xml_on_the_corpus() {
        let Some(corpus) = crate::need::corpus("validation::xhtml::tests::well_formedness_agrees_with_quick_xml_on_the_corpus") else { return };
        let entries = std::fs::read_dir(corpus.join("hl7-examples/resources")).expect("the corpus' official examples");
        let mut divs = Vec::new();
        for entry in entries.flatten() {
            let Ok(bytes) = std::fs::read(entry.path()) else { continue };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            collect_divs(&value, &mut divs);
        }
        assert!(divs.len() > 500, "only {} narratives found", divs.len());
        for div in &divs {
            assert_agrees(div);
        }
    }

    fn collect_divs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(members) => {
                for (name, member) in members {
                    match member {
                        serde_json::Value::String(div) if name == "div" => out.push(div.clone()),
                        other => collect_divs(other, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| collect_divs(item, out)),
            _ => {}
        }
    }
}
