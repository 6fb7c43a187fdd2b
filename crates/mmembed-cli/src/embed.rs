//! `mmembed embed`: embeds texts, images and videos given on the command
//! line and prints one JSON object per input.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args as ClapArgs;
use mmembed::{EmbedRequest, Media, MediaSource};
use serde_json::{Value, json};

use crate::backend::{BackendArgs, SegmentArgs};
use crate::inputs::{self, Kind};

/// Flags of `mmembed embed`.
#[derive(Debug, ClapArgs)]
#[command(after_help = "Examples:
  mmembed embed --model demo --text 'a red star' --text 'a blue square'
  mmembed embed --model demo photo.png clip.mp4 --interval 8
  cat captions.txt | mmembed embed --model demo --text -
  mmembed embed --backend vertex --project my-proj --image - < photo.jpg")]
pub struct Args {
    /// Image or video files, told apart by extension (`-`: not allowed
    /// here; use --image - or --video -).
    pub files: Vec<PathBuf>,

    /// A text to embed; repeatable. `-` reads one text per line from stdin.
    #[arg(long, short = 't')]
    pub text: Vec<String>,

    /// An image file; repeatable. `-` reads the image from stdin.
    #[arg(long, short = 'i')]
    pub image: Vec<PathBuf>,

    /// A video file; repeatable. `-` reads the video from stdin.
    #[arg(long, short = 'v')]
    pub video: Vec<PathBuf>,

    /// Output dimension (Vertex: 128, 256, 512, 1408).
    #[arg(long, env = "MMEMBED_DIMENSION")]
    pub dimension: Option<u32>,

    #[command(flatten)]
    pub segments: SegmentArgs,

    #[command(flatten)]
    pub backend: BackendArgs,
}

fn is_stdin(p: &std::path::Path) -> bool {
    p.as_os_str() == "-"
}

/// Builds the requests with a label for each; reads stdin at most once.
async fn requests(args: &Args) -> anyhow::Result<Vec<(String, EmbedRequest)>> {
    let stdin_uses = args.text.iter().filter(|t| *t == "-").count()
        + args.image.iter().filter(|p| is_stdin(p)).count()
        + args.video.iter().filter(|p| is_stdin(p)).count();
    if stdin_uses > 1 {
        bail!("stdin (`-`) can feed only one input");
    }
    let read_stdin = || -> anyhow::Result<Vec<u8>> {
        let mut b = vec![];
        std::io::stdin()
            .read_to_end(&mut b)
            .context("reading stdin")?;
        Ok(b)
    };
    let segments = args.segments.config()?;
    let mut out = vec![];
    for t in &args.text {
        if t == "-" {
            let text = String::from_utf8(read_stdin()?).context("stdin is not UTF-8 text")?;
            out.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| (l.to_string(), EmbedRequest::text(l))),
            );
        } else {
            out.push((t.clone(), EmbedRequest::text(t.as_str())));
        }
    }
    // `sniffed`: the type a file's first bytes told, for a name without one.
    let media = |p: &PathBuf,
                 kind: Kind,
                 sniffed: Option<&str>|
     -> anyhow::Result<(String, EmbedRequest)> {
        let (label, source) = if is_stdin(p) {
            ("-".to_string(), MediaSource::Bytes(read_stdin()?.into()))
        } else if let Some(u) = p.to_str().filter(|u| mmembed_store::is_remote(u)) {
            // gs://, s3://, az://, http(s)://: the backend fetches it (or,
            // Vertex and gs://, passes it on).
            (u.to_string(), MediaSource::Uri(u.to_string()))
        } else {
            (p.display().to_string(), MediaSource::Path(p.clone()))
        };
        let media = Media {
            source,
            mime_type: inputs::content_type(&label)
                .map(|(ct, _)| ct)
                .or(sniffed)
                .map(String::from),
        };
        Ok((
            label,
            match kind {
                Kind::Image => EmbedRequest::image(media),
                Kind::Video => EmbedRequest::video(media, segments),
            },
        ))
    };
    for p in &args.image {
        out.push(media(p, Kind::Image, None)?);
    }
    for p in &args.video {
        out.push(media(p, Kind::Video, None)?);
    }
    for p in &args.files {
        if is_stdin(p) {
            bail!("`-` as a file: say what it is with --image - or --video -");
        }
        let name = p.display().to_string();
        // A local file named without an extension is told by its first
        // bytes (a remote one, below, by its metadata first).
        let sniffed = || {
            let worth = mmembed_rows::worth_sniffing(&name, None);
            worth.then(|| mmembed_rows::sniff_file(p)).transpose()
        };
        let typed = match inputs::content_type(&name) {
            Some(t) => Some(t),
            // A remote object named without a type: its stored type, else
            // its first bytes (the backend reads it, as any other).
            None if mmembed_store::is_remote(&name) => remote_typed(&name).await?,
            None => sniffed()
                .with_context(|| format!("reading {name}"))?
                .flatten(),
        };
        let Some((ct, kind)) = typed else {
            bail!(
                "{name}: unknown file type; supported extensions: {} (or pass --image/--video)",
                inputs::supported_extensions()
            );
        };
        out.push(media(p, kind, Some(ct))?);
    }
    if out.is_empty() {
        bail!("nothing to embed: give files, --text, --image or --video (see --help)");
    }
    if let Some(d) = args.dimension {
        for (_, r) in &mut out {
            *r = std::mem::take(r).with_dimension(d);
        }
    }
    Ok(out)
}

/// The type of a remote object whose name has none, as `mmembed batch`
/// types it; `None` when neither its metadata nor its bytes say one.
async fn remote_typed(uri: &str) -> anyhow::Result<Option<(&'static str, Kind)>> {
    let info = mmembed_store::Stores::shared().head(uri).await?;
    Ok(mmembed_rows::object_type(&info, None).await?)
}

/// Prints one JSON line per input; returns how many failed.
pub async fn run(args: Args) -> anyhow::Result<usize> {
    let reqs = requests(&args).await?;
    let embedder = args.backend.build_for(args.dimension).await?;
    let (labels, reqs): (Vec<String>, Vec<EmbedRequest>) = reqs.into_iter().unzip();
    let kinds: Vec<&str> = reqs
        .iter()
        .map(|r| {
            if r.text.is_some() {
                "text"
            } else if r.image.is_some() {
                "image"
            } else {
                "video"
            }
        })
        .collect();
    let results = embedder.embed_batch(reqs).await;
    let mut failed = 0;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for ((label, kind), r) in labels.iter().zip(kinds).zip(results) {
        let v: Value = match r {
            Ok(e) => {
                let mut o = json!({
                    "input": label,
                    "modality": kind,
                    "backend": e.backend,
                    "model": e.model,
                    "space": e.space.as_str(),
                    "dimension": e.dimension,
                });
                if let Some(v) = e.text.or(e.image) {
                    o["embedding"] = json!(v);
                } else {
                    failed += e.video.iter().filter(|s| s.error.is_some()).count();
                    o["segments"] = json!(e.video);
                }
                o
            }
            Err(e) => {
                failed += 1;
                json!({"input": label, "modality": kind, "error": e.to_string()})
            }
        };
        use std::io::Write;
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
    }
    Ok(failed)
}
