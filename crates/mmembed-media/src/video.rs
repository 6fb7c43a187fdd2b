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
    /// Threads for decoding; 0 = one per core. In exact mode on a file
    /// whose index lists its keyframes (MP4, MOV, MKV, WebM, AVI), targets
    /// that span several keyframes are cut into runs decoded side by side by
    /// that many single-threaded decoders; otherwise one decoder uses that
    /// many frame threads. 1 = one decoder on one thread.
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

/// How far before a target a seek may be retried when it lands after it.
const MAX_SEEK_BACK_SEC: f64 = 64.0;

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
///
/// In exact mode, when the container indexes its keyframes (MP4, MOV, MKV,
/// WebM, AVI) and the targets span several of them, the targets are cut
/// at keyframes into runs that single-threaded decoders take in turn, one
/// per thread; frames still reach `on_frame` in order. This beats one decoder
/// with frame threads because skipping the unkept non-reference frames
/// leaves a chain of reference frames that each wait for the one before: on
/// a B-frame H.264 video FFmpeg decodes that chain no faster with two
/// threads than with one. Memory stays bounded: a thread runs at most one
/// buffer of frames ahead of the caller.
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
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    if opts.mode == SampleMode::Exact && threads >= 2 && seeks_to_keyframes(&ictx) {
        let buffer = frames_per_buffer(&info, opts);
        // A few runs per thread, so that threads finish close together.
        let run_len = (times.len() / (threads * 4)).clamp(1, buffer);
        let runs = keyframe_runs(&mut ictx, index, &info, times, run_len);
        if runs.len() >= 2 {
            tracing::debug!(
                video = %what,
                runs = runs.len(),
                threads = threads.min(runs.len()),
                "sampling keyframe runs in parallel"
            );
            drop(ictx);
            sample_parallel(
                src,
                index,
                &info,
                times,
                opts,
                &runs,
                threads,
                buffer,
                &mut on_frame,
            );
            return Ok(info);
        }
    }
    sample_serial(
        ictx,
        index,
        &info,
        src,
        times,
        opts,
        opts.threads,
        false,
        &mut on_frame,
    )?;
    Ok(info)
}

/// Containers whose seeks land on a keyframe at or before the wanted time,
/// from an index stored in the file. Seeking in MPEG program streams (and
/// other formats without one) searches by timestamp and may land between
/// keyframes, so a run starting there would begin with the wrong frames.
fn seeks_to_keyframes(ictx: &Input) -> bool {
    let format = ictx.format();
    let name = format.name();
    name.starts_with("mov,") || name.starts_with("matroska") || name == "avi"
}

/// Converted frames a decoding thread may hold ahead of the caller: about
/// 64 MiB, between 2 and 64 frames.
fn frames_per_buffer(info: &VideoInfo, opts: &SampleOptions) -> usize {
    let conv = Converter {
        scaler: None,
        rotation: info.rotation,
        resize_for: opts.resize_for.clone(),
    };
    let (w, h) = conv.out_size(info.width.max(1), info.height.max(1));
    let bytes = (w as usize * h as usize * 3).max(1);
    ((64 << 20) / bytes).clamp(2, 64)
}

/// Timestamps of one stream in seconds from its start.
#[derive(Clone, Copy)]
struct Clock {
    time_base: f64,
    base: i64,
}

impl Clock {
    fn of(stream: &ffmpeg::format::stream::Stream<'_>) -> Self {
        let start = stream.start_time();
        Clock {
            time_base: f64::from(stream.time_base()),
            base: if start == i64::MIN || start < 0 {
                0
            } else {
                start
            },
        }
    }

    fn sec(self, pts: i64) -> f64 {
        (pts - self.base) as f64 * self.time_base
    }

    /// Where time 0 is on the container's absolute timeline.
    fn start_sec(self) -> f64 {
        self.base as f64 * self.time_base
    }
}

/// Times of the keyframes the container's index lists for a stream.
fn index_keyframes(ictx: &Input, index: usize) -> Vec<f64> {
    let Some(stream) = ictx.stream(index) else {
        return Vec::new();
    };
    let clock = Clock::of(&stream);
    // SAFETY: the stream pointer is a live stream of `ictx`, which we borrow
    // for the whole block and nothing else touches; each entry is copied
    // out before the next call.
    unsafe {
        let ptr = stream.as_ptr() as *mut ffmpeg::ffi::AVStream;
        let n = ffmpeg::ffi::avformat_index_get_entries_count(ptr);
        (0..n)
            .filter_map(|i| {
                let e = ffmpeg::ffi::avformat_index_get_entry(ptr, i);
                (!e.is_null() && (*e).flags() & ffmpeg::ffi::AVINDEX_KEYFRAME != 0)
                    .then(|| clock.sec((*e).timestamp))
            })
            .collect()
    }
}

/// Cuts `times` into runs that each start at a keyframe of the container's
/// index, whole keyframe intervals per run, at most `max_len` targets per
/// run unless one interval holds more. One run when the index lists fewer
/// than two keyframes in range (streams without an index, such as MPEG-TS).
fn keyframe_runs(
    ictx: &mut Input,
    index: usize,
    info: &VideoInfo,
    times: &[f64],
    max_len: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut keyframes = index_keyframes(ictx, index);
    if keyframes.len() < 2 {
        // Matroska and WebM read their index (cues, at the end of the file)
        // only when first asked to seek. Back to the start either way.
        let _ = ictx.seek(0, ..1);
        keyframes = index_keyframes(ictx, index);
    }
    // Index times may be decode times, a few frames before the keyframe is
    // shown; a run starts a little after its keyframe, so that its first
    // target's nearest frame is never one from before the keyframe.
    let gap = info.frame_rate.map_or(0.04, |r| 1.0 / r);
    runs_at_keyframes(&keyframes, (8.0 * gap).min(1.0), times, max_len)
}

/// Cuts ascending `times` where a run may start: `margin` after each
/// keyframe time. Whole keyframe intervals per run, joined while the run
/// stays within `max_len` targets.
fn runs_at_keyframes(
    keyframes: &[f64],
    margin: f64,
    times: &[f64],
    max_len: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut starts: Vec<f64> = keyframes
        .iter()
        .map(|k| k + margin)
        .filter(|s| s.is_finite() && *s > margin)
        .collect();
    starts.sort_by(f64::total_cmp);
    starts.dedup();
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut i = 0;
    while i < times.len() {
        // The keyframe interval of times[i] ends at the next start after it.
        let g = starts.partition_point(|s| *s <= times[i]);
        let end_t = starts.get(g).copied().unwrap_or(f64::INFINITY);
        let j = i + times[i..].partition_point(|t| *t < end_t);
        match runs.last_mut() {
            Some(r) if r.end - r.start + (j - i) <= max_len => r.end = j,
            _ => runs.push(i..j),
        }
        i = j;
    }
    runs
}

/// Runs of targets decoded by `threads` single-threaded decoders, run k on
/// thread k mod `threads`, handed to `on_frame` in order.
#[allow(clippy::too_many_arguments)]
fn sample_parallel(
    src: &VideoBytes<'_>,
    index: usize,
    info: &VideoInfo,
    times: &[f64],
    opts: &SampleOptions,
    runs: &[std::ops::Range<usize>],
    threads: usize,
    buffer: usize,
    on_frame: &mut dyn FnMut(usize, Result<SampledFrame, EmbedError>),
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    type Msg = (usize, Result<SampledFrame, EmbedError>);
    let threads = threads.min(runs.len());
    let what = src.describe();
    // Set when the caller stopped listening (it panicked): threads finish
    // the run they are in and quit.
    let abandoned = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut receivers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for w in 0..threads {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(buffer);
            receivers.push(rx);
            let abandoned = &abandoned;
            let src = src.clone();
            handles.push(scope.spawn(move || {
                for run in runs.iter().skip(w).step_by(threads) {
                    if abandoned.load(Ordering::Relaxed) {
                        return;
                    }
                    let mut done = run.start;
                    let send = |k: usize, r| {
                        if tx.send((k, r)).is_err() {
                            abandoned.store(true, Ordering::Relaxed);
                        }
                    };
                    // The same bytes: the caller's probe holds for them.
                    let r = open(&src).and_then(|ictx| {
                        sample_serial(
                            ictx,
                            index,
                            info,
                            &src,
                            &times[run.clone()],
                            opts,
                            1,
                            true,
                            &mut |k, r| {
                                done = run.start + k + 1;
                                send(run.start + k, r);
                            },
                        )
                    });
                    // Exactly one message per target, whatever happened, so
                    // that the caller's count per run stays right.
                    let e = r
                        .err()
                        .unwrap_or_else(|| err(&src.describe(), "no frame decoded", None));
                    for k in done..run.end {
                        send(k, Err(e.clone()));
                    }
                }
            }));
        }
        for (n, run) in runs.iter().enumerate() {
            let rx = &receivers[n % threads];
            for k in run.clone() {
                match rx.recv() {
                    Ok((got, r)) => on_frame(got, r),
                    // Only if a decoding thread died; its panic is raised
                    // below.
                    Err(_) => on_frame(k, Err(err(&what, "a decoding thread failed", None))),
                }
            }
        }
        // Join explicitly rather than at the end of the scope: a scope
        // returns once the threads' closures are done, before the threads
        // themselves are gone, and memory they still hold looked like a
        // leak to LeakSanitizer.
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// One decoder with `threads` frame threads over `times` (ascending,
/// checked by the caller), from the start or, with `seek_first`, from the
/// keyframe before the first target.
#[allow(clippy::too_many_arguments)]
fn sample_serial(
    mut ictx: Input,
    index: usize,
    info: &VideoInfo,
    src: &VideoBytes<'_>,
    times: &[f64],
    opts: &SampleOptions,
    threads: usize,
    seek_first: bool,
    on_frame: &mut dyn FnMut(usize, Result<SampledFrame, EmbedError>),
) -> Result<(), EmbedError> {
    let what = src.describe();
    let stream = ictx
        .stream(index)
        .ok_or_else(|| err(&what, "video stream vanished", None))?;
    let clock = Clock::of(&stream);
    let mut decoder = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .and_then(|mut c| {
            c.set_threading(ffmpeg::codec::threading::Config {
                kind: ffmpeg::codec::threading::Type::Frame,
                count: threads,
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
    let to_sec = |pts: i64| clock.sec(pts);

    let mut next = 0usize;
    let mut prev: Option<(f64, ffmpeg::frame::Video)> = None;
    let mut cur = ffmpeg::frame::Video::empty();

    // Our times count from the stream's first frame; seeks take absolute
    // times (MPEG streams often start at 0.5-1.4 s).
    let start_sec = clock.start_sec();
    let seek_to = |ictx: &mut Input, t: f64| -> bool {
        let ts = ((t + start_sec) * f64::from(ffmpeg::ffi::AV_TIME_BASE)) as i64;
        ictx.seek(ts, ..ts + 1).is_ok()
    };
    // After a seek: the time asked for, and how far before the target to
    // ask next if the first frame decoded comes after the target. Indexed
    // containers land on the keyframe before the target; others (MPEG-PS,
    // MPEG-TS) search by timestamp and can land between keyframes, so the
    // decoder only starts at the next one, possibly seconds late.
    let mut landing: Option<(f64, f64)> = None;
    let seek_at_start = times
        .first()
        .is_some_and(|f| seek_first || *f > SEEK_AHEAD_SEC);
    if seek_at_start && seek_to(&mut ictx, times[0]) {
        decoder.flush();
        landing = Some((times[0], 1.0));
    }
    // The target we last seeked for: a seek lands on the keyframe before it,
    // which may still be "far", so never seek twice for the same target.
    let mut seeked_for = seek_at_start.then_some(0usize);

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
    let mut eof_sent = false;
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
                // The demuxer stopped: the end, or an unreadable stretch.
                // Drain the decoder first: its last frames may be the ones
                // wanted. Then, if targets remain inside the video and no
                // frame near them was seen, jump past the stretch once for
                // each.
                let next_unseen = next < times.len()
                    && prev
                        .as_ref()
                        .is_none_or(|(pt, _)| (times[next] - pt).abs() > tolerance);
                if !eof_sent {
                    let _ = decoder.send_eof();
                    eof_sent = true;
                } else if next_unseen
                    && times[next] < info.duration_sec
                    && seeked_for != Some(next)
                    && seek_to(&mut ictx, times[next])
                {
                    seeked_for = Some(next);
                    decoder.flush();
                    eof_sent = false;
                    prev = None;
                    continue;
                } else {
                    packets_done = true;
                }
            }
        }
        let mut got_any = false;
        while decoder.receive_frame(&mut cur).is_ok() {
            got_any = true;
            let Some(pts) = cur.timestamp().or(cur.pts()) else {
                continue;
            };
            let t = to_sec(pts);
            if let Some((asked, back)) = landing.take() {
                // Landed after the target, where an earlier frame may be
                // nearer: ask again further back, doubling the distance.
                let target = times[next];
                let pos = (target - back).max(0.0);
                if t - target > frame_gap / 2.0
                    && asked > 0.0
                    && back <= MAX_SEEK_BACK_SEC
                    && !packets_done
                    && seek_to(&mut ictx, pos)
                {
                    decoder.flush();
                    eof_sent = false;
                    prev = None;
                    landing = Some((pos, back * 2.0));
                    break;
                }
            }
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
                eof_sent = false;
                prev = None;
                landing = Some((times[next], 1.0));
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_start_after_keyframes_and_hold_whole_intervals() {
        // Keyframes every 10 s (the first at 0), targets every second.
        let keys = [0.0, 10.0, 20.0, 30.0];
        let times: Vec<f64> = (0..40).map(|s| s as f64 + 0.5).collect();
        let runs = runs_at_keyframes(&keys, 0.32, &times, 10);
        assert_eq!(runs, vec![0..10, 10..20, 20..30, 30..40]);
        // Two intervals fit in 20 targets; a target just after a keyframe,
        // within the margin, stays with the interval before.
        let runs = runs_at_keyframes(&keys, 0.32, &times, 20);
        assert_eq!(runs, vec![0..20, 20..40]);
        let near = [9.5, 10.1, 10.4, 19.0];
        assert_eq!(runs_at_keyframes(&keys, 0.32, &near, 1), vec![0..2, 2..4]);
        // An interval holding more than max_len targets is one run anyway.
        assert_eq!(runs_at_keyframes(&keys, 0.32, &times, 4).len(), 4);
        // No keyframes past the start, or no index: one run.
        assert_eq!(runs_at_keyframes(&[0.0], 0.32, &times, 4), vec![0..40]);
        assert_eq!(runs_at_keyframes(&[], 0.32, &times, 4), vec![0..40]);
        assert!(runs_at_keyframes(&keys, 0.32, &[], 4).is_empty());
        // Unsorted or duplicated index entries change nothing.
        let messy = [20.0, 0.0, 10.0, 10.0, 30.0, f64::NAN];
        assert_eq!(runs_at_keyframes(&messy, 0.32, &times, 10).len(), 4);
    }
}
