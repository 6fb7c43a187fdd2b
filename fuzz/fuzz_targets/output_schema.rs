//! BigQuery's `output_schema` syntax and the answers typed by it
//! (`mmembed_core::schema`): the schema is user input, the answer a model's
//! free text. Input: a schema, a NUL byte, an answer. Neither may panic or
//! overflow the stack; a schema that parses must translate to Gemini's and
//! JSON Schema's forms, and an answer it accepts must hold every field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmembed_core::schema::OutputSchema;

fuzz_target!(|data: &[u8]| {
    let (schema, answer) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(schema) = std::str::from_utf8(schema) else {
        return;
    };
    let Ok(s) = schema.parse::<OutputSchema>() else {
        return;
    };
    assert!(!s.fields.is_empty());
    let _ = (s.to_vertex(), s.to_json_schema());
    // The schema as Display writes it (names and types; descriptions left
    // out) parses back to the same names and types.
    let text = s.to_string();
    let again: OutputSchema = text.parse().expect("a schema's own text parses");
    assert_eq!(again.to_string(), text);
    if let Ok(row) = s.parse_answer(&String::from_utf8_lossy(answer)) {
        for f in &s.fields {
            assert!(row.contains_key(&f.name), "{} missing from {row:?}", f.name);
        }
    }
});
