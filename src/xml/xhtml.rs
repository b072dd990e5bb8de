//! Serializes a narrative `div` back to the XHTML string FHIR JSON carries, noting content that XHTML in FHIR cannot hold.
//!
//! FHIR JSON holds the narrative as text, with the XHTML namespace declared on the `div` itself
//! and no prefixes. Whatever prefixes or redundant declarations the XML used are therefore
//! normalized away; text, whitespace and attribute values are kept exactly (re-escaped as
//! needed). Whether the XHTML is *acceptable* (allowed tags, scripts, `xml:space`) is the
//! validator's question, asked of the string the same way for both formats.

use super::XHTML_NS;
use super::dom::{Content, Element, XML_NS};

/// Something in the `div` that cannot be represented in FHIR's XHTML, dropped from the output.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    pub pos: usize,
    pub message: String,
}

/// The JSON string form of a narrative `div` (which must already be known to be `div` in the XHTML namespace).
pub fn serialize(div: &Element, dropped: &mut Vec<Dropped>) -> String {
    let mut out = String::new();
    write_element(div, true, &mut out, dropped);
    out
}

fn write_element(element: &Element, is_root: bool, out: &mut String, dropped: &mut Vec<Dropped>) {
    out.push('<');
    out.push_str(&element.name);
    if is_root {
        out.push_str(" xmlns=\"");
        out.push_str(XHTML_NS);
        out.push('"');
    }
    for attribute in &element.attributes {
        let prefix = match attribute.ns.as_deref() {
            None => "",
            Some(XML_NS) => "xml:",
            Some(other) => {
                dropped.push(Dropped {
                    pos: element.pos,
                    message: format!("the attribute '{}' (namespace '{other}') is not allowed in the narrative and was dropped", attribute.qname()),
                });
                continue;
            }
        };
        out.push(' ');
        out.push_str(prefix);
        out.push_str(&attribute.name);
        out.push_str("=\"");
        escape_attribute(&attribute.value, out);
        out.push('"');
    }
    if element.content.is_empty() && element.self_closing {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for content in &element.content {
        match content {
            Content::Text(text) => escape_text(&text.text, out),
            Content::Element(child) if child.in_namespace(XHTML_NS) => write_element(child, false, out, dropped),
            Content::Element(child) => dropped.push(Dropped {
                pos: child.pos,
                message: format!(
                    "the element '{}' ({}) is not XHTML and is not allowed in the narrative; it was dropped",
                    child.qname(),
                    child.ns.as_deref().map_or_else(|| "no namespace".to_string(), |ns| format!("namespace '{ns}'"))
                ),
            }),
        }
    }
    out.push_str("</");
    out.push_str(&element.name);
    out.push('>');
}

pub(super) fn escape_text(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            // A CR can only have come from `&#13;`; a literal one would be read back as a line end.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Escapes an attribute value; characters XML 1.0 cannot carry at all (controls, U+FFFE/U+FFFF) become U+FFFD.
pub(super) fn escape_attribute(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '"' => out.push_str("&quot;"),
            // These survive in a value only as character references; written literally they would
            // be normalized to spaces when the string is parsed again.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            '\u{0}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::dom::Document;

    fn div(xml: &str) -> (String, Vec<Dropped>) {
        let document = Document::parse(xml.as_bytes()).unwrap();
        let mut dropped = Vec::new();
        (serialize(&document.root, &mut dropped), dropped)
    }

    #[test]
    fn normalizes_namespace_and_keeps_content() {
        let (s, dropped) = div("<h:div xmlns:h=\"http://www.w3.org/1999/xhtml\" class=\"x\">\n  <h:p>a &amp; b &lt; c &gt; d &quot;e&quot;<h:br/></h:p><h:td></h:td><!-- gone --></h:div>");
        assert_eq!(s, "<div xmlns=\"http://www.w3.org/1999/xhtml\" class=\"x\">\n  <p>a &amp; b &lt; c &gt; d \"e\"<br/></p><td></td></div>");
        assert!(dropped.is_empty());
    }

    #[test]
    fn keeps_xml_attributes_and_escapes_values() {
        let (s, _) = div("<div xmlns=\"http://www.w3.org/1999/xhtml\"><pre xml:space=\"preserve\" title=\"a&#10;&quot;b&quot; &amp;\">x</pre></div>");
        assert_eq!(s, "<div xmlns=\"http://www.w3.org/1999/xhtml\"><pre xml:space=\"preserve\" title=\"a&#10;&quot;b&quot; &amp;\">x</pre></div>");
    }

    #[test]
    fn drops_foreign_content() {
        let (s, dropped) = div("<div xmlns=\"http://www.w3.org/1999/xhtml\" xmlns:f=\"http://hl7.org/fhir\" f:x=\"1\"><f:name/><p>ok</p></div>");
        assert_eq!(s, "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>ok</p></div>");
        assert_eq!(dropped.len(), 2);
    }
}
