//! Config files in TOML: parsing with every error located at `path:line:column:` of the key it
//! concerns, unknown keys named with the nearest valid one ("did you mean `ways`?", see
//! [`suggest`]) or the section they belong in, and type errors in words. Shared by the
//! experiment configs of `meta-train` (`crate::experiment`) and the train / finetune configs
//! (`crate::transfer::config`).

pub mod suggest;

use std::ops::Range;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};
use suggest::{closest, did_you_mean};

/// A problem with one field's value: its dotted key (e.g. `task.ways`, used to find the key's line
/// in a file) and a message that names it and says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyProblem {
    /// Dotted path of the key, e.g. `task.ways`.
    pub key: String,
    /// What is wrong and what to change.
    pub message: String,
}

impl KeyProblem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The message as a configuration error, without a location.
    pub fn into_error(self) -> Error {
        Error::Config(self.message)
    }
}

/// "`key` must be >= min (what), got value".
pub fn at_least(key: &str, value: usize, min: usize, what: &str) -> KeyProblem {
    KeyProblem::new(
        key,
        format!("`{key}` must be >= {min} ({what}), got {value}"),
    )
}

/// Learning rates and the like: finite and strictly positive.
pub fn positive_finite(key: &str, value: f64) -> std::result::Result<(), KeyProblem> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(KeyProblem::new(
            key,
            format!("`{key}` must be a finite number > 0, got {value}"),
        ))
    }
}

/// The keys one table of a config file accepts, and which of them hold tables checked in turn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSchema {
    /// Accepted keys, in declaration order.
    pub keys: Vec<&'static str>,
    /// Keys whose values are tables, with the keys those accept.
    pub tables: Vec<(&'static str, TableSchema)>,
}

impl TableSchema {
    /// The fields of a struct deserialised with serde's derive.
    pub fn of<T: DeserializeOwned>() -> Self {
        Self::flat(struct_fields::<T>())
    }

    /// A table accepting exactly `keys`.
    pub fn flat(keys: &[&'static str]) -> Self {
        Self {
            keys: keys.to_vec(),
            tables: Vec::new(),
        }
    }

    /// Declares that `key` holds a table accepting `schema`'s keys.
    pub fn with_table(mut self, key: &'static str, schema: TableSchema) -> Self {
        self.tables.push((key, schema));
        self
    }

    /// The schema of the table under `key`, if `key` holds one.
    pub fn table(&self, key: &str) -> Option<&TableSchema> {
        self.tables
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, schema)| schema)
    }

    /// Whether the top level is made of sections (`[task]`, ...) rather than plain keys.
    fn is_sectioned(&self) -> bool {
        !self.tables.is_empty() && self.tables.len() == self.keys.len()
    }

    /// Every table below this one with its dotted path.
    fn sections(&self, prefix: &str) -> Vec<(String, &TableSchema)> {
        let mut out = Vec::new();
        for (name, schema) in &self.tables {
            let path = join_key(prefix, name);
            out.extend(schema.sections(&path));
            out.push((path, schema));
        }
        out
    }
}

/// The field names of a struct with a derived `Deserialize`: serde hands them to
/// `deserialize_struct`, where this deserializer records them and stops.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};

    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("field names recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is expected: the point is the names recorded on the way.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A TOML value reduced to what the checks need: tables with the byte spans of their keys.
enum SpannedNode {
    Table(Vec<(toml::Spanned<String>, toml::Spanned<SpannedNode>)>),
    Value,
}

impl<'de> Deserialize<'de> for SpannedNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct NodeVisitor;
        impl<'de> serde::de::Visitor<'de> for NodeVisitor {
            type Value = SpannedNode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<SpannedNode, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<toml::Spanned<String>>()? {
                    entries.push((key, map.next_value::<toml::Spanned<SpannedNode>>()?));
                }
                Ok(SpannedNode::Table(entries))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<SpannedNode, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(SpannedNode::Value)
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<SpannedNode, E> {
                Ok(SpannedNode::Value)
            }
        }
        d.deserialize_any(NodeVisitor)
    }
}

/// One key of a config file: its name, where it and its value are, and its sub-keys if its
/// value is a table.
#[derive(Clone, Debug)]
struct KeyNode {
    name: String,
    key_span: Option<Range<usize>>,
    value_span: Option<Range<usize>>,
    children: Option<Vec<KeyNode>>,
}

impl KeyNode {
    fn from_spanned(
        entries: Vec<(toml::Spanned<String>, toml::Spanned<SpannedNode>)>,
    ) -> Vec<Self> {
        entries
            .into_iter()
            .map(|(key, value)| {
                let key_span = key.span();
                let value_span = value.span();
                let children = match value.into_inner() {
                    SpannedNode::Table(entries) => Some(Self::from_spanned(entries)),
                    SpannedNode::Value => None,
                };
                Self {
                    name: key.into_inner(),
                    key_span: Some(key_span),
                    value_span: Some(value_span),
                    children,
                }
            })
            .collect()
    }

    /// Without positions (when the text holds values the span reader does not take, such as
    /// TOML dates).
    fn from_table(table: &toml::Table) -> Vec<Self> {
        table
            .iter()
            .map(|(name, value)| Self {
                name: name.clone(),
                key_span: None,
                value_span: None,
                children: value.as_table().map(Self::from_table),
            })
            .collect()
    }

    /// The bytes from the key to the end of its value.
    fn extent(&self) -> Option<Range<usize>> {
        let (key, value) = (self.key_span.as_ref()?, self.value_span.as_ref()?);
        Some(key.start.min(value.start)..key.end.max(value.end))
    }
}

/// A config file's text, parsed, with where each key is, so that every error names the file,
/// line and column it concerns.
pub struct ConfigDocument<'a> {
    text: &'a str,
    origin: Option<&'a Path>,
    root: Vec<KeyNode>,
}

impl<'a> ConfigDocument<'a> {
    /// Parses `text`; `origin` is the file it came from, for messages. Fails on TOML syntax
    /// errors, with the line and column.
    pub fn parse(text: &'a str, origin: Option<&'a Path>) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', "; ");
            let at = e.span().map(|span| line_column(text, span.start));
            Error::Config(format!(
                "{}not valid TOML: {message}",
                location_prefix(origin, at)
            ))
        })?;
        let root = match toml::from_str::<SpannedNode>(text) {
            Ok(SpannedNode::Table(entries)) => KeyNode::from_spanned(entries),
            _ => KeyNode::from_table(&table),
        };
        Ok(Self { text, origin, root })
    }

    /// Whether the file sets no key at all (empty, or only comments).
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// A configuration error about the whole file.
    pub fn error(&self, message: &str) -> Error {
        Error::Config(format!("{}{message}", location_prefix(self.origin, None)))
    }

    /// A configuration error located at `key` (a dotted path) when the file sets it.
    pub fn error_at(&self, key: &str, message: &str) -> Error {
        Error::Config(format!(
            "{}{message}",
            location_prefix(self.origin, self.location(key))
        ))
    }

    /// [`ConfigDocument::error_at`] for a [`KeyProblem`].
    pub fn problem_error(&self, problem: &KeyProblem) -> Error {
        self.error_at(&problem.key, &problem.message)
    }

    /// 1-based line and column of `key` (a dotted path such as `task.ways`) when the file sets
    /// it; for a key the file does not set, that of the nearest enclosing table it does set.
    pub fn location(&self, key: &str) -> Option<(usize, usize)> {
        let mut nodes = &self.root;
        let mut found = None;
        for part in key.split('.') {
            let Some(node) = nodes.iter().find(|n| n.name == part) else {
                break;
            };
            found = node.key_span.as_ref().or(found);
            match &node.children {
                Some(children) => nodes = children,
                None => break,
            }
        }
        found.map(|span| line_column(self.text, span.start))
    }

    /// Fails on the first key (in file order) that `schema` does not accept, naming its table,
    /// the closest valid key, the section it belongs to if it is valid elsewhere, and the valid
    /// keys.
    pub fn check_keys(&self, schema: &TableSchema) -> Result<()> {
        self.check_table(&self.root, "", schema, schema)
    }

    fn check_table(
        &self,
        nodes: &[KeyNode],
        path: &str,
        schema: &TableSchema,
        root: &TableSchema,
    ) -> Result<()> {
        for node in nodes {
            if !schema.keys.contains(&node.name.as_str()) {
                let message =
                    unknown_key_message(&node.name, node.children.is_some(), path, schema, root);
                let at = node
                    .key_span
                    .as_ref()
                    .map(|s| line_column(self.text, s.start));
                return Err(Error::Config(format!(
                    "{}{message}",
                    location_prefix(self.origin, at)
                )));
            }
            if let (Some(sub), Some(children)) = (schema.table(&node.name), &node.children) {
                self.check_table(children, &join_key(path, &node.name), sub, root)?;
            }
        }
        Ok(())
    }

    /// Deserialises the file into `T`; a wrong type, a missing key or a bad enum value is
    /// reported with the key's dotted name, its position and the expected form.
    pub fn deserialize<T: DeserializeOwned>(&self, schema: &TableSchema) -> Result<T> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span();
            let key = span
                .as_ref()
                .and_then(|s| {
                    self.innermost_key(s)
                        .or_else(|| key_on_line(self.text, s.start))
                })
                .unwrap_or_default();
            let (message, at) = match missing_field(e.message()) {
                Some(field) => {
                    let table = self.table_requiring(&key, field, schema);
                    let at = self.location(&table);
                    (missing_key_message(&table, field, schema), at)
                }
                None => (
                    explain_type_error(e.message(), &key),
                    span.map(|s| line_column(self.text, s.start)),
                ),
            };
            Error::Config(format!("{}{message}", location_prefix(self.origin, at)))
        })
    }

    /// The dotted path of the deepest key whose text (key and value) contains `span`.
    fn innermost_key(&self, span: &Range<usize>) -> Option<String> {
        let mut nodes = &self.root;
        let mut path: Option<String> = None;
        'descend: loop {
            for node in nodes {
                let Some(extent) = node.extent() else {
                    continue;
                };
                if extent.start <= span.start && span.end <= extent.end {
                    path = Some(join_key(path.as_deref().unwrap_or(""), &node.name));
                    match &node.children {
                        Some(children) => {
                            nodes = children;
                            continue 'descend;
                        }
                        None => break 'descend,
                    }
                }
            }
            break;
        }
        path
    }

    /// Of `key` and the tables enclosing it, the innermost whose schema has `field`.
    fn table_requiring(&self, key: &str, field: &str, schema: &TableSchema) -> String {
        let mut path = key.to_string();
        loop {
            let here = if path.is_empty() {
                Some(schema)
            } else {
                schema_at(schema, &path)
            };
            if here.is_some_and(|s| s.keys.contains(&field)) || path.is_empty() {
                return path;
            }
            path = path
                .rsplit_once('.')
                .map_or(String::new(), |(p, _)| p.to_string());
        }
    }
}

/// The dotted key written on the line of `offset` (`key = value` under the last `[header]`),
/// for when key positions are unknown.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let (line, _) = line_column(text, offset);
    let mut table = String::new();
    for (i, content) in text.lines().enumerate() {
        let content = content.trim();
        if content.starts_with('[') {
            table = content
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        }
        if i + 1 == line {
            let (key, _) = content.split_once('=')?;
            let key = key.trim().trim_matches('"');
            return (!key.is_empty()).then(|| join_key(&table, key));
        }
    }
    None
}

/// `path:line:column: `, `path: `, `line N, column M: ` or nothing.
fn location_prefix(origin: Option<&Path>, at: Option<(usize, usize)>) -> String {
    match (origin, at) {
        (Some(path), Some((line, column))) => format!("{}:{line}:{column}: ", path.display()),
        (Some(path), None) => format!("{}: ", path.display()),
        (None, Some((line, column))) => format!("line {line}, column {column}: "),
        (None, None) => String::new(),
    }
}

fn schema_at<'s>(schema: &'s TableSchema, path: &str) -> Option<&'s TableSchema> {
    path.split('.')
        .try_fold(schema, |schema, part| schema.table(part))
}

/// The words between backquotes in a serde message (`expected one of `a`, `b``).
fn backquoted(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

fn unknown_key_message(
    name: &str,
    is_table: bool,
    path: &str,
    schema: &TableSchema,
    root: &TableSchema,
) -> String {
    let sections = root.sections("");
    let elsewhere: Vec<String> = sections
        .iter()
        .filter(|(p, s)| p != path && s.keys.contains(&name))
        .map(|(p, _)| format!("[{p}]"))
        .collect();
    if path.is_empty() && schema.is_sectioned() {
        let list = schema
            .keys
            .iter()
            .map(|k| format!("[{k}]"))
            .collect::<Vec<_>>()
            .join(", ");
        if let Some(first) = elsewhere.first() {
            return format!(
                "`{name}` must be inside a section: move it under {first} (the sections are {list})"
            );
        }
        let guess = closest(name, &schema.keys)
            .map(|c| format!("; did you mean [{c}]?"))
            .unwrap_or_else(|| ".".into());
        let what = if is_table {
            format!("unknown section [{name}]")
        } else {
            format!("unknown key `{name}` at the top level")
        };
        return format!("{what}{guess} The sections are {list}");
    }
    let place = if path.is_empty() {
        String::new()
    } else {
        format!(" in [{path}]")
    };
    let mut message = format!("unknown key `{name}`{place}");
    let guess = closest(name, &schema.keys);
    match (elsewhere.first(), guess) {
        (Some(section), Some(guess)) => message.push_str(&format!(
            "; it belongs in {section} (or did you mean `{guess}`?)"
        )),
        (Some(section), None) => message.push_str(&format!("; it belongs in {section}.")),
        (None, Some(guess)) => message.push_str(&format!("; did you mean `{guess}`?")),
        (None, None) => message.push('.'),
    }
    let owner = if path.is_empty() {
        String::new()
    } else {
        format!(" of [{path}]")
    };
    message.push_str(&format!(" Valid keys{owner}: {}", schema.keys.join(", ")));
    message
}

fn missing_key_message(table: &str, field: &str, schema: &TableSchema) -> String {
    if table.is_empty() && schema.table(field).is_some() {
        return format!("the [{field}] section is missing; add it (see configs/*.toml)");
    }
    if table.is_empty() {
        return format!("the required key `{field}` is missing");
    }
    format!("[{table}] needs the key `{field}`; add `{field} = ...` to it")
}

/// Rewrites serde's wording ("invalid type: string \"five\", expected usize") as a sentence
/// about the key and the form it takes.
fn explain_type_error(message: &str, key: &str) -> String {
    let message = message.trim();
    let subject = if key.is_empty() {
        "a value".to_string()
    } else {
        format!("`{key}`")
    };
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((got, expected)) = rest.rsplit_once(", expected ") {
            // TOML dates and tables both reach serde as maps.
            let got = match got {
                "map" => "a table or a date",
                "sequence" => "an array",
                other => other,
            };
            return format!("{subject} must be {}, not {got}", expected_words(expected));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        if let Some((got, expected)) = rest.rsplit_once(", expected ") {
            return format!("{subject} must be {}, got {got}", expected_words(expected));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((got, expected)) = rest.split_once(", expected ") {
            return format!("{subject} must be {expected}, but has {got}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (got, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let choices = backquoted(expected);
        let guess = did_you_mean(got, &choices);
        return format!(
            "{subject} = \"{got}\" is unknown{guess}: use one of {}",
            choices.join(", ")
        );
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (got, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let choices = backquoted(expected);
        let guess = closest(got, &choices)
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_else(|| ".".into());
        let place = if key.is_empty() {
            String::new()
        } else {
            format!(" in [{key}]")
        };
        return format!(
            "unknown key `{got}`{place}{guess} Valid keys here: {}",
            choices.join(", ")
        );
    }
    if message.starts_with("data did not match any variant of untagged enum") {
        return format!(
            "{subject} must be a comma-separated string (\"64,32\") or an array ([64, 32])"
        );
    }
    format!("{subject}: {message}")
}

/// Serde's names of expected types, in the words of a config file.
fn expected_words(expected: &str) -> String {
    match expected {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number (0 or more, no quotes)".into(),
        "isize" | "i64" | "i32" | "i16" | "i8" => "a whole number (no quotes)".into(),
        "f64" | "f32" => "a number (no quotes)".into(),
        "a boolean" => "true or false (no quotes)".into(),
        "a string" => "a string in quotes".into(),
        "a sequence" => "an array [..]".into(),
        other => other.to_string(),
    }
}
