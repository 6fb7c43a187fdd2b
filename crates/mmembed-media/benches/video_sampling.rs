//! Embed-ready frames from a 10-minute 1280×720 H.264 video (B-frames, a
//! keyframe every 250 frames), one per second over 16 s segments:
//!
//! - `decode_all_every_25th`: what most CLIP video tools do: decode every
//!   frame, keep every 25th, convert it to RGB, resize and crop;
//! - `exact_1fps`: [`sample_frames_with`] in its default mode (the frame
//!   nearest each time; frames far from every target skip as much decoding
//!   as their dependants allow), scaled by swscale to the model size;
//! - `exact_1fps_full_rgb`: the same without swscale resizing (full-size
//!   RGB, then Pillow-exact resize), to show what that step buys;
//! - `exact_1fps_skip_loop_filter`: also skip the loop filter on unkept
//!   frames;
//! - `keyframes`: [`SampleMode::Keyframes`], only keyframes decoded.
//!
//! Before timing, it prints how far each shortcut moves the frames from full
//! decoding (set `MMEMBED_BENCH_SKIP_FIDELITY=1` to skip that, e.g. when
//! measuring peak RSS with `--profile-time`). The video is generated once with the `ffmpeg` CLI into
//! `target/bench-media/`. Run: `cargo bench -p mmembed-media --features
//! video --bench video_sampling`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ffmpeg_next as ffmpeg;
use mmembed_core::VideoSegmentConfig;
use mmembed_media::ClipPreprocessor;
use mmembed_media::video::{
    SampleMode, SampleOptions, VideoBytes, probe, sample_frames_with, sample_times,
};

const SECONDS: u32 = 600;

fn video() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-media");
    let out = dir.join("ten-minutes-720p-h264.mp4");
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).expect("target/bench-media");
    let tmp = dir.join("partial.mp4");
    let st = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc2=size=1280x720:rate=25:duration={SECONDS}"))
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-bf",
            "3",
            "-g",
            "250",
            "-keyint_min",
            "250",
            "-sc_threshold",
            "0",
            "-pix_fmt",
            "yuv420p",
        ])
        .arg(&tmp)
        .status()
        .expect("the ffmpeg CLI runs");
    assert!(st.success(), "ffmpeg failed to make the bench video");
    std::fs::rename(&tmp, &out).expect("rename");
    out
}

/// The baseline: decode everything, convert and preprocess every 25th frame.
fn decode_all_every_25th(path: &Path, pre: &ClipPreprocessor) -> usize {
    let mut ictx = ffmpeg::format::input(path).expect("open");
    let stream = ictx
        .streams()
        .best(ffmpeg::media::Type::Video)
        .expect("video stream");
    let index = stream.index();
    let mut ctx =
        ffmpeg::codec::context::Context::from_parameters(stream.parameters()).expect("ctx");
    ctx.set_threading(ffmpeg::codec::threading::Config {
        kind: ffmpeg::codec::threading::Type::Frame,
        count: 0,
        ..Default::default()
    });
    let mut dec = ctx.decoder().video().expect("decoder");
    let mut scaler: Option<ffmpeg::software::scaling::Context> = None;
    let mut frame = ffmpeg::frame::Video::empty();
    let (mut n, mut kept) = (0usize, 0usize);
    let mut take = |f: &ffmpeg::frame::Video, n: &mut usize, kept: &mut usize| {
        if n.is_multiple_of(25) {
            let s = scaler.get_or_insert_with(|| {
                ffmpeg::software::scaling::Context::get(
                    f.format(),
                    f.width(),
                    f.height(),
                    ffmpeg::format::Pixel::RGB24,
                    f.width(),
                    f.height(),
                    ffmpeg::software::scaling::Flags::BILINEAR,
                )
                .expect("scaler")
            });
            let mut rgb = ffmpeg::frame::Video::empty();
            s.run(f, &mut rgb).expect("convert");
            let (w, h, stride) = (rgb.width(), rgb.height(), rgb.stride(0));
            let mut buf = Vec::with_capacity((w * h * 3) as usize);
            for y in 0..h as usize {
                buf.extend_from_slice(&rgb.data(0)[y * stride..y * stride + w as usize * 3]);
            }
            let img = image::RgbImage::from_raw(w, h, buf).expect("size");
            std::hint::black_box(pre.resize_and_crop(&img));
            *kept += 1;
        }
        *n += 1;
    };
    for (s, packet) in ictx.packets() {
        if s.index() == index {
            dec.send_packet(&packet).expect("send");
            while dec.receive_frame(&mut frame).is_ok() {
                take(&frame, &mut n, &mut kept);
            }
        }
    }
    dec.send_eof().expect("eof");
    while dec.receive_frame(&mut frame).is_ok() {
        take(&frame, &mut n, &mut kept);
    }
    kept
}

fn ours(path: &Path, times: &[f64], opts: &SampleOptions, pre: &ClipPreprocessor) -> usize {
    let mut kept = 0;
    sample_frames_with(&VideoBytes::Path(path), times, opts, |_, r| {
        let f = r.expect("frame");
        std::hint::black_box(pre.resize_and_crop(&f.image));
        kept += 1;
    })
    .expect("sampling");
    kept
}

/// Embed-ready (resized, cropped) frames and their times.
fn frames(
    path: &Path,
    times: &[f64],
    opts: &SampleOptions,
    pre: &ClipPreprocessor,
) -> Vec<(f64, image::RgbImage)> {
    let mut out = Vec::new();
    sample_frames_with(&VideoBytes::Path(path), times, opts, |_, r| {
        let f = r.expect("frame");
        out.push((f.time_sec, pre.resize_and_crop(&f.image)));
    })
    .expect("sampling");
    out
}

/// Mean absolute difference in levels between two sets of frames.
fn mean_abs_diff(a: &[(f64, image::RgbImage)], b: &[(f64, image::RgbImage)]) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for ((_, x), (_, y)) in a.iter().zip(b) {
        for (p, q) in x.as_raw().iter().zip(y.as_raw()) {
            sum += f64::from(p.abs_diff(*q));
            n += 1;
        }
    }
    sum / n as f64
}

/// What each shortcut does to the frames, printed once before timing.
fn report_fidelity(path: &Path, times: &[f64], pre: &ClipPreprocessor) {
    let reference = frames(path, times, &SampleOptions::default(), pre);
    let scaled = SampleOptions {
        resize_for: Some(pre.clone()),
        ..Default::default()
    };
    let swscale = frames(path, times, &scaled, pre);
    let no_filter = frames(
        path,
        times,
        &SampleOptions {
            skip_loop_filter: true,
            ..scaled.clone()
        },
        pre,
    );
    let key = frames(
        path,
        times,
        &SampleOptions {
            mode: SampleMode::Keyframes,
            ..scaled.clone()
        },
        pre,
    );
    let off = |f: &[(f64, image::RgbImage)]| {
        f.iter()
            .zip(times)
            .map(|((t, _), want)| (t - want).abs())
            .fold((0f64, 0f64), |(s, m), d| (s + d, m.max(d)))
    };
    let (exact_sum, exact_max) = off(&reference);
    let (key_sum, key_max) = off(&key);
    let n = times.len() as f64;
    eprintln!(
        "fidelity over {} frames (224x224 crops, levels 0-255):\n  \
         swscale bicubic vs full RGB + Pillow resize: mean |diff| {:.2}\n  \
         skip_loop_filter vs exact: mean |diff| {:.2}\n  \
         frame time - target: exact mean {:.3} s, max {:.3} s; keyframes mean {:.2} s, max {:.2} s",
        times.len(),
        mean_abs_diff(&swscale, &reference),
        mean_abs_diff(&no_filter, &swscale),
        exact_sum / n,
        exact_max,
        key_sum / n,
        key_max,
    );
}

fn bench(c: &mut Criterion) {
    let path = video();
    let info = probe(&VideoBytes::Path(&path)).expect("probe");
    let segments = VideoSegmentConfig::new(0, SECONDS, 16)
        .expect("config")
        .segments(info.duration_sec)
        .expect("segments");
    let times: Vec<f64> = sample_times(&segments, 1.0).into_iter().flatten().collect();
    let pre = ClipPreprocessor::openai(224);
    // Holds four sets of 600 frames: skipped when measuring peak RSS.
    if std::env::var_os("MMEMBED_BENCH_SKIP_FIDELITY").is_none() {
        report_fidelity(&path, &times, &pre);
    }
    let mut g = c.benchmark_group("video_10min_720p");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Elements(times.len() as u64));
    g.bench_function("decode_all_every_25th", |b| {
        b.iter(|| decode_all_every_25th(&path, &pre))
    });
    let exact = SampleOptions {
        resize_for: Some(pre.clone()),
        ..Default::default()
    };
    g.bench_function("exact_1fps", |b| {
        b.iter(|| ours(&path, &times, &exact, &pre))
    });
    let full = SampleOptions::default();
    g.bench_function("exact_1fps_full_rgb", |b| {
        b.iter(|| ours(&path, &times, &full, &pre))
    });
    let no_filter = SampleOptions {
        skip_loop_filter: true,
        ..exact.clone()
    };
    g.bench_function("exact_1fps_skip_loop_filter", |b| {
        b.iter(|| ours(&path, &times, &no_filter, &pre))
    });
    let key = SampleOptions {
        mode: SampleMode::Keyframes,
        ..exact.clone()
    };
    g.bench_function("keyframes", |b| b.iter(|| ours(&path, &times, &key, &pre)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
