//! Model manifests: which hub repository and pinned revision a model id
//! means, and the embedding space its vectors live in.

use serde::Deserialize;

/// One entry of `models/*.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The id callers use (`openai/clip-vit-base-patch32`).
    pub id: String,
    /// Hugging Face repository.
    pub repo: String,
    /// Pinned commit, so the same id always means the same weights.
    pub revision: String,
    /// Embedding space id of its vectors.
    pub space: String,
    /// Native vector size.
    pub dimension: usize,
    /// The architecture family (`config.json`'s `model_type`: `clip`,
    /// `siglip`, `siglip2`, `chinese_clip`; `mobileclip` for open_clip's MobileCLIP
    /// checkpoints), for listings before the weights are here;
    /// loading reads the family from the checkpoint's own config.
    #[serde(default = "clip")]
    pub family: String,
    /// Whether this is the default local model.
    #[serde(default)]
    pub default: bool,
    /// One line for listings.
    pub description: String,
}

fn clip() -> String {
    "clip".into()
}

// The manifests ship inside the binary so a model id works from anywhere.
const BUILTIN: &[(&str, &str)] = &[
    (
        "openai-clip-vit-base-patch32.toml",
        include_str!("../../../models/openai-clip-vit-base-patch32.toml"),
    ),
    (
        "openai-clip-vit-base-patch16.toml",
        include_str!("../../../models/openai-clip-vit-base-patch16.toml"),
    ),
    (
        "openai-clip-vit-large-patch14.toml",
        include_str!("../../../models/openai-clip-vit-large-patch14.toml"),
    ),
    (
        "laion-clip-vit-b-32-laion2b.toml",
        include_str!("../../../models/laion-clip-vit-b-32-laion2b.toml"),
    ),
    (
        "google-siglip-base-patch16-224.toml",
        include_str!("../../../models/google-siglip-base-patch16-224.toml"),
    ),
    (
        "google-siglip2-base-patch16-224.toml",
        include_str!("../../../models/google-siglip2-base-patch16-224.toml"),
    ),
    (
        "google-siglip2-base-patch16-naflex.toml",
        include_str!("../../../models/google-siglip2-base-patch16-naflex.toml"),
    ),
    (
        "ofa-sys-chinese-clip-vit-base-patch16.toml",
        include_str!("../../../models/ofa-sys-chinese-clip-vit-base-patch16.toml"),
    ),
    (
        "apple-mobileclip-s1-openclip.toml",
        include_str!("../../../models/apple-mobileclip-s1-openclip.toml"),
    ),
    (
        "apple-mobileclip-s2-openclip.toml",
        include_str!("../../../models/apple-mobileclip-s2-openclip.toml"),
    ),
];

impl Manifest {
    /// Parses one manifest.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The manifests built into this library.
    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .map(|(name, text)| {
                Self::from_toml(text)
                    .unwrap_or_else(|e| panic!("built-in manifest {name} is invalid: {e}"))
            })
            .collect()
    }

    /// The built-in manifest with this id, if any.
    pub fn find(id: &str) -> Option<Self> {
        Self::builtin().into_iter().find(|m| m.id == id)
    }

    /// The default local model.
    pub fn default_model() -> Self {
        Self::builtin()
            .into_iter()
            .find(|m| m.default)
            .unwrap_or_else(|| unreachable!("one built-in manifest is the default"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifests_parse_and_are_pinned() {
        let all = Manifest::builtin();
        assert!(all.len() >= 4);
        assert_eq!(all.iter().filter(|m| m.default).count(), 1);
        assert_eq!(Manifest::default_model().id, "openai/clip-vit-base-patch32");
        for m in &all {
            assert_eq!(m.revision.len(), 40, "{} revision is a commit sha", m.id);
            assert!(m.revision.chars().all(|c| c.is_ascii_hexdigit()));
            if m.family == crate::Family::MobileClip.name() {
                continue; // open_clip's configs, not config.json
            }
            let family =
                crate::ClipConfig::from_json(&format!(r#"{{"model_type": "{}"}}"#, m.family))
                    .map(|c| c.model_type());
            assert_eq!(family, Ok(m.family.as_str()), "{}", m.id);
        }
        let families: std::collections::HashSet<_> = all.iter().map(|m| &m.family).collect();
        assert_eq!(families.len(), 5, "{families:?}");
        let spaces: std::collections::HashSet<_> = all.iter().map(|m| &m.space).collect();
        assert_eq!(spaces.len(), all.len(), "every model has its own space");
        assert!(Manifest::find("laion/CLIP-ViT-B-32-laion2B-s34B-b79K").is_some());
    }

    #[test]
    fn unknown_fields_are_errors() {
        let e = Manifest::from_toml(
            "id='a'\nrepo='b'\nrevision='c'\nspace='d'\ndimension=1\ndescription=''\ncolour='red'",
        );
        assert!(e.unwrap_err().contains("colour"));
    }
}
