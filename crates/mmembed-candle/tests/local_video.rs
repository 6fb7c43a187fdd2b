//! Local video embeddings: per segment, the mean of the L2-normalised frame
//! embeddings, normalised again. Videos are made at test time with the
//! `ffmpeg` CLI from the fixture photos.
#![cfg(feature = "video")]

use std::path::{Path, PathBuf};

use mmembed_candle::{DeviceSpec, LocalEmbedder, LocalOptions};
use mmembed_core::{EmbedError, EmbedRequest, Embedder, VideoSegmentConfig, cosine, testkit};
use mmembed_media::ClipPreprocessor;
use mmembed_media::video::{SampleOptions, VideoBytes, sample_frames_with, sample_times};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures")
}

const PHOTOS: [&str; 3] = [
    "cat_451x300.png",
    "coffee_tall_180x400.png",
    "astronaut_small_120x90.png",
];

/// Photo i shown from 10·i to 10·(i+1) s, 320x240, H.264.
fn slideshow(dir: &Path) -> PathBuf {
    let out = dir.join("photos.mp4");
    let mut args: Vec<String> = Vec::new();
    for p in PHOTOS {
        args.extend(["-loop", "1", "-t", "10", "-framerate", "25", "-i"].map(String::from));
        args.push(fixtures().join("images").join(p).display().to_string());
    }
    args.push("-filter_complex".into());
    args.push(
        "[0]scale=320:240,setsar=1[a];[1]scale=320:240,setsar=1[b];[2]scale=320:240,setsar=1[c];[a][b][c]concat=n=3:v=1:a=0,format=yuv420p"
            .into(),
    );
    args.extend(["-c:v", "libx264", "-g", "50"].map(String::from));
    args.push(out.display().to_string());
    testkit::ffmpeg(&args);
    out
}

fn tiny(fps: f64) -> LocalEmbedder {
    load("tiny-clip", fps)
}

fn load(fixture: &str, fps: f64) -> LocalEmbedder {
    LocalEmbedder::load_blocking(
        LocalOptions::new(fixtures().join(fixture).to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(4)
            .with_video_fps(fps),
    )
    .unwrap()
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_is_the_mean_of_its_frame_embeddings() {
    segments_are_frame_means("tiny-clip", true).await;
}

/// A `max_batch` far over a video's frames (a typo, or "as large as it
/// goes") gives the same vectors, holding only the frames there are: room
/// for `max_batch` crops was once reserved up front (here the list of their
/// segments alone asked for 34 GB, and the process aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_max_batch_holds_only_the_frames_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let video = slideshow(dir.path());
    let cfg = VideoSegmentConfig::new(0, 30, 10).unwrap();
    let mut out = vec![];
    for max_batch in [4, u32::MAX as usize] {
        let e = LocalEmbedder::load_blocking(
            LocalOptions::new(fixtures().join("tiny-clip").to_str().unwrap())
                .with_device(DeviceSpec::Cpu)
                .with_max_batch(max_batch)
                .with_video_fps(1.0),
        )
        .unwrap();
        let r = e.embed(EmbedRequest::video(video.clone(), Some(cfg))).await;
        out.push(r.unwrap().video);
    }
    assert_eq!(out[0].len(), 3);
    for (a, b) in out[0].iter().zip(&out[1]) {
        assert!(a.error.is_none() && b.error.is_none(), "{a:?} {b:?}");
        assert!(cosine(&a.embedding, &b.embedding) > 0.999_999);
    }
}

/// A 2 s MP4 whose header says it lasts a billion seconds (its sample
/// durations, edit list and media header rewritten, as a hostile upload
/// could): asked for all of it in 4 s segments, it is refused at once. It
/// once held 23 GB of segments and sample times before the first decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_claiming_a_billion_seconds_is_refused_not_cut_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.mp4");
    let mut args: Vec<String> = ["-f", "lavfi", "-i", "testsrc2=s=64x48:r=10:d=2"]
        .into_iter()
        .chain(["-pix_fmt", "yuv420p", "-c:v", "libx264"])
        .map(String::from)
        .collect();
    args.push(path.display().to_string());
    testkit::ffmpeg(&args);
    let mut b = std::fs::read(&path).unwrap();
    let put = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let find = |b: &[u8], tag: &[u8]| b.windows(4).position(|w| w == tag).unwrap();
    // 20 samples of 50,000,000 ticks at 1 tick per second; an edit list
    // and media header that do not cut it short.
    let stts = find(&b, b"stts");
    put(&mut b, stts + 12, 20);
    put(&mut b, stts + 16, 50_000_000);
    let elst = find(&b, b"elst");
    put(&mut b, elst + 12, u32::MAX);
    let mdhd = find(&b, b"mdhd");
    put(&mut b, mdhd + 16, 1);
    put(&mut b, mdhd + 20, u32::MAX);
    let mvhd = find(&b, b"mvhd");
    put(&mut b, mvhd + 16, 1);
    put(&mut b, mvhd + 20, u32::MAX);
    let e = tiny(1.0);
    let all = VideoSegmentConfig::new(0, u32::MAX, 4).unwrap();
    let started = std::time::Instant::now();
    let r = e.embed(EmbedRequest::video(b, Some(all))).await;
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("250000000 segments") && err.contains("over the limit"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// The same on the other families: SigLIP's frames are squashed to the
/// square (swscale scales straight to 224 x 224), Chinese-CLIP's are CLIP's,
/// MobileCLIP's bilinear to 256 with torchvision's crop origin.
/// The tiny random Chinese-CLIP vision tower barely tells the photos apart
/// (the first segment's vector is 0.951 to its own photo, 0.956 to the
/// next), so only the frame-mean checks apply to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_families_segment_videos_alike() {
    segments_are_frame_means("tiny-siglip", true).await;
    segments_are_frame_means("tiny-chinese-clip", false).await;
    segments_are_frame_means("tiny-mobileclip", false).await;
    segments_are_frame_means("tiny-mobileclip-b", false).await;
    // Frames resized to keep their aspect ratio in the patch budget.
    segments_are_frame_means("tiny-siglip2-naflex", true).await;
}

/// `tells_photos_apart`: whether the fixture's random vision tower gives
/// each photo a vector clearly its own (checked: the segment is nearest its
/// photo).
async fn segments_are_frame_means(fixture: &str, tells_photos_apart: bool) {
    let dir = tempfile::tempdir().unwrap();
    let video = slideshow(dir.path());
    let e = load(fixture, 1.0);
    let cfg = VideoSegmentConfig::new(0, 30, 10).unwrap();
    let out = e
        .embed(EmbedRequest::video(video.clone(), Some(cfg)))
        .await
        .unwrap();
    assert_eq!(out.video.len(), 3);

    // Independent reference: the same frames, embedded one by one as images,
    // averaged here.
    let dir = fixtures().join(fixture);
    let preprocessor = match std::fs::read_to_string(dir.join("open_clip_config.json")) {
        Ok(open_clip) => ClipPreprocessor::from_open_clip_json(&open_clip),
        Err(_) => ClipPreprocessor::from_file(&dir.join("preprocessor_config.json")),
    }
    .unwrap();
    let segs = cfg.segments(30.0).unwrap();
    let per_seg = sample_times(&segs, 1.0);
    for (i, times) in per_seg.iter().enumerate() {
        assert_eq!(times.len(), 10);
        // The backend has swscale scale frames to the model's resize size
        // while converting them; the reference does the same, and then the
        // image path only crops.
        let scaled = SampleOptions {
            resize_for: Some(preprocessor.clone()),
            ..SampleOptions::default()
        };
        let mean_of = async |opts: &SampleOptions| {
            let mut frames = Vec::new();
            sample_frames_with(&VideoBytes::Path(&video), times, opts, |_, r| {
                frames.push(r.unwrap().image)
            })
            .unwrap();
            let reqs = frames.iter().map(|f| EmbedRequest::image(png(f))).collect();
            let vecs: Vec<Vec<f32>> = e
                .embed_batch(reqs)
                .await
                .into_iter()
                .map(|r| r.unwrap().image.unwrap())
                .collect();
            let mut mean = vec![0f32; vecs[0].len()];
            for v in &vecs {
                mean.iter_mut().zip(v).for_each(|(m, x)| *m += x);
            }
            mmembed_core::l2_normalize(&mut mean);
            mean
        };
        let mean = mean_of(&scaled).await;
        let seg = &out.video[i];
        assert_eq!(
            (seg.start_sec, seg.end_sec),
            (10.0 * i as f64, 10.0 * (i + 1) as f64)
        );
        let c = cosine(&seg.embedding, &mean);
        assert!(c > 0.99999, "{fixture} segment {i}: cosine {c}");
        // Against full-size frames resized with Pillow's filter (what
        // Hugging Face pipelines do), the swscale shortcut costs little.
        let full = mean_of(&SampleOptions::default()).await;
        let c = cosine(&seg.embedding, &full);
        assert!(
            c > 0.999,
            "{fixture} segment {i}: cosine to the Pillow path {c}"
        );
        // And the segment shows photo i more than the other photos.
        if !tells_photos_apart {
            continue;
        }
        let photo = |k: usize| fixtures().join("images").join(PHOTOS[k]);
        let sims: Vec<f32> = futures_sims(&e, &seg.embedding, (0..3).map(photo).collect()).await;
        let best = (0..3).max_by(|a, b| sims[*a].total_cmp(&sims[*b])).unwrap();
        assert_eq!(best, i, "{fixture} segment {i} similarities {sims:?}");
    }

    // Bytes give exactly the same answer as the path.
    let bytes = std::fs::read(&video).unwrap();
    let again = e
        .embed(EmbedRequest::video(bytes, Some(cfg)))
        .await
        .unwrap();
    assert_eq!(again.video, out.video);

    // The shared video contract.
    testkit::video_segments_contract(&e, EmbedRequest::video(video.clone(), Some(cfg))).await;
    let long = VideoSegmentConfig::new(0, 600, 7).unwrap();
    let clipped = e
        .embed(EmbedRequest::video(video, Some(long)))
        .await
        .unwrap();
    assert_eq!(
        clipped.video.last().unwrap().end_sec,
        30.0,
        "clipped to the real length"
    );
}

async fn futures_sims(e: &LocalEmbedder, v: &[f32], photos: Vec<PathBuf>) -> Vec<f32> {
    let reqs = photos.into_iter().map(EmbedRequest::image).collect();
    e.embed_batch(reqs)
        .await
        .into_iter()
        .map(|r| cosine(v, &r.unwrap().image.unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_videos_and_partial_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny(2.0);
    let audio = dir.path().join("a.m4a");
    testkit::ffmpeg([
        "-f".as_ref(),
        "lavfi".as_ref(),
        "-i".as_ref(),
        "sine=d=2".as_ref(),
        audio.as_os_str(),
    ]);
    let too_late = VideoSegmentConfig::new(100, 200, 10).unwrap();
    let out = e
        .embed_batch(vec![
            EmbedRequest::video(audio, None),
            EmbedRequest::video(b"not a video".to_vec(), None),
            EmbedRequest::video(slideshow(dir.path()), Some(too_late)),
            EmbedRequest::text("still fine"),
        ])
        .await;
    assert!(
        matches!(&out[0], Err(EmbedError::MediaDecode { reason, .. }) if reason.contains("no video stream")),
        "{:?}",
        out[0]
    );
    assert!(
        matches!(&out[1], Err(EmbedError::MediaDecode { .. })),
        "{:?}",
        out[1]
    );
    assert!(
        matches!(&out[2], Err(EmbedError::InvalidInput { field, .. }) if field.contains("start_offset_sec")),
        "{:?}",
        out[2]
    );
    assert!(out[3].is_ok());

    // A transport stream with its middle cut out (a damaged recording: whole
    // TS packets lost): the segments before and after the hole embed, the
    // ones inside it say why (nothing is dropped silently).
    let video = slideshow(dir.path());
    let ts = dir.path().join("v.ts");
    testkit::ffmpeg([
        "-i".as_ref(),
        video.as_os_str(),
        "-c".as_ref(),
        "copy".as_ref(),
        ts.as_os_str(),
    ]);
    let data = std::fs::read(&ts).unwrap();
    let (a, b) = (
        data.len() * 3 / 10 / 188 * 188,
        data.len() * 7 / 10 / 188 * 188,
    );
    let data = [&data[..a], &data[b..]].concat();
    let r = e
        .embed(EmbedRequest::video(
            data,
            Some(VideoSegmentConfig::new(0, 30, 5).unwrap()),
        ))
        .await
        .unwrap();
    assert_eq!(r.video.len(), 6, "every segment has a row");
    let ok: Vec<bool> = r.video.iter().map(|s| s.error.is_none()).collect();
    assert!(ok[0] && ok[5], "{ok:?}");
    assert!(
        ok.iter().any(|o| !o),
        "the corrupt middle is reported: {ok:?}"
    );
    for s in &r.video {
        assert_eq!(s.error.is_some(), s.embedding.is_empty(), "{s:?}");
    }
}

/// A named pipe at `path`.
fn fifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Opens the pipe's write end once something has it open for reading
/// (before that, a non-blocking open fails with ENXIO), or None after
/// `wait`. The returned file blocks on writes again.
fn writer_once_read(path: &Path, wait: std::time::Duration) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let start = std::time::Instant::now();
    while start.elapsed() < wait {
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            // SAFETY: a file descriptor this function owns.
            assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) }, 0);
            return Some(f);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// The backend prepares the next call while the model works on the one
/// before (issue #19: at the seam between two calls of `mmembed batch`
/// neither the GPU nor the decoders should sit idle). Both inputs are named
/// pipes, so "the model is busy with the video" is "ffmpeg waits for the
/// test to write": the next call's image gets a reader while the video's
/// pipe has had nothing written. One thread doing both in turn (as before)
/// reads the image only after the video is done, and fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_call_is_read_while_the_model_is_busy() {
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (video, image) = (dir.path().join("v.mp4"), dir.path().join("i.png"));
    fifo(&video);
    fifo(&image);
    let cat = fixtures().join("images/cat_451x300.png");
    let wait = Duration::from_secs(60);
    // One item per model batch, so the two calls are never merged.
    let e = Arc::new(
        LocalEmbedder::load_blocking(
            LocalOptions::new(fixtures().join("tiny-clip").to_str().unwrap())
                .with_device(DeviceSpec::Cpu)
                .with_max_batch(1),
        )
        .unwrap(),
    );
    let ev = e.clone();
    let v = video.clone();
    let video_call = tokio::spawn(async move { ev.embed(EmbedRequest::video(v, None)).await });
    // ffmpeg (on the model thread) has the video pipe open; kept open and
    // unwritten, it keeps the model thread waiting.
    let video_w = writer_once_read(&video, wait).expect("the video is never opened");
    let ei = e.clone();
    let i = image.clone();
    let image_call = tokio::spawn(async move { ei.embed(EmbedRequest::image(i)).await });
    let image_w = writer_once_read(&image, wait);
    // Whatever happened, let the threads go on.
    drop(video_w);
    let Some(mut image_w) = image_w else {
        panic!("the second call was not read while the model worked on the first");
    };
    image_w.write_all(&std::fs::read(&cat).unwrap()).unwrap();
    drop(image_w);
    let err = video_call.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("v.mp4"), "{err}");
    let got = image_call.await.unwrap().unwrap().image.unwrap();
    let want = e
        .embed(EmbedRequest::image(cat))
        .await
        .unwrap()
        .image
        .unwrap();
    assert_eq!(got, want);
}

/// Within a call, a model batch's images are decoded while the batch
/// before still waits for its last image (issue #19: at the end of each
/// batch most decoding threads sat idle until its last image was done).
/// One image per model batch; both are named pipes, the first kept
/// unwritten: the second must still be opened. Decoding batch by batch,
/// one parallel loop each (as before), never gets to it, and fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_batch_is_decoded_while_the_one_before_waits() {
    use std::io::Write;
    use std::time::Duration;
    if rayon::current_num_threads() < 2 {
        eprintln!("skipped: one decoding thread cannot overlap two batches");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.png"), dir.path().join("b.png"));
    fifo(&first);
    fifo(&second);
    let cat = std::fs::read(fixtures().join("images/cat_451x300.png")).unwrap();
    let wait = Duration::from_secs(60);
    let e = LocalEmbedder::load_blocking(
        LocalOptions::new(fixtures().join("tiny-clip").to_str().unwrap())
            .with_device(DeviceSpec::Cpu)
            .with_max_batch(1),
    )
    .unwrap();
    let reqs = vec![
        EmbedRequest::image(first.clone()),
        EmbedRequest::image(second.clone()),
    ];
    let call = tokio::spawn(async move {
        let out = e.embed_batch(reqs).await;
        (e, out)
    });
    let first_w = writer_once_read(&first, wait).expect("the first image is never opened");
    // The first batch's image stays unwritten while the second is awaited.
    let second_w = writer_once_read(&second, wait);
    let write = |mut w: std::fs::File| w.write_all(&cat).unwrap();
    write(first_w);
    let Some(second_w) = second_w else {
        panic!("the second batch was not decoded while the first waited for its image");
    };
    write(second_w);
    let (e, out) = call.await.unwrap();
    let want = e
        .embed(EmbedRequest::image(
            fixtures().join("images/cat_451x300.png"),
        ))
        .await
        .unwrap()
        .image
        .unwrap();
    for (i, r) in out.into_iter().enumerate() {
        assert_eq!(r.unwrap().image.unwrap(), want, "image {i}");
    }
}
