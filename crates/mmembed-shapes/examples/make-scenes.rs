//! Writes a handful of shape scenes as PNG files, named after what they show
//! (`large-red-circle-left.png`, ...), for demos of the bundled model:
//! `cargo run -p mmembed-shapes --example make-scenes -- OUT_DIR [COUNT]`.

use mmembed_shapes::{Attributes, Scene};
use rand::SeedableRng;
use rand::seq::SliceRandom;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().ok_or("usage: make-scenes OUT_DIR [COUNT]")?;
    let count: usize = args.next().map_or(Ok(12), |n| n.parse())?;
    std::fs::create_dir_all(&out)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut all = Attributes::all();
    all.shuffle(&mut rng);
    for (i, a) in all.into_iter().take(count).enumerate() {
        let name = format!(
            "{}-{}-{}-{}.png",
            a.size.name(),
            a.colour.name(),
            a.shape.name(),
            a.position.phrase().rsplit(' ').next().unwrap_or("center")
        );
        let path = std::path::Path::new(&out).join(name);
        Scene::random(a, &mut rng)
            .render(256, 256, i as u64)
            .save(&path)?;
        println!("{}", path.display());
    }
    Ok(())
}
