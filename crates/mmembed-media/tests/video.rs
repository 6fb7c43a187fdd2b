//! Video probing and sampling on videos made at test time with the `ffmpeg`
//! CLI (installed by scripts/test.sh).
#![cfg(feature = "video")]

use std::path::{Path, PathBuf};

use mmembed_core::VideoSegmentConfig;
use mmembed_media::ClipPreprocessor;
use mmembed_media::video::{
    SampleMode, SampleOptions, VideoBytes, probe, sample_frames, sample_frames_with, sample_times,
};

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [255, 0, 0]),
    ("lime", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("magenta", [255, 0, 255]),
    ("cyan", [0, 255, 255]),
];

fn ffmpeg(args: &[&str]) {
    mmembed_core::testkit::ffmpeg(args);
}

/// A slideshow: colour i from 10·i to 10·(i+1) seconds, cut at `secs`.
fn slideshow(dir: &Path, name: &str, secs: f64, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args: Vec<String> = Vec::new();
    for (c, _) in COLOURS {
        args.extend(["-f", "lavfi", "-i"].map(String::from));
        args.push(format!("color=c={c}:s=160x120:r=25:d=10"));
    }
    args.push("-filter_complex".into());
    args.push("[0][1][2][3][4][5]concat=n=6:v=1:a=0,format=yuv420p".into());
    args.extend(["-t".into(), format!("{secs}")]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(out.display().to_string());
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>());
    out
}

fn mean_rgb(img: &image::RgbImage) -> [f64; 3] {
    let mut s = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            s[c] += f64::from(p[c]);
        }
    }
    let n = f64::from(img.width() * img.height());
    s.map(|v| v / n)
}

fn colour_index(img: &image::RgbImage) -> usize {
    let m = mean_rgb(img);
    let d = |c: [u8; 3]| {
        (0..3)
            .map(|i| (m[i] - f64::from(c[i])).powi(2))
            .sum::<f64>()
    };
    (0..COLOURS.len())
        .min_by(|a, b| d(COLOURS[*a].1).total_cmp(&d(COLOURS[*b].1)))
        .unwrap()
}

/// Samples a video for a segment config; returns per segment the colour
/// indices of its frames (or the error text).
fn colours_per_segment(
    src: &VideoBytes<'_>,
    cfg: VideoSegmentConfig,
) -> Vec<Result<Vec<usize>, String>> {
    let info = probe(src).unwrap();
    let segs = cfg.segments(info.duration_sec).unwrap();
    let per_seg = sample_times(&segs, 1.0);
    let times: Vec<f64> = per_seg.iter().flatten().copied().collect();
    let mut owner = Vec::new();
    for (i, t) in per_seg.iter().enumerate() {
        owner.extend(std::iter::repeat_n(i, t.len()));
    }
    let mut out: Vec<Result<Vec<usize>, String>> = vec![Ok(Vec::new()); segs.len()];
    sample_frames(src, &times, |k, r| {
        let seg = owner[k];
        match (r, &mut out[seg]) {
            (Ok(f), Ok(v)) => {
                assert!(
                    (f.time_sec - times[k]).abs() < 0.5,
                    "frame {} s for target {} s",
                    f.time_sec,
                    times[k]
                );
                v.push(colour_index(&f.image));
            }
            (Err(e), slot) => *slot = Err(e.to_string()),
            _ => {}
        }
    })
    .unwrap();
    out
}

#[test]
fn slideshow_segments_match_their_colours_path_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = slideshow(
        dir.path(),
        "s.mp4",
        59.0,
        &["-c:v", "libx264", "-g", "50", "-bf", "2"],
    );
    let info = probe(&VideoBytes::Path(&mp4)).unwrap();
    assert!((info.duration_sec - 59.0).abs() < 0.05, "{info:?}");
    assert_eq!(
        (info.codec.as_str(), info.width, info.height, info.rotation),
        ("h264", 160, 120, 0)
    );
    assert_eq!(info.frame_rate, Some(25.0));

    let cfg = VideoSegmentConfig::new(0, 120, 10).unwrap();
    let segs = cfg.segments(info.duration_sec).unwrap();
    assert_eq!(segs.len(), 6);
    assert_eq!((segs[5].start_sec, segs[5].end_sec.round()), (50.0, 59.0));

    let from_path = colours_per_segment(&VideoBytes::Path(&mp4), cfg);
    for (i, seg) in from_path.iter().enumerate() {
        let colours = seg.as_ref().unwrap();
        assert!(!colours.is_empty());
        assert!(colours.iter().all(|c| *c == i), "segment {i}: {colours:?}");
    }
    let bytes = bytes::Bytes::from(std::fs::read(&mp4).unwrap());
    let from_bytes = colours_per_segment(&VideoBytes::Bytes(bytes), cfg);
    assert_eq!(from_path, from_bytes);
}

#[test]
fn frames_from_path_and_bytes_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = slideshow(
        dir.path(),
        "s.mp4",
        30.0,
        &["-c:v", "libx264", "-g", "250", "-bf", "3"],
    );
    let bytes = bytes::Bytes::from(std::fs::read(&mp4).unwrap());
    let times = [0.5, 9.9, 10.1, 19.0, 29.5];
    let collect = |src: VideoBytes<'_>| {
        let mut v = Vec::new();
        sample_frames(&src, &times, |_, r| {
            let f = r.unwrap();
            v.push((f.time_sec, f.image));
        })
        .unwrap();
        v
    };
    let a = collect(VideoBytes::Path(&mp4));
    let b = collect(VideoBytes::Bytes(bytes));
    assert_eq!(a.len(), times.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        assert!(x.1 == y.1, "pixels differ at {} s", x.0);
    }
    // Nearest frame by timestamp, both sides of a colour change.
    assert_eq!(colour_index(&a[1].1), 0);
    assert_eq!(colour_index(&a[2].1), 1);
}

#[test]
fn rotated_and_variable_frame_rate_videos() {
    let dir = tempfile::tempdir().unwrap();
    let plain = slideshow(dir.path(), "p.mp4", 20.0, &["-c:v", "libx264"]);
    let rotated = dir.path().join("r.mp4");
    ffmpeg(&[
        "-i",
        plain.to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        rotated.to_str().unwrap(),
    ]);
    let info = probe(&VideoBytes::Path(&rotated)).unwrap();
    assert!(info.rotation == 90 || info.rotation == 270, "{info:?}");
    let mut dims = None;
    sample_frames(&VideoBytes::Path(&rotated), &[5.0], |_, r| {
        dims = Some(r.unwrap().image.dimensions());
    })
    .unwrap();
    assert_eq!(dims, Some((120, 160)), "display orientation");

    // Variable frame rate: 5 fps, then 30 fps.
    let vfr = dir.path().join("vfr.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=160x120:r=5:d=10",
        "-f",
        "lavfi",
        "-i",
        "color=c=lime:s=160x120:r=30:d=10",
        "-filter_complex",
        "[0][1]concat=n=2:v=1:a=0,format=yuv420p",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        vfr.to_str().unwrap(),
    ]);
    let cfg = VideoSegmentConfig::new(0, 20, 5).unwrap();
    let got = colours_per_segment(&VideoBytes::Path(&vfr), cfg);
    let firsts: Vec<usize> = got.iter().map(|s| s.as_ref().unwrap()[0]).collect();
    assert_eq!(firsts, vec![0, 0, 1, 1]);
}

#[test]
fn containers_and_codecs_in_vertex_list() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("v.mp4", &["-c:v", "libx264"]),
        ("v.mov", &["-c:v", "libx264"]),
        ("v.mkv", &["-c:v", "libx264"]),
        ("v.webm", &["-c:v", "libvpx-vp9", "-deadline", "realtime"]),
        ("v.avi", &["-c:v", "mpeg4"]),
        ("v.flv", &["-c:v", "flv1"]),
        ("v.mpg", &["-c:v", "mpeg2video"]),
        ("v.mpeg", &["-c:v", "mpeg1video"]),
        ("v.wmv", &["-c:v", "wmv2"]),
    ];
    for (name, codec) in cases {
        let f = slideshow(dir.path(), name, 21.0, codec);
        let cfg = VideoSegmentConfig::new(0, 20, 10).unwrap();
        let got = colours_per_segment(&VideoBytes::Path(&f), cfg);
        assert_eq!(got.len(), 2, "{name}");
        for (i, seg) in got.iter().enumerate() {
            let colours = seg
                .as_ref()
                .unwrap_or_else(|e| panic!("{name} segment {i}: {e}"));
            assert!(
                colours.iter().all(|c| *c == i),
                "{name} segment {i}: {colours:?}"
            );
        }
    }
}

#[test]
fn bad_videos_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let audio = dir.path().join("a.m4a");
    ffmpeg(&["-f", "lavfi", "-i", "sine=d=3", audio.to_str().unwrap()]);
    let e = probe(&VideoBytes::Path(&audio)).unwrap_err().to_string();
    assert!(e.contains("no video stream"), "{e}");

    let empty = dir.path().join("e.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert!(probe(&VideoBytes::Path(&empty)).is_err());
    assert!(probe(&VideoBytes::Bytes(bytes::Bytes::new())).is_err());
    let garbage = dir.path().join("g.mp4");
    std::fs::write(
        &garbage,
        b"this is not a video at all, just text with an .mp4 name",
    )
    .unwrap();
    assert!(probe(&VideoBytes::Path(&garbage)).is_err());
    assert!(probe(&VideoBytes::Path(&dir.path().join("missing.mp4"))).is_err());

    // 0.2 s: one short segment, one frame.
    let short = slideshow(dir.path(), "short.mp4", 0.2, &["-c:v", "libx264"]);
    let got = colours_per_segment(&VideoBytes::Path(&short), VideoSegmentConfig::default());
    assert_eq!(got, vec![Ok(vec![0])]);

    // Start beyond the end: an error from the segment list, before decoding.
    let info = probe(&VideoBytes::Path(&short)).unwrap();
    assert!(
        VideoSegmentConfig::new(5, 20, 4)
            .unwrap()
            .segments(info.duration_sec)
            .is_err()
    );
}

#[test]
fn truncated_video_keeps_the_segments_that_decode() {
    let dir = tempfile::tempdir().unwrap();
    // MPEG-TS survives truncation (no index at the end), like a cut download.
    let ts = slideshow(dir.path(), "s.ts", 59.0, &["-c:v", "libx264", "-g", "25"]);
    let data = std::fs::read(&ts).unwrap();
    let cut = dir.path().join("cut.ts");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let cfg = VideoSegmentConfig::new(0, 60, 10).unwrap();
    let info = probe(&VideoBytes::Path(&cut)).unwrap();
    let segs = cfg.segments(info.duration_sec.max(59.0)).unwrap();
    let per_seg = sample_times(&segs, 1.0);
    let times: Vec<f64> = per_seg.iter().flatten().copied().collect();
    let mut ok = vec![0usize; times.len()];
    let mut calls = 0;
    sample_frames(&VideoBytes::Path(&cut), &times, |k, r| {
        calls += 1;
        ok[k] = usize::from(r.is_ok());
    })
    .unwrap();
    assert_eq!(calls, times.len(), "every target answered");
    assert_eq!(ok[0], 1, "the start decodes");
    assert_eq!(
        *ok.last().unwrap(),
        0,
        "the cut-off end is an error, not a silent drop"
    );
}

/// The 60 s slideshow in H.264 with 3 B-frames (skippable non-reference
/// frames) and a keyframe exactly every `gop` frames.
fn h264_with_bframes(dir: &Path, name: &str, gop: u32) -> PathBuf {
    let gop = gop.to_string();
    let args = [
        "-c:v",
        "libx264",
        "-bf",
        "3",
        "-g",
        &gop,
        "-keyint_min",
        &gop,
        "-sc_threshold",
        "0",
    ];
    slideshow(dir, name, 60.0, &args)
}

#[test]
fn keyframe_mode_takes_the_nearest_keyframe_and_says_when_it_is() {
    let dir = tempfile::tempdir().unwrap();
    // Keyframes exactly every 5 s (125 frames at 25 fps).
    let v = h264_with_bframes(dir.path(), "gop5.mp4", 125);
    let times = [0.5, 3.0, 11.0, 23.9, 41.0, 57.0];
    let mut got = Vec::new();
    let opts = SampleOptions {
        mode: SampleMode::Keyframes,
        ..Default::default()
    };
    sample_frames_with(&VideoBytes::Path(&v), &times, &opts, |i, r| {
        let f = r.unwrap();
        got.push((i, f.time_sec, colour_index(&f.image)));
    })
    .unwrap();
    let expected_key = [0.0, 5.0, 10.0, 25.0, 40.0, 55.0];
    assert_eq!(got.len(), times.len());
    for ((i, t, colour), want) in got.into_iter().zip(expected_key) {
        assert!(
            (t - want).abs() < 1e-6,
            "target {}: keyframe at {t}, want {want}",
            times[i]
        );
        assert_eq!(
            colour,
            (want / 10.0) as usize,
            "keyframe at {t} shows the wrong colour"
        );
    }
}

#[test]
fn frames_can_be_scaled_straight_to_the_model_size() {
    let dir = tempfile::tempdir().unwrap();
    let v = slideshow(
        dir.path(),
        "wide.mp4",
        20.0,
        &["-c:v", "libx264", "-bf", "2"],
    );
    let pre = ClipPreprocessor::openai(64);
    let times = [1.0, 12.0];
    let mut scaled = Vec::new();
    let opts = SampleOptions {
        resize_for: Some(pre.clone()),
        ..Default::default()
    };
    sample_frames_with(&VideoBytes::Path(&v), &times, &opts, |_, r| {
        scaled.push(r.unwrap())
    })
    .unwrap();
    let mut full = Vec::new();
    sample_frames(&VideoBytes::Path(&v), &times, |_, r| full.push(r.unwrap())).unwrap();
    for (s, f) in scaled.iter().zip(&full) {
        assert_eq!(s.time_sec, f.time_sec);
        // 160x120 -> shortest edge 64 with Hugging Face's rounding.
        assert_eq!(s.image.dimensions(), pre.resized_size(160, 120));
        assert_eq!(s.image.dimensions(), (85, 64));
        // Solid colours: swscale's and Pillow's resamplers agree to within
        // YUV rounding.
        let (a, b) = (mean_rgb(&s.image), mean_rgb(&pre.resize_and_crop(&f.image)));
        for c in 0..3 {
            assert!((a[c] - b[c]).abs() < 3.0, "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn exact_mode_still_finds_the_nearest_frame_while_skipping_unkept_ones() {
    let dir = tempfile::tempdir().unwrap();
    // Long GOPs, so most frames are far from every target.
    let v = h264_with_bframes(dir.path(), "bframes.mp4", 250);
    let times = [0.013, 3.011, 3.05, 11.0 + 0.018, 23.931, 41.007, 58.97];
    let mut got = Vec::new();
    sample_frames(&VideoBytes::Path(&v), &times, |i, r| {
        got.push((i, r.unwrap().time_sec))
    })
    .unwrap();
    assert_eq!(got.len(), times.len());
    for (i, t) in got {
        let nearest = (times[i] * 25.0).round() / 25.0;
        assert!(
            (t - nearest).abs() < 1e-6,
            "target {}: got {t}, nearest frame {nearest}",
            times[i]
        );
    }
}

/// Every frame different (a moving test pattern with a frame counter), so a
/// frame taken one step off shows in the pixels.
fn test_pattern(dir: &Path, name: &str, codec: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=25:duration=24",
    ];
    args.extend_from_slice(codec);
    let out_s = out.display().to_string();
    args.extend(["-pix_fmt", "yuv420p", &out_s]);
    ffmpeg(&args);
    out
}

fn sampled(src: &VideoBytes<'_>, times: &[f64], threads: usize) -> Vec<(f64, Vec<u8>)> {
    let opts = SampleOptions {
        threads,
        ..SampleOptions::default()
    };
    let mut got = Vec::new();
    sample_frames_with(src, times, &opts, |k, r| {
        assert_eq!(k, got.len(), "frames arrive in order");
        let f = r.unwrap_or_else(|e| panic!("{threads} threads, target {}: {e}", times[k]));
        got.push((f.time_sec, f.image.into_raw()));
    })
    .unwrap();
    assert_eq!(got.len(), times.len());
    got
}

#[test]
fn decoding_in_parallel_runs_takes_the_same_frames_as_one_decoder() {
    let dir = tempfile::tempdir().unwrap();
    // Keyframes every second (25 frames), so the targets span many runs;
    // targets on, just before and just after keyframes test the cuts.
    let mut times = Vec::new();
    for s in 0..24 {
        let s = f64::from(s);
        times.extend([s, s + 0.019, s + 0.31, s + 0.63, s + 0.97]);
    }
    times.push(23.99);
    let h264 = [
        "-c:v",
        "libx264",
        "-bf",
        "3",
        "-g",
        "25",
        "-keyint_min",
        "25",
        "-sc_threshold",
        "0",
    ];
    let cases: &[(&str, &[&str])] = &[
        ("p.mp4", &h264),
        ("p.mkv", &h264),
        (
            "p.webm",
            &["-c:v", "libvpx-vp9", "-deadline", "realtime", "-g", "25"],
        ),
        ("p.avi", &["-c:v", "mpeg4", "-g", "25"]),
        ("p.mpg", &["-c:v", "mpeg2video", "-bf", "2", "-g", "25"]),
        ("p.flv", &["-c:v", "flv1", "-g", "25"]),
        ("p.wmv", &["-c:v", "wmv2", "-g", "25"]),
    ];
    for (name, codec) in cases {
        let v = test_pattern(dir.path(), name, codec);
        let one = sampled(&VideoBytes::Path(&v), &times, 1);
        for (k, (t, _)) in one.iter().enumerate() {
            // The last frame is shown at 23.96 s.
            let nearest = ((times[k] * 25.0).round() / 25.0).min(23.96);
            assert!(
                (t - nearest).abs() < 1e-6,
                "{name}: target {} got {t}, nearest frame {nearest}",
                times[k]
            );
        }
        let bytes = bytes::Bytes::from(std::fs::read(&v).unwrap());
        for threads in [2, 3] {
            for src in [VideoBytes::Path(&v), VideoBytes::Bytes(bytes.clone())] {
                let many = sampled(&src, &times, threads);
                for (k, (a, b)) in one.iter().zip(&many).enumerate() {
                    assert_eq!(a.0, b.0, "{name}, {threads} threads: time of target {k}");
                    assert!(
                        a.1 == b.1,
                        "{name}, {threads} threads: pixels of target {k}"
                    );
                }
            }
        }
    }
}

#[test]
fn seeking_ahead_finds_the_nearest_frame_where_seeks_are_not_exact() {
    let dir = tempfile::tempdir().unwrap();
    // Targets far apart, so the sampler seeks between them. MPEG program
    // streams and transport streams have no index: their seeks search by
    // timestamp and may land between keyframes (2 s apart here).
    let times = [1.31, 9.63, 17.97, 23.21];
    let cases: &[(&str, &[&str])] = &[
        ("far.mpg", &["-c:v", "mpeg2video", "-bf", "2", "-g", "50"]),
        ("far.ts", &["-c:v", "libx264", "-bf", "3", "-g", "50"]),
        ("far.mp4", &["-c:v", "libx264", "-bf", "3", "-g", "50"]),
    ];
    for (name, codec) in cases {
        let v = test_pattern(dir.path(), name, codec);
        for threads in [1, 2] {
            for (k, (t, _)) in sampled(&VideoBytes::Path(&v), &times, threads)
                .iter()
                .enumerate()
            {
                let nearest = (times[k] * 25.0).round() / 25.0;
                assert!(
                    (t - nearest).abs() < 1e-6,
                    "{name}, {threads} threads: target {} got {t}, nearest frame {nearest}",
                    times[k]
                );
            }
        }
    }
}
