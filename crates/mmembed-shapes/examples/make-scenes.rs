//! Writes a handful of shape scenes as PNG files, named after what they show
//! (`large-red-circle-left.png`, ...), and optionally a slideshow video of
//! further scenes, for demos of the bundled model:
//! `cargo run -p mmembed-shapes --example make-scenes -- OUT_DIR [COUNT] [--slideshow]`.
//!
//! The slideshow (`slideshow.mp4`, needs the `ffmpeg` CLI) shows one scene
//! per 4 seconds; what each interval shows is printed.

use std::process::Command;

use mmembed_shapes::{Attributes, Scene};
use rand::SeedableRng;
use rand::seq::SliceRandom;

const SLIDES: usize = 4;
const SECONDS_PER_SLIDE: u32 = 4;

fn name(a: &Attributes) -> String {
    format!(
        "{}-{}-{}-{}",
        a.size.name(),
        a.colour.name(),
        a.shape.name(),
        a.position.phrase().rsplit(' ').next().unwrap_or("center")
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let slideshow = args.iter().any(|a| a == "--slideshow");
    let mut pos = args.iter().filter(|a| !a.starts_with("--"));
    let out = pos
        .next()
        .ok_or("usage: make-scenes OUT_DIR [COUNT] [--slideshow]")?;
    let count: usize = pos.next().map_or(Ok(12), |n| n.parse())?;
    let out = std::path::Path::new(out);
    std::fs::create_dir_all(out)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut all = Attributes::all();
    all.shuffle(&mut rng);
    let mut all = all.into_iter();
    for (i, a) in all.by_ref().take(count).enumerate() {
        let path = out.join(format!("{}.png", name(&a)));
        Scene::random(a, &mut rng)
            .render(256, 256, i as u64)
            .save(&path)?;
        println!("{}", path.display());
    }
    if slideshow {
        let frames = tempfile::tempdir()?;
        for (i, a) in all.take(SLIDES).enumerate() {
            Scene::random(a, &mut rng)
                .render(320, 240, 1000 + i as u64)
                .save(frames.path().join(format!("slide{i:02}.png")))?;
            let t = i as u32 * SECONDS_PER_SLIDE;
            println!(
                "slideshow.mp4 {t}-{} s: {}",
                t + SECONDS_PER_SLIDE,
                name(&a)
            );
        }
        let video = out.join("slideshow.mp4");
        let st = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-y", "-framerate"])
            .arg(format!("1/{SECONDS_PER_SLIDE}"))
            .arg("-i")
            .arg(frames.path().join("slide%02d.png"))
            .args(["-vf", "fps=25,format=yuv420p", "-c:v", "libx264"])
            .arg(&video)
            .status()
            .map_err(|e| format!("cannot run the ffmpeg CLI: {e}"))?;
        if !st.success() {
            return Err(format!("ffmpeg failed making {}", video.display()).into());
        }
        println!("{}", video.display());
    }
    Ok(())
}
