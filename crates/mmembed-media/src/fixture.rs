//! The Pillow fixtures the tests hold decoding and resampling to: files
//! and the pixels Pillow made of them, written by `models/fixtures/make_*.py`.

use std::path::PathBuf;

use serde_json::Value;

/// One fixture folder: `cases.json`'s cases, and the blob of bytes
/// their offsets index.
pub(crate) struct Fixture {
    pub dir: PathBuf,
    pub cases: Vec<Value>,
    pub blob: Vec<u8>,
}

impl Fixture {
    /// `models/fixtures/{name}`, its blob named `blob`.
    pub(crate) fn open(name: &str, blob: &str) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/fixtures")
            .join(name);
        let meta: Value =
            serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        Self {
            blob: std::fs::read(dir.join(blob)).unwrap(),
            cases: meta["cases"].as_array().unwrap().clone(),
            dir,
        }
    }

    /// A case's `size` (width, height) and its pixels of `channels`
    /// bytes at its `offset`.
    pub(crate) fn pixels(&self, case: &Value, channels: u32) -> ((u32, u32), &[u8]) {
        let size = |i: usize| case["size"][i].as_u64().unwrap() as u32;
        let (w, h) = (size(0), size(1));
        let o = case["offset"].as_u64().unwrap() as usize;
        ((w, h), &self.blob[o..o + (w * h * channels) as usize])
    }

    /// A case's file's bytes.
    pub(crate) fn file(&self, case: &Value) -> (String, Vec<u8>) {
        let name = case["file"].as_str().unwrap().to_string();
        let bytes = std::fs::read(self.dir.join(&name)).unwrap();
        (name, bytes)
    }
}

/// A seeded xorshift64 stream, for the tests that change fixtures' bytes
/// at random: the same changes on every run.
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
