//! What a job's results depend on beyond what each row records: the
//! prompt, labels or text of a row job, the decoding and video settings of
//! an embedding job. Parquet outputs and parts keep it in their schema's
//! metadata (key `mmembed.job`, a JSON object of strings), and `--resume`
//! refuses to add rows made otherwise, so one output never mixes two
//! prompts or two decodes. JSON Lines has no place for it: those outputs
//! are not checked (the README says so).

use std::collections::BTreeMap;

use anyhow::bail;
use arrow_schema::Schema;

/// The schema metadata key.
pub(crate) const KEY: &str = "mmembed.job";

/// Settings by name, each as a string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Recipe(BTreeMap<String, String>);

impl Recipe {
    /// The recipe with `name` set to `value`.
    pub(crate) fn with(mut self, name: &str, value: impl ToString) -> Self {
        self.0.insert(name.to_string(), value.to_string());
        self
    }

    /// `schema` with the recipe in its metadata.
    pub(crate) fn attach(&self, schema: &Schema) -> Schema {
        let json = serde_json::to_string(&self.0).expect("a map of strings serialises");
        let mut s = schema.clone();
        s.metadata.insert(KEY, json);
        s
    }

    /// The recipe a schema's metadata records, if any (outputs of earlier
    /// versions and of other tools have none).
    pub(crate) fn of(schema: &Schema) -> Option<Self> {
        schema
            .metadata
            .get(KEY)
            .and_then(|j| serde_json::from_str(j).ok())
            .map(Self)
    }

    /// Refuses to resume `what`, made with `earlier`, with different
    /// settings. Only the settings both record are compared, so a setting
    /// a later version adds does not refuse an older output.
    pub(crate) fn check_resume(&self, what: &str, earlier: &Recipe) -> anyhow::Result<()> {
        let differ: Vec<String> = self
            .0
            .iter()
            .filter_map(|(k, now)| {
                let then = earlier.0.get(k)?;
                (then != now).then(|| format!("{k} {} (now {})", shown(then), shown(now)))
            })
            .collect();
        if differ.is_empty() {
            return Ok(());
        }
        bail!(
            "{what} was made with {}: resuming would mix results of both in one output. \
             Resume with the same settings, or write another output (-o) or replace this one \
             (--overwrite)",
            differ.join(", ")
        )
    }
}

/// A setting for an error message: quoted, long ones shortened.
fn shown(v: &str) -> String {
    const MAX: usize = 60;
    if v.chars().count() <= MAX {
        return format!("{v:?}");
    }
    let head: String = v.chars().take(MAX).collect();
    format!("{head:?}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_round_trip_and_refuse_what_differs() {
        let a = Recipe::default()
            .with("prompt", "Describe {uri}")
            .with("jpeg_draft", false);
        let schema = Schema::empty();
        assert_eq!(Recipe::of(&a.attach(&schema)), Some(a.clone()));
        assert_eq!(Recipe::of(&schema), None);
        assert!(a.check_resume("o.parquet", &a).is_ok());

        let b = a.clone().with("prompt", "x".repeat(100));
        let e = b.check_resume("o.parquet", &a).unwrap_err().to_string();
        assert!(
            e.starts_with("o.parquet was made with prompt \"Describe {uri}\" (now \"xxx")
                && e.contains("…)")
                && e.contains("--overwrite")
                && !e.contains("jpeg_draft"),
            "{e}"
        );
        // A setting only one side records is not compared.
        let c = a.clone().with("fps", 2);
        assert!(c.check_resume("o.parquet", &a).is_ok());
        assert!(a.check_resume("o.parquet", &c).is_ok());
    }
}
