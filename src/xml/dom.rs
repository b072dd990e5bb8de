//! Well-formedness, encoding and safety checks on raw XML, producing a small namespace-resolved element tree with byte positions.
//!
//! quick-xml is a tokenizer, not a validating parser: it leaves several well-formedness rules
//! (one root, no text outside it, legal characters, `<` in attribute values, the XML declaration
//! at the very start, declared entities only) to the caller, so they are checked here. A
//! DOCTYPE is refused before anything in it could be used, which rules out entity expansion
//! attacks (XXE, billion laughs): no entity other than the five predefined ones and character
//! references is ever resolved. Nesting is limited and the tree is built without recursion.

use std::borrow::Cow;
use std::rc::Rc;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;

use super::{MAX_DEPTH, XmlError};
use crate::outcome::IssueCode;

/// The namespace the `xml:` prefix is bound to.
pub const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

/// A parsed document: its root element and what is needed to turn offsets into line/column.
#[derive(Debug)]
pub struct Document<'a> {
    pub root: Element,
    text: &'a str,
    /// Byte offset of the start of each line after the first.
    line_starts: Vec<usize>,
}

/// One element with its namespace resolved.
#[derive(Debug)]
pub struct Element {
    /// The namespace URI, `None` when the element is in no namespace (shared: documents use few).
    pub ns: Option<Rc<str>>,
    pub name: Box<str>,
    /// The prefix as written, if any; kept apart so the common unprefixed name costs no extra allocation.
    pub prefix: Option<Box<str>>,
    /// Attributes other than namespace declarations, in document order.
    pub attributes: Vec<Attribute>,
    pub content: Vec<Content>,
    /// Byte offset of the `<` that opens the element.
    pub pos: usize,
    /// Written as `<x/>` rather than `<x></x>` (kept for XHTML fidelity).
    pub self_closing: bool,
}

#[derive(Debug)]
pub struct Attribute {
    pub ns: Option<Rc<str>>,
    pub name: Box<str>,
    pub prefix: Option<Box<str>>,
    /// The normalized, unescaped value.
    pub value: Box<str>,
}

#[derive(Debug)]
pub enum Content {
    Element(Element),
    Text(Text),
}

/// Character data (text, CDATA and references merged), with line ends normalized to `\n`.
#[derive(Debug)]
pub struct Text {
    pub text: String,
    /// Byte offset of the first non-whitespace character, or of the start when there is none.
    pub pos: usize,
    /// Only XML whitespace (space, tab, CR, LF).
    pub blank: bool,
}

impl Element {
    /// The attribute with this local name in no namespace.
    #[cfg(test)]
    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.ns.is_none() && &*a.name == name)
    }

    pub fn in_namespace(&self, ns: &str) -> bool {
        self.ns.as_deref() == Some(ns)
    }

    /// The name as written, prefix included, for messages.
    pub fn qname(&self) -> Cow<'_, str> {
        qualified(self.prefix.as_deref(), &self.name)
    }
}

impl Attribute {
    /// The name as written, prefix included, for messages.
    pub fn qname(&self) -> Cow<'_, str> {
        qualified(self.prefix.as_deref(), &self.name)
    }
}

fn qualified<'n>(prefix: Option<&str>, name: &'n str) -> Cow<'n, str> {
    match prefix {
        Some(prefix) => Cow::Owned(format!("{prefix}:{name}")),
        None => Cow::Borrowed(name),
    }
}

/// Splits `prefix:local` into its parts.
fn split_qname(qname: &[u8]) -> (Option<Box<str>>, Box<str>) {
    let text = String::from_utf8_lossy(qname);
    match text.split_once(':') {
        Some((prefix, local)) => (Some(prefix.into()), local.into()),
        None => (None, text.into()),
    }
}

fn is_xml_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Characters XML 1.0 forbids anywhere, even as character references.
fn is_forbidden_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{B}' | '\u{C}' | '\u{E}'..='\u{1F}' | '\u{FFFE}' | '\u{FFFF}')
}

impl<'a> Document<'a> {
    /// Checks the bytes and builds the tree; any problem is fatal.
    pub fn parse(bytes: &'a [u8]) -> Result<Document<'a>, XmlError> {
        if bytes.starts_with(b"\xFE\xFF") || bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\0<") || bytes.starts_with(b"<\0") {
            return Err(XmlError { code: IssueCode::Structure, message: "the document is UTF-16 encoded; FHIR XML must be UTF-8".into(), line: 1, column: 1 });
        }
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                // Locate the bad byte using the valid prefix only.
                let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or("");
                let (line, column) = line_column_in(valid, valid.len());
                return Err(XmlError { code: IssueCode::Structure, message: "invalid UTF-8 byte sequence; FHIR XML must be UTF-8".into(), line, column });
            }
        };
        let line_starts = text.match_indices('\n').map(|(i, _)| i + 1).collect();
        let mut document = Document { root: placeholder_root(), text, line_starts };
        if let Some((pos, c)) = text.char_indices().find(|&(_, c)| is_forbidden_char(c)) {
            return Err(document.error_at(pos, format!("the character U+{:04X} is not allowed in XML", c as u32)));
        }
        document.root = Builder::new(&document).build()?;
        Ok(document)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_column(&self, pos: usize) -> (usize, usize) {
        let pos = pos.min(self.text.len());
        let line_index = self.line_starts.partition_point(|&start| start <= pos);
        let line_start = if line_index == 0 { 0 } else { self.line_starts[line_index - 1] };
        let column = self.text.get(line_start..pos).map_or(0, |s| s.chars().count()) + 1;
        (line_index + 1, column)
    }

    pub fn error_at(&self, pos: usize, message: impl Into<String>) -> XmlError {
        self.error_with(IssueCode::Structure, pos, message)
    }

    pub fn error_with(&self, code: IssueCode, pos: usize, message: impl Into<String>) -> XmlError {
        let (line, column) = self.line_column(pos);
        XmlError { code, message: message.into(), line, column }
    }
}

fn line_column_in(text: &str, pos: usize) -> (usize, usize) {
    let upto = text.get(..pos).unwrap_or(text);
    let line = upto.matches('\n').count() + 1;
    let line_start = upto.rfind('\n').map_or(0, |p| p + 1);
    (line, upto[line_start..].chars().count() + 1)
}

fn placeholder_root() -> Element {
    Element { ns: None, name: "".into(), prefix: None, attributes: Vec::new(), content: Vec::new(), pos: 0, self_closing: true }
}

/// Resolves `&name;` (without the `&` and `;`): the five predefined entities and character references only.
fn resolve_reference(name: &str) -> Result<char, String> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let number = name.strip_prefix('#').ok_or_else(|| {
                format!("the entity '&{name};' is not declared (FHIR XML allows only &lt; &gt; &amp; &apos; &quot; and character references)")
            })?;
            let code = match number.strip_prefix('x') {
                Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => u32::from_str_radix(hex, 16).ok(),
                None if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => number.parse().ok(),
                _ => None,
            };
            code.and_then(char::from_u32).ok_or_else(|| format!("'&{name};' is not a valid character reference"))?
        }
    };
    if is_forbidden_char(c) {
        return Err(format!("the character reference '&{name};' refers to a character not allowed in XML"));
    }
    Ok(c)
}

/// Unescapes and normalizes an attribute value as XML 1.0 §3.3.3 requires: literal tabs and line
/// ends become spaces, character references are kept as written.
fn attribute_value(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find(['&', '<', '\t', '\r', '\n']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        match tail.as_bytes()[0] {
            b'<' => return Err("'<' is not allowed in an attribute value".into()),
            b'&' => {
                let end = tail.find(';').ok_or("an '&' in an attribute value must start a reference ending with ';'")?;
                out.push(resolve_reference(&tail[1..end])?);
                rest = &tail[end + 1..];
            }
            b'\r' if tail.as_bytes().get(1) == Some(&b'\n') => {
                out.push(' ');
                rest = &tail[2..];
            }
            _ => {
                out.push(' ');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Normalizes line ends in character data (XML 1.0 §2.11).
fn push_text(out: &mut String, raw: &str) {
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            out.push('\n');
        } else {
            out.push(c);
        }
    }
}

/// The namespace of a resolved name, shared with earlier uses of the same URI.
fn intern(namespaces: &mut Vec<Rc<str>>, resolved: ResolveResult<'_>) -> Result<Option<Rc<str>>, String> {
    match resolved {
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Bound(ns) => {
            let uri = ns.as_ref();
            if let Some(known) = namespaces.iter().find(|known| known.as_bytes() == uri) {
                return Ok(Some(known.clone()));
            }
            let known: Rc<str> = String::from_utf8_lossy(uri).into();
            namespaces.push(known.clone());
            Ok(Some(known))
        }
        ResolveResult::Unknown(prefix) => Err(format!("the namespace prefix '{}' is not declared", String::from_utf8_lossy(&prefix))),
    }
}

struct Builder<'d, 'a> {
    document: &'d Document<'a>,
    reader: NsReader<&'a [u8]>,
    /// Open elements, innermost last.
    stack: Vec<Element>,
    root: Option<Element>,
    /// Every namespace URI met so far, so elements share one copy.
    namespaces: Vec<Rc<str>>,
}

impl<'d, 'a> Builder<'d, 'a> {
    fn new(document: &'d Document<'a>) -> Self {
        let mut reader = NsReader::from_str(document.text);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.check_comments = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Builder { document, reader, stack: Vec::new(), root: None, namespaces: Vec::new() }
    }

    fn fail(&self, pos: usize, message: impl Into<String>) -> XmlError {
        self.document.error_at(pos, format!("XML is not well-formed: {}", message.into()))
    }

    fn build(mut self) -> Result<Element, XmlError> {
        let mut first = true;
        loop {
            let pos = usize::try_from(self.reader.buffer_position()).unwrap_or(usize::MAX);
            let event = match self.reader.read_event() {
                Ok(event) => event,
                Err(e) => {
                    let at = usize::try_from(self.reader.error_position()).unwrap_or(pos);
                    return Err(self.fail(at, e.to_string()));
                }
            };
            let was_first = std::mem::replace(&mut first, false);
            match event {
                Event::Decl(decl) => {
                    if !was_first || pos != 0 {
                        return Err(self.fail(pos, "the XML declaration must be at the very start of the document"));
                    }
                    self.check_declaration(&decl, pos)?;
                }
                Event::DocType(_) => {
                    return Err(self.document.error_at(pos, "DOCTYPE declarations are not allowed in FHIR XML (they could declare entities that read files or expand without bound)"));
                }
                Event::Start(start) => {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(self.document.error_with(IssueCode::TooLong, pos, format!("the document nests deeper than {MAX_DEPTH} elements")));
                    }
                    let element = self.element(&start, pos, false)?;
                    self.stack.push(element);
                }
                Event::Empty(start) => {
                    if self.stack.len() >= MAX_DEPTH {
                        return Err(self.document.error_with(IssueCode::TooLong, pos, format!("the document nests deeper than {MAX_DEPTH} elements")));
                    }
                    let element = self.element(&start, pos, true)?;
                    self.close(element)?;
                }
                Event::End(_) => {
                    // quick-xml has already checked that the name matches the open element.
                    let element = self.stack.pop().ok_or_else(|| self.fail(pos, "an end tag without a start tag"))?;
                    self.close(element)?;
                }
                Event::Text(text) => {
                    let raw = std::str::from_utf8(&text).map_err(|_| self.fail(pos, "invalid UTF-8"))?;
                    self.text(raw, pos)?;
                }
                Event::CData(cdata) => {
                    let raw = std::str::from_utf8(&cdata).map_err(|_| self.fail(pos, "invalid UTF-8"))?;
                    // The content starts after `<![CDATA[`.
                    self.text(raw, pos + 9)?;
                }
                Event::GeneralRef(reference) => {
                    let name = std::str::from_utf8(&reference).map_err(|_| self.fail(pos, "invalid UTF-8"))?;
                    let c = resolve_reference(name).map_err(|m| self.fail(pos, m))?;
                    let mut buffer = [0u8; 4];
                    // A reference is never blank text: `&#32;` is data, not formatting whitespace.
                    self.text_with(c.encode_utf8(&mut buffer), pos, true)?;
                }
                Event::Comment(_) | Event::PI(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(open) = self.stack.last() {
            return Err(self.fail(self.document.text.len(), format!("the element '{}' is not closed", open.qname())));
        }
        self.root.ok_or_else(|| self.document.error_at(self.document.text.len(), "the document has no root element"))
    }

    fn check_declaration(&self, decl: &quick_xml::events::BytesDecl<'_>, pos: usize) -> Result<(), XmlError> {
        let version = decl.version().map_err(|e| self.fail(pos, e.to_string()))?;
        if !matches!(&*version, b"1.0" | b"1.1") {
            return Err(self.fail(pos, format!("unsupported XML version '{}'", String::from_utf8_lossy(&version))));
        }
        if let Some(encoding) = decl.encoding() {
            let encoding = encoding.map_err(|e| self.fail(pos, e.to_string()))?;
            let name = String::from_utf8_lossy(&encoding).to_ascii_lowercase();
            // Pure ASCII reads the same in every ASCII-based encoding, so only a real conflict is refused.
            if name != "utf-8" && name != "utf8" && !self.document.text.is_ascii() {
                return Err(self.document.error_at(pos, format!("the document declares encoding '{name}'; FHIR XML must be UTF-8")));
            }
        }
        Ok(())
    }

    fn element(&mut self, start: &BytesStart<'_>, pos: usize, self_closing: bool) -> Result<Element, XmlError> {
        let (prefix, name) = split_qname(start.name().as_ref());
        let (resolved, _) = self.reader.resolve_element(start.name());
        let ns = intern(&mut self.namespaces, resolved).map_err(|m| self.fail(pos, m))?;
        let mut attributes = Vec::new();
        for attribute in start.attributes() {
            let attribute = attribute.map_err(|e| self.fail(pos, e.to_string()))?;
            let key = attribute.key.as_ref();
            let raw = std::str::from_utf8(&attribute.value).map_err(|_| self.fail(pos, "invalid UTF-8 in an attribute"))?;
            let value = attribute_value(raw).map_err(|m| self.fail(pos, m))?;
            if key == b"xmlns" || key.starts_with(b"xmlns:") {
                continue;
            }
            let (prefix, name) = split_qname(key);
            // An unprefixed attribute is in no namespace, whatever the default namespace is.
            let ns = match prefix {
                None => None,
                Some(_) => {
                    let (resolved, _) = self.reader.resolve_attribute(attribute.key);
                    intern(&mut self.namespaces, resolved).map_err(|m| self.fail(pos, m))?
                }
            };
            attributes.push(Attribute { ns, name, prefix, value: value.into() });
        }
        Ok(Element { ns, name, prefix, attributes, content: Vec::new(), pos, self_closing })
    }


    /// Attaches a finished element to its parent, or makes it the root.
    fn close(&mut self, element: Element) -> Result<(), XmlError> {
        match self.stack.last_mut() {
            Some(parent) => parent.content.push(Content::Element(element)),
            None if self.root.is_some() => return Err(self.fail(element.pos, "a document has only one root element")),
            None => self.root = Some(element),
        }
        Ok(())
    }

    fn text(&mut self, raw: &str, pos: usize) -> Result<(), XmlError> {
        self.text_with(raw, pos, false)
    }

    fn text_with(&mut self, raw: &str, pos: usize, significant: bool) -> Result<(), XmlError> {
        let first_significant = if significant { Some(0) } else { raw.find(|c| !is_xml_whitespace(c)) };
        let Some(parent) = self.stack.last_mut() else {
            return match first_significant {
                None => Ok(()),
                Some(offset) => Err(self.fail(pos + offset, "text is not allowed outside the root element")),
            };
        };
        let last_is_text = matches!(parent.content.last(), Some(Content::Text(_)));
        if first_significant.is_none() && !last_is_text && !parent.in_namespace(super::XHTML_NS) {
            // Indentation between FHIR elements is most of a document's text and means nothing;
            // only XHTML keeps it. (Text already started keeps its whitespace, so character data
            // split by references stays whole.)
            return Ok(());
        }
        if let Some(Content::Text(text)) = parent.content.last_mut() {
            if let (true, Some(offset)) = (text.blank, first_significant) {
                text.blank = false;
                text.pos = pos + offset;
            }
            push_text(&mut text.text, raw);
        } else {
            let mut text = String::with_capacity(raw.len());
            push_text(&mut text, raw);
            parent.content.push(Content::Text(Text { text, pos: pos + first_significant.unwrap_or(0), blank: first_significant.is_none() }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Element, XmlError> {
        Document::parse(text.as_bytes()).map(|d| d.root)
    }

    fn error(text: &str) -> XmlError {
        parse(text).expect_err("should be refused")
    }

    #[test]
    fn resolves_namespaces_and_attributes() {
        let root = parse(r#"<?xml version="1.0" encoding="UTF-8"?><f:a xmlns:f="urn:x" b="1 &amp;&#10;2&#x41;" xml:lang="en"><c/></f:a>"#).unwrap();
        assert_eq!(root.ns.as_deref(), Some("urn:x"));
        assert_eq!(&*root.name, "a");
        assert_eq!(&*root.attribute("b").unwrap().value, "1 &\n2A");
        let lang = &root.attributes[1];
        assert_eq!((lang.ns.as_deref(), &*lang.name), (Some(XML_NS), "lang"));
        assert_eq!(root.attributes.len(), 2, "xmlns declarations are not attributes");
        let Content::Element(c) = &root.content[0] else { panic!() };
        assert!(c.ns.is_none() && c.self_closing);
    }

    #[test]
    fn normalizes_attribute_whitespace_and_text_line_ends() {
        let root = parse("<a v=\"x\r\ny\tz\">l1\r\nl2\rl3 &lt;<![CDATA[<b>]]></a>").unwrap();
        assert_eq!(&*root.attribute("v").unwrap().value, "x y z");
        let Content::Text(text) = &root.content[0] else { panic!() };
        assert_eq!(text.text, "l1\nl2\nl3 <<b>");
        assert_eq!(root.content.len(), 1, "adjacent character data is merged");
    }

    #[test]
    fn records_where_text_starts_and_keeps_blank_text_only_in_xhtml() {
        let document = Document::parse(b"<a>\n  <b/>\n  oops\n</a>").unwrap();
        assert_eq!(document.root.content.len(), 2, "indentation outside XHTML is not kept");
        let Content::Text(text) = &document.root.content[1] else { panic!() };
        assert!(!text.blank);
        assert_eq!(document.line_column(text.pos), (3, 3));
        let xhtml = Document::parse(b"<div xmlns='http://www.w3.org/1999/xhtml'>\n  <b/> </div>").unwrap();
        let Content::Text(blank) = &xhtml.root.content[0] else { panic!() };
        assert!(blank.blank && blank.text == "\n  ");
        // Whitespace between references inside text is data.
        let split = Document::parse(b"<a>x&amp; &amp;y</a>").unwrap();
        let Content::Text(text) = &split.root.content[0] else { panic!() };
        assert_eq!(text.text, "x& &y");
    }

    #[test]
    fn refuses_doctype_and_unknown_entities() {
        let xxe = r#"<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>"#;
        assert!(error(xxe).message.contains("DOCTYPE"));
        let laughs = r#"<!DOCTYPE a [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;">]><a>&l2;</a>"#;
        assert!(error(laughs).message.contains("DOCTYPE"));
        assert!(error("<a>&nbsp;</a>").message.contains("not declared"));
        assert!(error("<a b='&x;'/>").message.contains("not declared"));
        assert!(error("<a>&#0;</a>").message.contains("not a valid character reference") || error("<a>&#0;</a>").message.contains("not allowed"));
        assert!(error("<a>&#1;</a>").message.contains("not allowed"));
    }

    #[test]
    fn refuses_malformed_documents_with_a_position() {
        let e = error("<a>\n  <b>\n</a>");
        assert!(e.message.contains("not well-formed"), "{e}");
        assert_eq!(e.line, 3);
        assert!(error("<a/><b/>").message.contains("only one root"));
        assert!(error("<a/>x").message.contains("outside the root"));
        assert!(error("x<a/>").message.contains("outside the root"));
        assert!(error("").message.contains("no root"));
        assert!(error("<!-- only -->").message.contains("no root"));
        assert!(error("<a>").message.contains("not closed"));
        assert!(error("<a b='1' b='2'/>").message.contains("not well-formed"));
        assert!(error("<a b='<'/>").message.contains("'<'"));
        assert!(error("<p:a/>").message.contains("prefix 'p'"));
        assert!(error(" <?xml version='1.0'?><a/>").message.contains("very start"));
        assert!(error("<a>\u{1}</a>").message.contains("U+0001"));
        assert!(error("<a><!-- a -- b --></a>").message.contains("not well-formed"));
        assert!(error("<a>&amp</a>").message.contains("not well-formed"));
    }

    #[test]
    fn checks_encoding() {
        let e = Document::parse(b"<a>\n\xff</a>").unwrap_err();
        assert!(e.message.contains("UTF-8") && e.line == 2 && e.column == 1, "{e}");
        assert!(Document::parse(b"\xff\xfe<\0a\0/\0>\0").unwrap_err().message.contains("UTF-16"));
        assert!(error("<?xml version='1.0' encoding='ISO-8859-1'?><a>\u{e9}</a>").message.contains("ISO-8859-1".to_ascii_lowercase().as_str()));
        assert!(parse("<?xml version='1.0' encoding='ISO-8859-1'?><a>plain</a>").is_ok());
        assert!(parse("\u{feff}<a>\u{65e5}</a>").is_ok());
    }

    #[test]
    fn limits_depth_without_recursion() {
        let deep = "<a>".repeat(100_000) + &"</a>".repeat(100_000);
        assert!(error(&deep).message.contains("nests deeper"));
        let ok = "<a>".repeat(MAX_DEPTH) + &"</a>".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
    }
}
