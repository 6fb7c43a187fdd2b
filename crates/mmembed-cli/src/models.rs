//! `mmembed models`: the models this build knows, and whether their weights
//! are on this machine.

use clap::Args as ClapArgs;
use mmembed::local::{
    DEMO_MODEL_ID, DeviceSpec, HubOptions, LocalEmbedder, LocalOptions, Manifest, hub_files,
};
use serde::Serialize;

/// Flags of `mmembed models`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print JSON lines instead of a table.
    #[arg(long, env = "MMEMBED_JSON")]
    pub json: bool,
}

/// One listed model.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// The id to pass as `--model`.
    pub id: String,
    /// Vector length.
    pub dimension: usize,
    /// Architecture family (`clip`, `siglip`, `siglip2`, `chinese_clip`,
    /// `mobileclip`).
    pub family: String,
    /// Embedding space id.
    pub space: String,
    /// Whether the weights are here (the demo model always is).
    pub local: bool,
    /// One line about it.
    pub description: String,
}

/// The bundled demo model first, then the built-in manifests.
pub fn list() -> anyhow::Result<Vec<Listed>> {
    // Loading the demo model is the honest way to get its space id: a hash
    // of its weights, exactly as every load computes it. It takes
    // milliseconds.
    let demo = LocalEmbedder::load_blocking(
        LocalOptions::new(DEMO_MODEL_ID).with_device(DeviceSpec::Cpu),
    )?;
    let info = mmembed::Embedder::info(&demo);
    let mut out = vec![Listed {
        id: DEMO_MODEL_ID.into(),
        dimension: info.native_dimension,
        family: "clip".into(),
        space: info.space.as_str().into(),
        local: true,
        description: "bundled demo: 6 shapes x 8 colours on plain backgrounds, nothing else".into(),
    }];
    let mut offline = HubOptions::from_env();
    offline.offline = true;
    for m in Manifest::builtin() {
        out.push(Listed {
            local: hub_files(&m.repo, &m.revision, &offline).is_ok(),
            id: m.id,
            dimension: m.dimension,
            family: m.family,
            space: m.space,
            description: if m.default {
                format!("{} (default)", m.description)
            } else {
                m.description
            },
        });
    }
    Ok(out)
}

/// Prints the list.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let models = list()?;
    if args.json {
        for m in &models {
            println!("{}", serde_json::to_string(m)?);
        }
        return Ok(());
    }
    let w = models.iter().map(|m| m.id.len()).max().unwrap_or(2);
    let s = models.iter().map(|m| m.space.len()).max().unwrap_or(5);
    let f = models.iter().map(|m| m.family.len()).max().unwrap_or(6);
    println!(
        "{:w$}  {:>5}  {:f$}  {:s$}  LOCAL  DESCRIPTION",
        "ID", "DIM", "FAMILY", "SPACE"
    );
    for m in &models {
        println!(
            "{:w$}  {:>5}  {:f$}  {:s$}  {:5}  {}",
            m.id,
            m.dimension,
            m.family,
            m.space,
            if m.local { "yes" } else { "no" },
            m.description
        );
    }
    Ok(())
}
