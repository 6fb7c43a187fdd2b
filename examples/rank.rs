//! Ranks a folder of images against text queries with the local backend.
//!
//! ```text
//! cargo run --example rank -- [--model DIR|ID] [--space ID] [--images DIR] "query" ...
//! ```
//!
//! `--model` takes a checkpoint directory, a built-in id
//! (`openai/clip-vit-base-patch32`, ...) or a hub repository; the default is
//! `$MMEMBED_MODEL`, else the bundled demo model (`models/demo`: shapes and
//! colours only, see its README). `scripts/demo.sh` draws scenes for it.

use std::path::PathBuf;

use mmembed::local::{LocalEmbedder, LocalOptions};
use mmembed::{EmbedRequest, Embedder, cosine};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut model = std::env::var("MMEMBED_MODEL")
        .unwrap_or_else(|_| root.join("models/demo").display().to_string());
    let mut images = root.join("models/fixtures/images");
    let mut space = None;
    let mut queries = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model = args.next().ok_or("--model needs a value")?,
            "--space" => space = Some(args.next().ok_or("--space needs a value")?),
            "--images" => images = args.next().ok_or("--images needs a value")?.into(),
            "-h" | "--help" => {
                println!("usage: rank [--model DIR|ID] [--space ID] [--images DIR] QUERY...");
                return Ok(());
            }
            _ => queries.push(a),
        }
    }
    if queries.is_empty() {
        queries = vec!["a photo of a cat".into(), "a cup of coffee".into()];
    }

    let mut opts = LocalOptions::new(model);
    if let Some(s) = space {
        opts = opts.with_space(s);
    }
    let local = LocalEmbedder::load(opts).await?;
    let info = local.info();
    println!(
        "model {} | space {} | {} dimensions",
        info.model_id, info.space, info.native_dimension
    );
    if info.model_id.ends_with("tiny-clip") {
        println!(
            "(tiny random-weight parity model: the pipeline runs, the ranking is meaningless)"
        );
    }

    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                ["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif", "tiff"]
                    .contains(&e.to_ascii_lowercase().as_str())
            })
        })
        .collect();
    files.sort();
    let reqs = files
        .iter()
        .map(|f| EmbedRequest::image(f.clone()))
        .collect();
    let results = local.embed_batch(reqs).await;
    let mut vectors = Vec::new();
    for (f, r) in files.iter().zip(results) {
        match r {
            Ok(e) => vectors.push((f, e.image.unwrap_or_default())),
            Err(e) => eprintln!("skipped {}: {e}", f.display()),
        }
    }
    for q in &queries {
        let t = local.embed(EmbedRequest::text(q.clone())).await?;
        let t = t.text.unwrap_or_default();
        let mut ranked: Vec<_> = vectors.iter().map(|(f, v)| (cosine(&t, v), f)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("\n{q:?}");
        for (score, f) in ranked.iter().take(5) {
            println!("  {score:+.4}  {}", f.display());
        }
    }
    Ok(())
}
