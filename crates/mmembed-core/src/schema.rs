//! BigQuery's `output_schema` (`'name TYPE, …'`): parsed, translated into
//! Gemini's `responseSchema` and JSON Schema (OpenAI-compatible servers,
//! Ollama), and used to type-check answers.
//!
//! ```
//! use mmembed_core::schema::OutputSchema;
//! let s: OutputSchema = "capital STRING, population INT64 OPTIONS(description='people'), \
//!                        tags ARRAY<STRING>".parse()?;
//! let row = s.parse_answer(r#"{"capital": "Olympia", "population": 55605, "tags": ["wa"]}"#)?;
//! assert_eq!(row["population"], 55605);
//! assert!(s.parse_answer(r#"{"capital": "Olympia", "population": "many", "tags": []}"#).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value, json};

/// A column type of an output schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldType {
    /// `STRING`.
    String,
    /// `INT64` (also `INT`, `INTEGER`, `BIGINT`).
    Int64,
    /// `FLOAT64` (also `FLOAT`, `DOUBLE`, `NUMERIC`).
    Float64,
    /// `BOOL` (also `BOOLEAN`).
    Bool,
    /// `ARRAY<T>` (no arrays of arrays, as in BigQuery).
    Array(Box<FieldType>),
    /// `STRUCT<name T, …>`.
    Struct(Vec<Field>),
}

/// One named field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Column name.
    pub name: String,
    /// Its type.
    pub ty: FieldType,
    /// `OPTIONS(description=…)`, sent to the model.
    pub description: Option<String>,
    /// For a `STRING`: the only values allowed (an enum; what classification
    /// sends). Empty: any string.
    pub allowed: Vec<String>,
}

impl Field {
    /// A field without description or allowed values.
    pub fn new(name: impl Into<String>, ty: FieldType) -> Self {
        Self {
            name: name.into(),
            ty,
            description: None,
            allowed: Vec::new(),
        }
    }
}

/// The columns an answer is parsed into; one JSON object per answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSchema {
    /// The columns, in order.
    pub fields: Vec<Field>,
}

/// Why a schema did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid output schema at character {at}: {reason}")]
pub struct SchemaError {
    /// 0-based character offset.
    pub at: usize,
    /// What was wrong there.
    pub reason: String,
}

/// Why an answer did not fit the schema; the message quotes the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AnswerError(pub String);

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::String => f.write_str("STRING"),
            Self::Int64 => f.write_str("INT64"),
            Self::Float64 => f.write_str("FLOAT64"),
            Self::Bool => f.write_str("BOOL"),
            Self::Array(t) => write!(f, "ARRAY<{t}>"),
            Self::Struct(fields) => {
                f.write_str("STRUCT<")?;
                for (i, x) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{} {}", x.name, x.ty)?;
                }
                f.write_str(">")
            }
        }
    }
}

impl fmt::Display for OutputSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, x) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {}", x.name, x.ty)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Sym(char),
}

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, SchemaError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((start, Tok::Ident(chars[start..i].iter().collect())));
        } else if c == '`' {
            // A quoted name, as BigQuery allows.
            let start = i;
            i += 1;
            let mut name = String::new();
            while i < chars.len() && chars[i] != '`' {
                name.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err(SchemaError {
                    at: start,
                    reason: "unterminated `quoted name`".into(),
                });
            }
            i += 1;
            out.push((start, Tok::Ident(name)));
        } else if c == '\'' || c == '"' {
            let start = i;
            i += 1;
            let mut text = String::new();
            loop {
                match chars.get(i) {
                    None => {
                        return Err(SchemaError {
                            at: start,
                            reason: "unterminated string".into(),
                        });
                    }
                    Some('\\') => {
                        if let Some(&n) = chars.get(i + 1) {
                            text.push(n);
                        }
                        i += 2;
                    }
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some(&o) => {
                        text.push(o);
                        i += 1;
                    }
                }
            }
            out.push((start, Tok::Str(text)));
        } else if "<>,()=".contains(c) {
            out.push((i, Tok::Sym(c)));
            i += 1;
        } else {
            return Err(SchemaError {
                at: i,
                reason: format!("unexpected `{c}`"),
            });
        }
    }
    Ok(out)
}

/// BigQuery's limit on nested `STRUCT` (RECORD) levels. It also bounds
/// this parser's recursion (and that of everything that walks a schema),
/// so a schema of a million `STRUCT<`s is an error, not a stack overflow.
const MAX_STRUCT_DEPTH: usize = 15;

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
    /// `STRUCT`s open around the current position.
    depth: usize,
}

impl Parser {
    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |t| t.0)
    }

    fn err<T>(&self, reason: impl Into<String>) -> Result<T, SchemaError> {
        Err(SchemaError {
            at: self.at(),
            reason: reason.into(),
        })
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }

    fn sym(&mut self, c: char) -> Result<(), SchemaError> {
        match self.peek() {
            Some(Tok::Sym(x)) if *x == c => {
                self.pos += 1;
                Ok(())
            }
            Some(t) => self.err(format!("expected `{c}`, found {}", show(t))),
            None => self.err(format!("expected `{c}`, found the end")),
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, SchemaError> {
        match self.peek().cloned() {
            Some(Tok::Ident(s)) => {
                self.pos += 1;
                Ok(s)
            }
            Some(t) => self.err(format!("expected {what}, found {}", show(&t))),
            None => self.err(format!("expected {what}, found the end")),
        }
    }

    fn fields(&mut self, close: Option<char>) -> Result<Vec<Field>, SchemaError> {
        let mut fields: Vec<Field> = vec![];
        loop {
            let at = self.at();
            let name = self.ident("a field name")?;
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(SchemaError {
                    at,
                    reason: format!(
                        "`{name}` is not a valid field name (letters, digits, underscores; not starting with a digit)"
                    ),
                });
            }
            if fields.iter().any(|f| f.name.eq_ignore_ascii_case(&name)) {
                return Err(SchemaError {
                    at,
                    reason: format!("field `{name}` is given twice"),
                });
            }
            let ty = self.ty()?;
            let mut field = Field::new(name, ty);
            if matches!(self.peek(), Some(Tok::Ident(s)) if s.eq_ignore_ascii_case("OPTIONS")) {
                self.pos += 1;
                field.description = self.options()?;
            }
            fields.push(field);
            match (self.peek(), close) {
                (Some(Tok::Sym(',')), _) => self.pos += 1,
                (None, None) => return Ok(fields),
                (Some(Tok::Sym(c)), Some(want)) if *c == want => return Ok(fields),
                (Some(t), _) => {
                    let t = show(t);
                    return self.err(format!("expected `,` or the end of the fields, found {t}"));
                }
                (None, Some(want)) => return self.err(format!("missing `{want}`")),
            }
        }
    }

    fn options(&mut self) -> Result<Option<String>, SchemaError> {
        self.sym('(')?;
        let mut description;
        loop {
            let key = self.ident("an option name")?;
            self.sym('=')?;
            let value = match self.peek().cloned() {
                Some(Tok::Str(s)) => {
                    self.pos += 1;
                    s
                }
                _ => return self.err("an option value must be a quoted string"),
            };
            if key.eq_ignore_ascii_case("description") {
                description = Some(value);
            } else {
                return self.err(format!("unknown option `{key}` (only description)"));
            }
            match self.peek() {
                Some(Tok::Sym(',')) => self.pos += 1,
                Some(Tok::Sym(')')) => {
                    self.pos += 1;
                    return Ok(description);
                }
                _ => return self.err("expected `,` or `)` in OPTIONS(…)"),
            }
        }
    }

    fn ty(&mut self) -> Result<FieldType, SchemaError> {
        let at = self.at();
        let name = self.ident("a type")?;
        Ok(match name.to_ascii_uppercase().as_str() {
            "STRING" => FieldType::String,
            "INT64" | "INT" | "INTEGER" | "BIGINT" | "SMALLINT" | "TINYINT" | "BYTEINT" => {
                FieldType::Int64
            }
            "FLOAT64" | "FLOAT" | "DOUBLE" | "NUMERIC" | "DECIMAL" | "BIGNUMERIC" => {
                FieldType::Float64
            }
            "BOOL" | "BOOLEAN" => FieldType::Bool,
            "ARRAY" => {
                self.sym('<')?;
                // Refused before the inner type is parsed, so that arrays
                // cannot nest deeper than one level between STRUCTs.
                if matches!(self.peek(), Some(Tok::Ident(t)) if t.eq_ignore_ascii_case("ARRAY")) {
                    return Err(SchemaError {
                        at,
                        reason: "ARRAY<ARRAY<…>> is not allowed (wrap the inner array in a STRUCT)"
                            .into(),
                    });
                }
                let inner = self.ty()?;
                self.sym('>')?;
                FieldType::Array(Box::new(inner))
            }
            "STRUCT" => {
                if self.depth == MAX_STRUCT_DEPTH {
                    return Err(SchemaError {
                        at,
                        reason: format!(
                            "STRUCTs nested more than {MAX_STRUCT_DEPTH} levels deep \
                             (BigQuery's limit)"
                        ),
                    });
                }
                self.sym('<')?;
                self.depth += 1;
                let fields = self.fields(Some('>'))?;
                self.depth -= 1;
                self.sym('>')?;
                FieldType::Struct(fields)
            }
            other => {
                return Err(SchemaError {
                    at,
                    reason: format!(
                        "unknown type `{other}` (STRING, INT64, FLOAT64, BOOL, ARRAY<T>, STRUCT<…>)"
                    ),
                });
            }
        })
    }
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Sym(c) => format!("`{c}`"),
    }
}

impl FromStr for OutputSchema {
    type Err = SchemaError;

    fn from_str(s: &str) -> Result<Self, SchemaError> {
        let toks = lex(s)?;
        if toks.is_empty() {
            return Err(SchemaError {
                at: 0,
                reason: "the schema is empty; give fields as `name TYPE, …`".into(),
            });
        }
        let mut p = Parser {
            toks,
            pos: 0,
            len: s.chars().count(),
            depth: 0,
        };
        Ok(Self {
            fields: p.fields(None)?,
        })
    }
}

fn vertex_type(f: &Field) -> Value {
    let mut v = match &f.ty {
        FieldType::String => json!({"type": "STRING"}),
        FieldType::Int64 => json!({"type": "INTEGER", "format": "int64"}),
        FieldType::Float64 => json!({"type": "NUMBER", "format": "double"}),
        FieldType::Bool => json!({"type": "BOOLEAN"}),
        FieldType::Array(t) => {
            json!({"type": "ARRAY", "items": vertex_type(&Field::new("item", (**t).clone()))})
        }
        FieldType::Struct(fields) => vertex_object(fields),
    };
    if let Some(d) = &f.description {
        v["description"] = d.clone().into();
    }
    if !f.allowed.is_empty() {
        v["enum"] = json!(f.allowed);
    }
    v
}

fn vertex_object(fields: &[Field]) -> Value {
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    let props: Map<String, Value> = fields
        .iter()
        .map(|f| (f.name.clone(), vertex_type(f)))
        .collect();
    json!({"type": "OBJECT", "properties": props, "required": names, "propertyOrdering": names})
}

fn json_schema_type(f: &Field) -> Value {
    let mut v = match &f.ty {
        FieldType::String => json!({"type": "string"}),
        FieldType::Int64 => json!({"type": "integer"}),
        FieldType::Float64 => json!({"type": "number"}),
        FieldType::Bool => json!({"type": "boolean"}),
        FieldType::Array(t) => {
            json!({"type": "array", "items": json_schema_type(&Field::new("item", (**t).clone()))})
        }
        FieldType::Struct(fields) => json_object(fields),
    };
    if let Some(d) = &f.description {
        v["description"] = d.clone().into();
    }
    if !f.allowed.is_empty() {
        v["enum"] = json!(f.allowed);
    }
    v
}

fn json_object(fields: &[Field]) -> Value {
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    let props: Map<String, Value> = fields
        .iter()
        .map(|f| (f.name.clone(), json_schema_type(f)))
        .collect();
    json!({"type": "object", "properties": props, "required": names, "additionalProperties": false})
}

/// Quotes an answer for a status message, cut to a readable length.
pub fn quote(text: &str) -> String {
    let mut q: String = text.chars().take(120).collect();
    if q.len() < text.len() {
        q.push('…');
    }
    format!("{q:?}")
}

fn check(path: &str, f: &Field, v: &Value) -> Result<Value, AnswerError> {
    // The value as JSON text (a string keeps its quotes), cut if long.
    let bad = |what: &str| {
        let text = v.to_string();
        let mut shown: String = text.chars().take(120).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        Err(AnswerError(format!("`{path}` is not {what}: {shown}")))
    };
    match &f.ty {
        FieldType::String => match v.as_str() {
            Some(s) if !f.allowed.is_empty() && !f.allowed.iter().any(|a| a == s) => {
                Err(AnswerError(format!(
                    "`{path}` is {}, not one of {:?}",
                    quote(s),
                    f.allowed
                )))
            }
            Some(_) => Ok(v.clone()),
            None => bad("a string"),
        },
        // JSON has one number type: an integral value written as `4.0` is
        // accepted as 4 (a model writing 4.0 meant 4); 4.5 is not an integer.
        FieldType::Int64 => match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(i.into())
                } else if n.is_u64() {
                    Err(AnswerError(format!(
                        "`{path}` is out of the INT64 range: {n}"
                    )))
                } else {
                    match n.as_f64() {
                        // i64 as f64 spans [-2^63, 2^63).
                        Some(x)
                            if x.fract() == 0.0
                                && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18)
                                    .contains(&x) =>
                        {
                            Ok((x as i64).into())
                        }
                        Some(x) if x.fract() == 0.0 => Err(AnswerError(format!(
                            "`{path}` is out of the INT64 range: {n}"
                        ))),
                        _ => bad("an integer"),
                    }
                }
            }
            _ => bad("an integer"),
        },
        FieldType::Float64 => match v.as_f64() {
            Some(x) => Ok(json!(x)),
            None => bad("a number"),
        },
        FieldType::Bool => match v {
            Value::Bool(_) => Ok(v.clone()),
            _ => bad("a boolean"),
        },
        FieldType::Array(t) => match v {
            Value::Array(items) => {
                let inner = Field::new("item", (**t).clone());
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        if x.is_null() {
                            Err(AnswerError(format!(
                                "`{path}[{i}]` is null (arrays cannot hold NULL)"
                            )))
                        } else {
                            check(&format!("{path}[{i}]"), &inner, x)
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            }
            _ => bad("an array"),
        },
        FieldType::Struct(fields) => match v {
            Value::Object(o) => check_object(Some(path), fields, o).map(Value::Object),
            _ => bad("an object"),
        },
    }
}

fn check_object(
    path: Option<&str>,
    fields: &[Field],
    o: &Map<String, Value>,
) -> Result<Map<String, Value>, AnswerError> {
    let mut out = Map::new();
    for f in fields {
        let p = match path {
            Some(p) => format!("{p}.{}", f.name),
            None => f.name.clone(),
        };
        // A NULL field is a NULL column, as BigQuery reads it.
        let value = match o.get(&f.name) {
            None => return Err(AnswerError(format!("the answer has no field `{p}`"))),
            Some(Value::Null) => Value::Null,
            Some(v) => check(&p, f, v)?,
        };
        out.insert(f.name.clone(), value);
    }
    Ok(out)
}

/// The JSON inside an answer: as it is, or inside one Markdown code fence
/// (which unconstrained models add; Gemini with a schema never does).
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```")
        && let Some(body) = rest.strip_suffix("```")
    {
        let body = body.strip_prefix("json").unwrap_or(body);
        return body.trim();
    }
    t
}

impl OutputSchema {
    /// The one-field schema of `AI.GENERATE_DOUBLE`/`_INT`/`_BOOL`: a
    /// column `result` of type `ty`.
    pub fn result(ty: FieldType) -> Self {
        Self {
            fields: vec![Field::new("result", ty)],
        }
    }

    /// Gemini's `responseSchema` (the OpenAPI subset): one OBJECT with every
    /// field required, in order.
    pub fn to_vertex(&self) -> Value {
        vertex_object(&self.fields)
    }

    /// JSON Schema for OpenAI-compatible `response_format` and Ollama's
    /// `format`.
    pub fn to_json_schema(&self) -> Value {
        json_object(&self.fields)
    }

    /// Parses an answer: a JSON object with every field, each of its type.
    /// Numbers are JSON's (`2` is a valid FLOAT64, `4.0` a valid INT64);
    /// strings are never converted (`"true"` is not a BOOL).
    pub fn parse_answer(&self, text: &str) -> Result<Map<String, Value>, AnswerError> {
        let json = strip_fence(text);
        let v: Value = serde_json::from_str(json)
            .map_err(|_| AnswerError(format!("the answer is not JSON: {}", quote(text))))?;
        match v {
            Value::Object(o) => check_object(None, &self.fields, &o),
            // One field: a bare value is that field (some servers answer a
            // one-field schema with the value alone).
            other if self.fields.len() == 1 && !other.is_null() => {
                let f = &self.fields[0];
                let mut m = Map::new();
                m.insert(f.name.clone(), check(&f.name, f, &other)?);
                Ok(m)
            }
            _ => Err(AnswerError(format!(
                "the answer is not a JSON object: {}",
                quote(text)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bigquery_syntax() {
        let s: OutputSchema =
            "name STRING, age int64, score FLOAT64 OPTIONS(description = \"0 to 1\"), \
             ok BOOL, tags ARRAY<STRING>, `loc` STRUCT<lat FLOAT64, lon FLOAT64>"
                .parse()
                .unwrap();
        assert_eq!(s.fields.len(), 6);
        assert_eq!(s.fields[1].ty, FieldType::Int64);
        assert_eq!(s.fields[2].description.as_deref(), Some("0 to 1"));
        assert_eq!(
            s.to_string(),
            "name STRING, age INT64, score FLOAT64, ok BOOL, tags ARRAY<STRING>, loc STRUCT<lat FLOAT64, lon FLOAT64>"
        );
        let v = s.to_vertex();
        assert_eq!(
            v["properties"]["age"],
            json!({"type": "INTEGER", "format": "int64"})
        );
        assert_eq!(v["properties"]["score"]["description"], "0 to 1");
        assert_eq!(
            v["properties"]["loc"]["properties"]["lat"]["type"],
            "NUMBER"
        );
        assert_eq!(v["propertyOrdering"][5], "loc");
        let j = s.to_json_schema();
        assert_eq!(
            j["properties"]["tags"],
            json!({"type": "array", "items": {"type": "string"}})
        );
        assert_eq!(j["additionalProperties"], false);
    }

    #[test]
    fn schema_mistakes_are_named() {
        for (bad, says) in [
            ("", "empty"),
            ("name", "expected a type"),
            ("name TEXT", "unknown type `TEXT`"),
            ("a STRING, a INT64", "given twice"),
            ("a ARRAY<ARRAY<INT64>>", "ARRAY<ARRAY"),
            ("a STRUCT<b INT64", "missing `>`"),
            ("a STRING b STRING", "expected `,`"),
            ("a STRING OPTIONS(colour='red')", "unknown option"),
            ("1a STRING", "not a valid field name"),
            ("a STRING OPTIONS(description='x", "unterminated"),
            ("a STRING;", "unexpected `;`"),
        ] {
            let e = bad.parse::<OutputSchema>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// BigQuery's 15 levels of STRUCT, and no deeper: a schema nested a
    /// hundred thousand levels (or arrays of arrays as deep) is refused at
    /// its 16th level instead of overflowing the stack.
    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize| format!("a {}STRING{}", "STRUCT<a ".repeat(n), ">".repeat(n));
        let s: OutputSchema = nested(15).parse().unwrap();
        assert!(
            s.parse_answer(&format!("{}\"x\"{}", r#"{"a":"#.repeat(16), "}".repeat(16)))
                .is_ok()
        );
        for bad in [nested(16), nested(100_000)] {
            let e = bad.parse::<OutputSchema>().unwrap_err();
            assert!(e.reason.contains("15 levels"), "{e}");
            assert_eq!(e.at, 2 + 15 * "STRUCT<a ".len());
        }
        let arrays = format!("a {}", "ARRAY<".repeat(100_000));
        let e = arrays.parse::<OutputSchema>().unwrap_err();
        assert!(e.reason.contains("ARRAY<ARRAY"), "{e}");
    }

    #[test]
    fn answers_are_typed_by_the_rules() {
        let d = OutputSchema::result(FieldType::Float64);
        assert_eq!(
            d.parse_answer(r#"{"result": 2}"#).unwrap()["result"],
            json!(2.0)
        );
        assert!(d.parse_answer(r#"{"result": 2}"#).unwrap()["result"].is_f64());
        assert_eq!(d.parse_answer("3.5").unwrap()["result"], json!(3.5));
        let e = d.parse_answer("about 4").unwrap_err().to_string();
        assert!(e.contains("not JSON") && e.contains("\"about 4\""), "{e}");
        let e = d
            .parse_answer(r#"{"result": "4"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");

        let i = OutputSchema::result(FieldType::Int64);
        assert_eq!(
            i.parse_answer(r#"{"result": 4.0}"#).unwrap()["result"],
            json!(4)
        );
        assert!(i.parse_answer(r#"{"result": 4.5}"#).is_err());
        let e = i
            .parse_answer(r#"{"result": 9223372036854775808}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of the INT64 range"), "{e}");
        assert!(i.parse_answer(r#"{"result": 1e300}"#).is_err());
        assert_eq!(
            i.parse_answer(r#"{"result": -9223372036854775808}"#)
                .unwrap()["result"],
            json!(i64::MIN)
        );

        let b = OutputSchema::result(FieldType::Bool);
        assert_eq!(
            b.parse_answer(r#"{"result": true}"#).unwrap()["result"],
            json!(true)
        );
        let e = b
            .parse_answer(r#"{"result": "true"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a boolean"), "{e}");

        let s: OutputSchema = "tags ARRAY<INT64>, p STRUCT<x BOOL>".parse().unwrap();
        assert!(
            s.parse_answer("```json\n{\"tags\": [1, 2], \"p\": {\"x\": false}}\n```")
                .is_ok()
        );
        let e = s
            .parse_answer(r#"{"tags": [1, null], "p": {"x": false}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tags[1]"), "{e}");
        let e = s.parse_answer(r#"{"tags": []}"#).unwrap_err().to_string();
        assert!(e.contains("no field `p`"), "{e}");
        let e = s
            .parse_answer(r#"{"tags": [], "p": {"x": 1}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`p.x` is not a boolean"), "{e}");
        // NULL fields are NULL columns; extra fields are ignored.
        let ok = s
            .parse_answer(r#"{"tags": null, "p": {"x": true}, "extra": 1}"#)
            .unwrap();
        assert!(ok["tags"].is_null());
        assert!(!ok.contains_key("extra"));
    }

    #[test]
    fn enums_restrict_strings() {
        let mut f = Field::new("label", FieldType::String);
        f.allowed = vec!["cat".into(), "dog".into()];
        let s = OutputSchema { fields: vec![f] };
        assert_eq!(
            s.to_vertex()["properties"]["label"]["enum"],
            json!(["cat", "dog"])
        );
        assert!(s.parse_answer(r#"{"label": "dog"}"#).is_ok());
        assert!(s.parse_answer(r#"{"label": "bird"}"#).is_err());
    }
}
