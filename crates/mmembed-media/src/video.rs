//! Video probing and frame sampling by timestamp, with FFmpeg (feature
//! `video`, linked against the system's libraries).
//!
//! Frames are found by time, not by count: seek to the keyframe at or before
//! the first wanted time, decode forward, and for each target time keep the
//! decoded frame whose timestamp is nearest. Only kept frames are converted
//! to RGB; nothing is written to disk; in-memory videos are read through a
//! custom FFmpeg I/O context. Memory stays bounded: frames are handed to the
//! caller one at a time.

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Once};

use bytes::Bytes;
use ffmpeg::format::context::Input;
use ffmpeg::media::Type;
use ffmpeg_next as ffmpeg;
use image::RgbImage;
use mmembed_core::EmbedError;

/// What a video is.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Length of the video stream in seconds.
    pub duration_sec: f64,
    /// Average frame rate, when the container says.
    pub frame_rate: Option<f64>,
    /// Codec name (`h264`, `vp9`, ...).
    pub codec: String,
    /// Container name(s) as FFmpeg reports them (`mov,mp4,m4a,3gp,3g2,mj2`).
    pub container: String,
    /// Coded width in pixels.
    pub width: u32,
    /// Coded height in pixels.
    pub height: u32,
    /// Clockwise rotation to apply for display (0, 90, 180, 270), from the
    /// display matrix phones write.
    pub rotation: u32,
}

/// A sampled frame: when it was shown and what it shows (display-rotated RGB).
#[derive(Debug, Clone)]
pub struct SampledFrame {
    /// Its presentation time in seconds.
    pub time_sec: f64,
    /// The picture.
    pub image: RgbImage,
}

/// How frames are chosen for the target times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SampleMode {
    /// The decoded frame nearest each target time (within max(1 s, 3
    /// frames)). Frames far from every target are decoded only as far as
    /// later frames need them: non-reference frames are skipped outright.
    #[default]
    Exact,
    /// The keyframe nearest each target time, whatever its distance: only
    /// keyframes are decoded. Several times faster; with keyframes 10 s
    /// apart, a 1 s target grid gets the same frame for up to 10 targets.
    /// [`SampledFrame::time_sec`] says which time each frame really shows.
    Keyframes,
}

/// Settings of [`sample_frames_with`].
#[derive(Debug, Clone, Default)]
pub struct SampleOptions {
    /// Which frames to take.
    pub mode: SampleMode,
    /// Scale kept frames with swscale (bicubic) straight to the size this
    /// preprocessor resizes to, instead of converting full frames and
    /// resampling them again. Never scales up.
    pub resize_for: Option<crate::ClipPreprocessor>,
    /// Also skip the loop filter on frames far from every target. Faster,
    /// but reference frames decoded without it blur the kept frames that
    /// depend on them (drift until the next keyframe), so off by default.
    pub skip_loop_filter: bool,
    /// Decoder threads; 0 lets FFmpeg choose (one per core).
    pub threads: usize,
}

/// Where a video's bytes are.
#[derive(Debug, Clone)]
pub enum VideoBytes<'a> {
    /// A file.
    Path(&'a Path),
    /// In memory.
    Bytes(Bytes),
}

impl VideoBytes<'_> {
    fn describe(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Bytes(b) => format!("video bytes ({} bytes)", b.len()),
        }
    }
}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Errors come back to callers as values; FFmpeg's own stderr chatter
        // about corrupt input would only be noise.
        let _ = ffmpeg::init();
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Quiet);
    });
}

fn err(what: &str, reason: impl Into<String>, e: Option<ffmpeg::Error>) -> EmbedError {
    EmbedError::media(what, reason, e.map(|e| Arc::new(e) as mmembed_core::Source))
}

fn open(src: &VideoBytes<'_>) -> Result<Input, EmbedError> {
    init();
    let what = src.describe();
    match src {
        VideoBytes::Path(p) => ffmpeg::format::input(p),
        VideoBytes::Bytes(b) => {
            if b.is_empty() {
                return Err(err(&what, "is empty", None));
            }
            let io = ffmpeg::format::context::StreamIo::from_read_seek(Cursor::new(b.clone()))
                .map_err(|e| err(&what, "cannot set up in-memory reading", Some(e)))?;
            ffmpeg::format::input_from_stream(io, None, None)
        }
    }
    .map_err(|e| err(&what, "not a video FFmpeg can open", Some(e)))
}

/// Clockwise display rotation from the stream's display matrix.
fn rotation(stream: &ffmpeg::format::stream::Stream<'_>) -> u32 {
    for sd in stream.side_data() {
        if sd.kind() == ffmpeg::codec::packet::side_data::Type::DisplayMatrix {
            let data = sd.data();
            if data.len() >= 36 {
                let m: Vec<i32> = data
                    .chunks_exact(4)
                    .take(9)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                // av_display_rotation_get: counter-clockwise angle from the
                // 16.16 fixed-point matrix; display needs the opposite turn.
                let (a, b) = (f64::from(m[0]) / 65536.0, f64::from(m[1]) / 65536.0);
                let ccw = b.atan2(a).to_degrees();
                let cw = (-ccw).rem_euclid(360.0);
                return ((cw / 90.0).round() as u32 % 4) * 90;
            }
        }
    }
    0
}

fn info_of(ictx: &Input, what: &str) -> Result<(usize, VideoInfo), EmbedError> {
    let stream = ictx
        .streams()
        .best(Type::Video)
        .ok_or_else(|| err(what, "has no video stream (an audio-only file?)", None))?;
    let tb = f64::from(stream.time_base());
    let stream_dur = if stream.duration() > 0 {
        stream.duration() as f64 * tb
    } else {
        0.0
    };
    let container_dur = if ictx.duration() > 0 {
        ictx.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE)
    } else {
        0.0
    };
    let duration_sec = if stream_dur > 0.0 {
        stream_dur
    } else {
        container_dur
    };
    if !(duration_sec.is_finite() && duration_sec > 0.0) {
        return Err(err(what, "has no duration (empty or not a video)", None));
    }
    let params = stream.parameters();
    let codec = params.id().name().to_string();
    let dec = ffmpeg::codec::context::Context::from_parameters(params)
        .and_then(|c| c.decoder().video())
        .map_err(|e| err(what, format!("cannot decode its {codec} video"), Some(e)))?;
    let rate = stream.avg_frame_rate();
    let frame_rate = (rate.denominator() != 0 && rate.numerator() > 0).then(|| f64::from(rate));
    Ok((
        stream.index(),
        VideoInfo {
            duration_sec,
            frame_rate,
            codec,
            container: ictx.format().name().to_string(),
            width: dec.width(),
            height: dec.height(),
            rotation: rotation(&stream),
        },
    ))
}

/// Reads a video's length, frame rate, codec, size and rotation.
pub fn probe(src: &VideoBytes<'_>) -> Result<VideoInfo, EmbedError> {
    let ictx = open(src)?;
    info_of(&ictx, &src.describe()).map(|(_, i)| i)
}

/// Target times for segments: `max(1, round(len · fps))` evenly spread
/// samples per segment, each in the middle of its share of the segment.
pub fn sample_times(segments: &[mmembed_core::Segment], fps: f64) -> Vec<Vec<f64>> {
    segments
        .iter()
        .map(|s| {
            let len = (s.end_sec - s.start_sec).max(0.0);
            let n = ((len * fps).round() as usize).max(1);
            let step = len / n as f64;
            (0..n)
                .map(|k| s.start_sec + (k as f64 + 0.5) * step)
                .collect()
        })
        .collect()
}

/// Seek ahead instead of decoding forward when the next target is further
/// than this from the last decoded frame (keyframes in typical encodes are
/// 2-10 s apart).
const SEEK_AHEAD_SEC: f64 = 8.0;

struct Converter {
    scaler: Option<(
        ffmpeg::software::scaling::Context,
        (ffmpeg::format::Pixel, u32, u32),
    )>,
    rotation: u32,
    resize_for: Option<crate::ClipPreprocessor>,
}

impl Converter {
    /// Output size for a coded `w`×`h` frame: the preprocessor's resize of
    /// the displayed (rotated) frame, mapped back to coded orientation.
    fn out_size(&self, w: u32, h: u32) -> (u32, u32) {
        let Some(pre) = &self.resize_for else {
            return (w, h);
        };
        let turned = self.rotation % 180 == 90;
        let (dw, dh) = if turned { (h, w) } else { (w, h) };
        let (rw, rh) = pre.resized_size(dw, dh);
        if rw >= dw || rh >= dh {
            return (w, h);
        }
        if turned { (rh, rw) } else { (rw, rh) }
    }

    fn rgb(&mut self, frame: &ffmpeg::frame::Video, what: &str) -> Result<RgbImage, EmbedError> {
        let key = (frame.format(), frame.width(), frame.height());
        if self.scaler.as_ref().map(|s| s.1) != Some(key) {
            let (ow, oh) = self.out_size(key.1, key.2);
            let flags = if (ow, oh) == (key.1, key.2) {
                ffmpeg::software::scaling::Flags::BILINEAR
            } else {
                // Bicubic, with exact chroma placement and full-precision
                // rounding: closest to the Pillow bicubic resize it replaces.
                ffmpeg::software::scaling::Flags::BICUBIC
                    | ffmpeg::software::scaling::Flags::ACCURATE_RND
                    | ffmpeg::software::scaling::Flags::FULL_CHR_H_INT
            };
            let ctx = ffmpeg::software::scaling::Context::get(
                key.0,
                key.1,
                key.2,
                ffmpeg::format::Pixel::RGB24,
                ow,
                oh,
                flags,
            )
            .map_err(|e| err(what, "cannot convert its pixel format", Some(e)))?;
            self.scaler = Some((ctx, key));
        }
        let mut rgb = ffmpeg::frame::Video::empty();
        let Some((scaler, _)) = self.scaler.as_mut() else {
            unreachable!("scaler was just set")
        };
        scaler
            .run(frame, &mut rgb)
            .map_err(|e| err(what, "cannot convert a frame", Some(e)))?;
        let (w, h) = (rgb.width(), rgb.height());
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let mut buf = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h as usize {
            buf.extend_from_slice(&data[y * stride..y * stride + w as usize * 3]);
        }
        let img = RgbImage::from_raw(w, h, buf)
            .ok_or_else(|| err(what, "frame has an unexpected size", None))?;
        Ok(match self.rotation {
            90 => image::imageops::rotate90(&img),
            180 => image::imageops::rotate180(&img),
            270 => image::imageops::rotate270(&img),
            _ => img,
        })
    }
}

/// Whether time `t` is more than `window` from every (ascending) target.
fn far_from_all(t: f64, targets: &[f64], window: f64) -> bool {
    let i = targets.partition_point(|&x| x < t - window);
    targets.get(i).is_none_or(|&x| x > t + window)
}

/// Decode a far packet's frame only as far as later frames need it: drop it
/// if nothing references it, and optionally skip its loop filter.
fn set_skipping(decoder: &mut ffmpeg::decoder::Video, far: bool, skip_loop_filter: bool) {
    use ffmpeg::Discard;
    decoder.skip_frame(if far {
        Discard::NonReference
    } else {
        Discard::Default
    });
    decoder.skip_loop_filter(if far && skip_loop_filter {
        Discard::All
    } else {
        Discard::Default
    });
}

/// Decodes the frames nearest to `times` (seconds, ascending) and hands each
/// to `on_frame(index, result)`, exactly once per target, in order. A target
/// with no decodable frame near it (a corrupt stretch, past the end) gets an
/// error; the others still get their frames.
pub fn sample_frames(
    src: &VideoBytes<'_>,
    times: &[f64],
    on_frame: impl FnMut(usize, Result<SampledFrame, EmbedError>),
) -> Result<VideoInfo, EmbedError> {
    sample_frames_with(src, times, &SampleOptions::default(), on_frame)
}

/// [`sample_frames`] with settings: keyframe-only sampling, scaling straight
/// to the model's input size, decoder threads.
pub fn sample_frames_with(
    src: &VideoBytes<'_>,
    times: &[f64],
    opts: &SampleOptions,
    mut on_frame: impl FnMut(usize, Result<SampledFrame, EmbedError>),
) -> Result<VideoInfo, EmbedError> {
    let what = src.describe();
    let mut ictx = open(src)?;
    let (index, info) = info_of(&ictx, &what)?;
    if times.windows(2).any(|w| w[0] > w[1]) {
        return Err(EmbedError::invalid(
            "video",
            "sample times must be ascending",
        ));
    }
    let stream = ictx
        .stream(index)
        .ok_or_else(|| err(&what, "video stream vanished", None))?;
    let tb = f64::from(stream.time_base());
    let start_pts = stream.start_time();
    let mut decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|mut c| {
            c.set_threading(ffmpeg::codec::threading::Config {
                kind: ffmpeg::codec::threading::Type::Frame,
                count: opts.threads,
                ..Default::default()
            });
            c.decoder().video()
        })
        .map_err(|e| err(&what, "cannot open the decoder", Some(e)))?;
    let keyframes = opts.mode == SampleMode::Keyframes;
    if keyframes {
        decoder.skip_frame(ffmpeg::Discard::NonKey);
    }
    // Frames further than this from their target are not "the frame at t".
    let frame_gap = info.frame_rate.map_or(0.5, |r| 1.0 / r);
    let tolerance = if keyframes {
        f64::INFINITY
    } else {
        (3.0 * frame_gap).max(1.0)
    };
    // A packet whose frame is shown further than this from every remaining
    // target cannot be the nearest frame to one: decode it only if later
    // frames need it.
    let needed_within = 2.0 * frame_gap;
    let mut skipping = false;
    let mut conv = Converter {
        scaler: None,
        rotation: info.rotation,
        resize_for: opts.resize_for.clone(),
    };
    let to_sec = |pts: i64| {
        let base = if start_pts == i64::MIN || start_pts < 0 {
            0
        } else {
            start_pts
        };
        (pts - base) as f64 * tb
    };

    let mut next = 0usize;
    let mut prev: Option<(f64, ffmpeg::frame::Video)> = None;
    let mut cur = ffmpeg::frame::Video::empty();

    let seek_to = |ictx: &mut Input, t: f64| -> bool {
        let ts = (t * f64::from(ffmpeg::ffi::AV_TIME_BASE)) as i64;
        ictx.seek(ts, ..ts + 1).is_ok()
    };
    if let Some(first) = times.first()
        && *first > SEEK_AHEAD_SEC
        && seek_to(&mut ictx, *first)
    {
        decoder.flush();
    }
    // The target we last seeked for: a seek lands on the keyframe before it,
    // which may still be "far", so never seek twice for the same target.
    let mut seeked_for = times
        .first()
        .is_some_and(|f| *f > SEEK_AHEAD_SEC)
        .then_some(0usize);

    // Emits every target up to frame time `t`, choosing prev or cur.
    let mut emit = |t: f64,
                    cur: &ffmpeg::frame::Video,
                    prev: &Option<(f64, ffmpeg::frame::Video)>,
                    next: &mut usize,
                    conv: &mut Converter| {
        while *next < times.len() && t >= times[*next] {
            let target = times[*next];
            let use_prev = prev
                .as_ref()
                .is_some_and(|(pt, _)| target - pt < t - target);
            let (ft, frame) = match (use_prev, prev) {
                (true, Some((pt, pf))) => (*pt, pf),
                _ => (t, cur),
            };
            let r = if (ft - target).abs() > tolerance {
                Err(err(
                    &what,
                    format!(
                        "no frame decodes near {target:.2} s (nearest at {ft:.2} s; corrupt stretch?)"
                    ),
                    None,
                ))
            } else {
                conv.rgb(frame, &what).map(|image| SampledFrame {
                    time_sec: ft,
                    image,
                })
            };
            on_frame(*next, r);
            *next += 1;
        }
    };

    let mut packets_done = false;
    while next < times.len() {
        // Feed one packet of our stream (or EOF), then drain frames.
        if !packets_done {
            let mut fed = false;
            for (s, packet) in ictx.packets() {
                if s.index() == index {
                    let far = !keyframes
                        && packet.pts().is_some_and(|p| {
                            far_from_all(to_sec(p), &times[next..], needed_within)
                        });
                    if far != skipping {
                        skipping = far;
                        set_skipping(&mut decoder, far, opts.skip_loop_filter);
                    }
                    // A corrupt packet is skipped; the decoder conceals or
                    // resyncs at the next keyframe.
                    let _ = decoder.send_packet(&packet);
                    fed = true;
                    break;
                }
            }
            if !fed {
                // The demuxer stopped: the end, or an unreadable stretch. If
                // targets remain inside the video, jump past it once for each.
                if next < times.len()
                    && times[next] < info.duration_sec
                    && seeked_for != Some(next)
                    && seek_to(&mut ictx, times[next])
                {
                    seeked_for = Some(next);
                    decoder.flush();
                    prev = None;
                    continue;
                }
                let _ = decoder.send_eof();
                packets_done = true;
            }
        }
        let mut got_any = false;
        while decoder.receive_frame(&mut cur).is_ok() {
            got_any = true;
            let Some(pts) = cur.timestamp().or(cur.pts()) else {
                continue;
            };
            let t = to_sec(pts);
            emit(t, &cur, &prev, &mut next, &mut conv);
            if next >= times.len() {
                break;
            }
            // Far from the next target: jump instead of decoding everything between.
            if times[next] - t > SEEK_AHEAD_SEC
                && !packets_done
                && seeked_for != Some(next)
                && seek_to(&mut ictx, times[next])
            {
                seeked_for = Some(next);
                decoder.flush();
                prev = None;
                break;
            }
            let frame = std::mem::replace(&mut cur, ffmpeg::frame::Video::empty());
            prev = Some((t, frame));
        }
        if packets_done && !got_any {
            break;
        }
    }
    // Targets after the last decoded frame (the tail of a clipped segment).
    while next < times.len() {
        let target = times[next];
        let r = match &prev {
            Some((pt, pf)) if (target - pt).abs() <= tolerance => {
                conv.rgb(pf, &what).map(|image| SampledFrame {
                    time_sec: *pt,
                    image,
                })
            }
            _ => Err(err(
                &what,
                format!("no frame decodes near {target:.2} s (truncated or corrupt?)"),
                None,
            )),
        };
        on_frame(next, r);
        next += 1;
    }
    Ok(info)
}
