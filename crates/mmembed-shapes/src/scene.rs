//! Scenes of one coloured shape on a plain background, their rendering and
//! their captions.

use std::sync::LazyLock;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

/// The shapes the demo model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled square (any rotation).
    Square,
    /// A filled equilateral triangle.
    Triangle,
    /// A five-pointed star.
    Star,
    /// A plus-shaped cross.
    Cross,
    /// An annulus.
    Ring,
}

impl Shape {
    /// Every shape, in a fixed order.
    pub const ALL: [Shape; 6] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Cross,
        Shape::Ring,
    ];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
            Shape::Ring => "ring",
        }
    }

    /// Whether the point `(u, v)`, in the shape's own frame scaled so the
    /// shape fits the unit disc, is inside.
    fn contains(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => u.abs() <= 0.78 && v.abs() <= 0.78,
            Shape::Triangle => in_polygon(&TRIANGLE, u, v),
            Shape::Star => in_polygon(&STAR, u, v),
            Shape::Cross => {
                (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95)
            }
            Shape::Ring => {
                let r2 = u * u + v * v;
                (0.36..=1.0).contains(&r2)
            }
        }
    }
}

// Vertices on the unit circle; built at first use because sin/cos are not
// const.
static TRIANGLE: LazyLock<Vec<(f32, f32)>> =
    LazyLock::new(|| [-90.0, 30.0, 150.0].map(|d| to_xy(d, 1.0)).to_vec());

static STAR: LazyLock<Vec<(f32, f32)>> = LazyLock::new(|| {
    (0..10)
        .map(|i| {
            let r = if i % 2 == 0 { 1.0 } else { 0.42 };
            to_xy(-90.0 + 36.0 * i as f32, r)
        })
        .collect()
});

fn to_xy(deg: f32, r: f32) -> (f32, f32) {
    let a = deg.to_radians();
    (r * a.cos(), r * a.sin())
}

/// Even-odd point-in-polygon test (the star is not convex).
fn in_polygon(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The colours the demo model knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Orange.
    Orange,
    /// Yellow.
    Yellow,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Purple.
    Purple,
    /// White.
    White,
    /// Black.
    Black,
}

impl Colour {
    /// Every colour, in a fixed order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The reference sRGB value (scenes jitter around it).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 30, 35],
            Colour::Orange => [245, 135, 20],
            Colour::Yellow => [240, 215, 35],
            Colour::Green => [35, 165, 60],
            Colour::Blue => [30, 80, 215],
            Colour::Purple => [135, 45, 185],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
        }
    }
}

/// Relative size of the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// Radius 14–19 % of the image side.
    Small,
    /// Radius 23–29 % of the image side.
    Large,
}

impl Size {
    /// Both sizes.
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    fn radius_range(self) -> (f32, f32) {
        match self {
            Size::Small => (0.14, 0.19),
            Size::Large => (0.23, 0.29),
        }
    }
}

/// Where the shape's centre is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// Left third, vertically centred.
    Left,
    /// Right third, vertically centred.
    Right,
    /// Top third, horizontally centred.
    Top,
    /// Bottom third, horizontally centred.
    Bottom,
    /// The middle.
    Center,
}

impl Position {
    /// Every position.
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Center,
    ];

    /// The caption phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Center => "in the center",
        }
    }

    /// Ranges of the centre, as fractions of the side: `(x range, y range)`.
    fn centre_ranges(self) -> ((f32, f32), (f32, f32)) {
        let mid = (0.42, 0.58);
        match self {
            Position::Left => ((0.24, 0.32), mid),
            Position::Right => ((0.68, 0.76), mid),
            Position::Top => (mid, (0.24, 0.32)),
            Position::Bottom => (mid, (0.68, 0.76)),
            Position::Center => ((0.45, 0.55), (0.45, 0.55)),
        }
    }
}

/// The attributes a caption can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// Shape.
    pub shape: Shape,
    /// Colour.
    pub colour: Colour,
    /// Size.
    pub size: Size,
    /// Position.
    pub position: Position,
}

impl Attributes {
    /// Every combination (6 × 8 × 2 × 5 = 480), in a fixed order.
    pub fn all() -> Vec<Attributes> {
        let mut out = Vec::new();
        for shape in Shape::ALL {
            for colour in Colour::ALL {
                for size in Size::ALL {
                    for position in Position::ALL {
                        out.push(Attributes {
                            shape,
                            colour,
                            size,
                            position,
                        });
                    }
                }
            }
        }
        out
    }

    /// Uniformly random attributes.
    pub fn random(rng: &mut impl Rng) -> Self {
        Attributes {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
            size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            position: Position::ALL[rng.random_range(0..Position::ALL.len())],
        }
    }

    /// The full caption, naming every attribute:
    /// "a photo of a small red circle on the left".
    pub fn full_caption(&self) -> String {
        format!(
            "a photo of a {} {} {} {}",
            self.size.name(),
            self.colour.name(),
            self.shape.name(),
            self.position.phrase()
        )
    }

    /// The class caption used for zero-shot classification:
    /// "a photo of a red circle".
    pub fn class_caption(&self) -> String {
        format!("a photo of a {} {}", self.colour.name(), self.shape.name())
    }
}

/// A caption and which attributes it names (colour and shape always).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caption {
    /// The text.
    pub text: String,
    /// The attributes of the scene it was written for.
    pub attributes: Attributes,
    /// Whether the text names the size.
    pub names_size: bool,
    /// Whether the text names the position.
    pub names_position: bool,
}

impl Caption {
    /// Whether a scene with `other` attributes fits this caption as well (the
    /// training loss treats those pairs as positives, not negatives).
    pub fn fits(&self, other: &Attributes) -> bool {
        let a = &self.attributes;
        a.shape == other.shape
            && a.colour == other.colour
            && (!self.names_size || a.size == other.size)
            && (!self.names_position || a.position == other.position)
    }
}

/// Leading phrases of the caption templates.
const LEADS: [&str; 5] = [
    "a",
    "a photo of a",
    "a picture of a",
    "an image of a",
    "a drawing of a",
];

/// A random caption for `attributes`: a random lead, size and position each
/// named half of the time.
pub fn random_caption(attributes: Attributes, rng: &mut impl Rng) -> Caption {
    caption_with(attributes, false, rng)
}

/// A random caption for `attributes` that always names the position (a
/// random lead, size named half of the time).
pub fn random_caption_with_position(attributes: Attributes, rng: &mut impl Rng) -> Caption {
    caption_with(attributes, true, rng)
}

fn caption_with(attributes: Attributes, always_position: bool, rng: &mut impl Rng) -> Caption {
    // The order of the draws is what made models/demo: keep it.
    let lead = LEADS[rng.random_range(0..LEADS.len())];
    let names_size = rng.random_bool(0.5);
    let names_position = always_position || rng.random_bool(0.5);
    let mut text = String::from(lead);
    if names_size {
        text.push(' ');
        text.push_str(attributes.size.name());
    }
    text.push(' ');
    text.push_str(attributes.colour.name());
    text.push(' ');
    text.push_str(attributes.shape.name());
    if names_position {
        text.push(' ');
        text.push_str(attributes.position.phrase());
    }
    Caption {
        text,
        attributes,
        names_size,
        names_position,
    }
}

/// Every word any caption uses, for the tokenizer's vocabulary.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = LEADS
        .iter()
        .flat_map(|l| l.split(' '))
        .chain(Shape::ALL.iter().map(|s| s.name()))
        .chain(Colour::ALL.iter().map(|c| c.name()))
        .chain(Size::ALL.iter().map(|s| s.name()))
        .chain(Position::ALL.iter().flat_map(|p| p.phrase().split(' ')))
        .map(str::to_owned)
        .collect();
    words.sort();
    words.dedup();
    words
}

/// One scene, with every random choice made: render it at any size.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// What a caption can say about it.
    pub attributes: Attributes,
    /// Centre, as fractions of the side.
    pub centre: (f32, f32),
    /// Radius, as a fraction of the side.
    pub radius: f32,
    /// Rotation in radians.
    pub rotation: f32,
    /// Shape colour after jitter.
    pub fill: [u8; 3],
    /// Background colour.
    pub background: [u8; 3],
    /// Amplitude of the per-pixel background noise, in levels.
    pub noise: u8,
}

impl Scene {
    /// A random scene with the given attributes.
    pub fn random(attributes: Attributes, rng: &mut impl Rng) -> Self {
        let ((x0, x1), (y0, y1)) = attributes.position.centre_ranges();
        let (r0, r1) = attributes.size.radius_range();
        let base = attributes.colour.rgb();
        let gain: f32 = rng.random_range(0.85..1.08);
        let fill = base.map(|c| {
            let jitter: f32 = rng.random_range(-14.0..14.0);
            (c as f32 * gain + jitter).clamp(0.0, 255.0) as u8
        });
        Scene {
            attributes,
            centre: (rng.random_range(x0..x1), rng.random_range(y0..y1)),
            radius: rng.random_range(r0..r1),
            rotation: rng.random_range(0.0..std::f32::consts::TAU),
            fill,
            background: background_for(fill, rng),
            noise: rng.random_range(0..10),
        }
    }

    /// A seeded 160×120 picture of a large, centred `shape` in `colour`:
    /// the fixture images of the CLI's tests and examples.
    ///
    /// ```
    /// use mmembed_shapes::{Colour, Scene, Shape};
    /// let img = Scene::sample(Shape::Star, Colour::Red, 1);
    /// assert_eq!(img.dimensions(), (160, 120));
    /// assert_eq!(img, Scene::sample(Shape::Star, Colour::Red, 1));
    /// ```
    pub fn sample(shape: Shape, colour: Colour, seed: u64) -> RgbImage {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a = Attributes {
            shape,
            colour,
            size: Size::Large,
            position: Position::Center,
        };
        Scene::random(a, &mut rng).render(160, 120, seed)
    }

    /// Renders the scene as a `width`×`height` image (the shape scales with
    /// the shorter side), 4×4 supersampled edges. `seed` drives the noise.
    pub fn render(&self, width: u32, height: u32, seed: u64) -> RgbImage {
        let side = width.min(height) as f32;
        let (cx, cy) = (self.centre.0 * width as f32, self.centre.1 * height as f32);
        let r = self.radius * side;
        let (sin, cos) = self.rotation.sin_cos();
        let mut noise = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Pixels outside the shape's bounding disc skip the coverage test.
        let reach2 = (r + 1.5) * (r + 1.5);
        RgbImage::from_fn(width, height, |x, y| {
            let mut hits = 0u32;
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let near = dx * dx + dy * dy <= reach2;
            for sy in (0..4).filter(|_| near) {
                for sx in 0..4 {
                    let px = x as f32 + (sx as f32 + 0.5) / 4.0 - cx;
                    let py = y as f32 + (sy as f32 + 0.5) / 4.0 - cy;
                    let u = (cos * px + sin * py) / r;
                    let v = (-sin * px + cos * py) / r;
                    hits += self.attributes.shape.contains(u, v) as u32;
                }
            }
            let n = if self.noise == 0 {
                0.0
            } else {
                noise.random_range(-(self.noise as f32)..=self.noise as f32)
            };
            let a = hits as f32 / 16.0;
            Rgb(std::array::from_fn(|c| {
                let bg = self.background[c] as f32 + n;
                (a * self.fill[c] as f32 + (1.0 - a) * bg)
                    .round()
                    .clamp(0.0, 255.0) as u8
            }))
        })
    }
}

/// A low-saturation background far enough from the fill colour that the
/// shape stays visible.
fn background_for(fill: [u8; 3], rng: &mut impl Rng) -> [u8; 3] {
    loop {
        let grey: f32 = rng.random_range(25.0..235.0);
        let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(-22.0..22.0));
        let bg = tint.map(|t| (grey + t).clamp(0.0, 255.0) as u8);
        let dist2: f32 = (0..3)
            .map(|c| (bg[c] as f32 - fill[c] as f32).powi(2))
            .sum();
        if dist2 >= 110.0 * 110.0 {
            return bg;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_covers_its_centre_and_not_its_corners() {
        for s in Shape::ALL {
            let centre = s.contains(0.0, 0.0) || s == Shape::Ring;
            assert!(centre, "{s:?}");
            assert!(!s.contains(0.99, 0.99), "{s:?}");
        }
        assert!(!Shape::Ring.contains(0.0, 0.0));
        assert!(Shape::Ring.contains(0.8, 0.0));
        // The star's notch between two points is empty, its point is filled.
        assert!(Shape::Star.contains(0.0, -0.9));
        assert!(!Shape::Star.contains(0.0, 0.9));
    }

    #[test]
    fn rendering_puts_the_fill_colour_at_the_centre() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for a in Attributes::all()
            .into_iter()
            .filter(|a| a.shape != Shape::Ring)
        {
            let scene = Scene::random(a, &mut rng);
            let img = scene.render(96, 96, 1);
            let (cx, cy) = scene.centre;
            let p = img.get_pixel((cx * 96.0) as u32, (cy * 96.0) as u32).0;
            let close = (0..3).all(|c| (p[c] as i32 - scene.fill[c] as i32).abs() <= 1);
            assert!(close, "{a:?}: {p:?} vs {:?}", scene.fill);
            let corner = img.get_pixel(0, 0).0;
            let bg = (0..3).all(|c| (corner[c] as i32 - scene.background[c] as i32).abs() <= 10);
            assert!(bg, "{a:?}");
        }
    }

    #[test]
    fn captions_name_what_they_say_they_name() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let vocab = vocabulary();
        for _ in 0..200 {
            let a = Attributes::random(&mut rng);
            let c = random_caption(a, &mut rng);
            assert!(c.text.contains(a.colour.name()) && c.text.contains(a.shape.name()));
            assert_eq!(c.names_size, c.text.contains(a.size.name()));
            assert_eq!(c.names_position, c.text.contains(a.position.phrase()));
            assert!(c.fits(&a));
            assert!(c.text.split(' ').all(|w| vocab.iter().any(|v| v == w)));
        }
    }
}
