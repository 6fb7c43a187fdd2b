//! Conformance checks that every [`Embedder`] must pass.
//!
//! Each backend's test suite calls these against its own instance (a real
//! model, a fake server), so all backends keep the same contract. They
//! panic with a message on a violation, like `assert!`.

use crate::{EmbedError, EmbedRequest, Embedder, Modality};

/// The batch contract: one result per request, in input order; a bad item
/// fails alone with the right error kind; good items carry the backend's
/// space, model and size.
///
/// `texts` must be at least two different, valid texts.
pub async fn batch_contract(e: &dyn Embedder, texts: [&str; 2]) {
    let info = e.info().clone();
    assert!(
        info.modalities.contains(&Modality::Text),
        "batch_contract needs a text backend"
    );
    let unsupported = (1..=8192u32)
        .find(|d| !info.supported_dimensions.contains(d))
        .expect("some dimension is unsupported");
    let reqs = vec![
        EmbedRequest::text(texts[0]),
        EmbedRequest::default(),
        EmbedRequest::text("   "),
        EmbedRequest::text(texts[1]),
        EmbedRequest::text(texts[0]).with_dimension(unsupported),
        EmbedRequest::text(texts[0]),
    ];
    let out = e.embed_batch(reqs).await;
    assert_eq!(out.len(), 6, "one result per request");

    let vec_of = |i: usize| -> Vec<f32> {
        let r = out[i]
            .as_ref()
            .unwrap_or_else(|err| panic!("item {i} should succeed: {err}"));
        assert_eq!(r.space, info.space, "item {i} space");
        assert_eq!(r.model, info.model_id, "item {i} model");
        assert_eq!(r.backend, info.backend, "item {i} backend");
        assert_eq!(r.dimension, info.native_dimension, "item {i} dimension");
        let v = r.text.clone().expect("a text request gets a text vector");
        assert_eq!(v.len(), info.native_dimension, "item {i} vector length");
        assert!(
            v.iter().all(|x| x.is_finite()),
            "item {i} has non-finite values"
        );
        assert!(r.image.is_none() && r.video.is_empty());
        v
    };
    let (a, b, a2) = (vec_of(0), vec_of(3), vec_of(5));
    assert_ne!(
        a, b,
        "different texts must give different vectors (order kept?)"
    );
    let same = crate::cosine(&a, &a2);
    assert!(same > 0.9999, "same text twice in a batch: cosine {same}");

    assert!(
        matches!(&out[1], Err(EmbedError::InvalidInput { field, .. }) if field == "request"),
        "empty request: {:?}",
        out[1]
    );
    assert!(
        matches!(&out[2], Err(EmbedError::InvalidInput { field, .. }) if field == "text"),
        "blank text: {:?}",
        out[2]
    );
    assert!(
        matches!(&out[4], Err(EmbedError::UnsupportedDimension { requested, .. }) if *requested == unsupported),
        "unsupported dimension: {:?}",
        out[4]
    );

    // `embed` agrees with `embed_batch`.
    let single = e
        .embed(EmbedRequest::text(texts[1]))
        .await
        .expect("single embed");
    let c = crate::cosine(&single.text.expect("text vector"), &b);
    assert!(c > 0.9999, "embed vs embed_batch: cosine {c}");

    // An empty batch is an empty answer, not an error or a hang.
    assert!(e.embed_batch(Vec::new()).await.is_empty());
}

/// Modalities the backend does not list are refused with
/// [`EmbedError::UnsupportedModality`], not attempted.
pub async fn refuses_unlisted_modalities(e: &dyn Embedder) {
    let info = e.info().clone();
    for (m, req) in [
        (Modality::Image, EmbedRequest::image(vec![0u8; 8])),
        (Modality::Video, EmbedRequest::video(vec![0u8; 8], None)),
    ] {
        if info.modalities.contains(&m) {
            continue;
        }
        let r = e.embed(req).await;
        assert!(
            matches!(&r, Err(EmbedError::UnsupportedModality { modality, .. }) if *modality == m),
            "{m}: {r:?}"
        );
    }
}

/// The video contract: for a request with a video and an explicit segment
/// config, the answer has segments in time order, back to back, starting at
/// the config's start, none longer than the interval, none past the end, each
/// a finite vector of the backend's native size.
pub async fn video_segments_contract(e: &dyn Embedder, req: EmbedRequest) {
    let cfg = req
        .video
        .as_ref()
        .and_then(|v| v.segment_config)
        .expect("video_segments_contract needs a video request with a segment config");
    let range = cfg.range().expect("a valid segment config");
    let out = e.embed(req).await.expect("the video request succeeds");
    let segs = &out.video;
    assert!(!segs.is_empty(), "no segments");
    assert_eq!(
        segs[0].start_sec,
        f64::from(range.start_sec),
        "first segment start"
    );
    for (i, s) in segs.iter().enumerate() {
        assert!(
            s.start_sec < s.end_sec,
            "segment {i} is empty or reversed: {s:?}"
        );
        assert!(
            s.end_sec - s.start_sec <= f64::from(range.interval_sec) + 1e-6,
            "segment {i} longer than the interval"
        );
        assert!(
            s.end_sec <= f64::from(range.end_sec) + 1e-6,
            "segment {i} past the end"
        );
        assert_eq!(
            s.embedding.len(),
            e.info().native_dimension,
            "segment {i} size"
        );
        assert!(s.embedding.iter().all(|x| x.is_finite()));
        if i > 0 {
            assert_eq!(
                segs[i - 1].end_sec,
                s.start_sec,
                "segments {} and {i} not back to back",
                i - 1
            );
        }
    }
    assert_eq!(out.space, e.info().space);
}

/// Runs the `ffmpeg` CLI quietly (`-hide_banner -loglevel error -y` first)
/// to make test media, and panics with its stderr if it fails. Every crate's
/// video tests make their inputs this way (scripts/test.sh installs the
/// CLI).
pub fn ffmpeg<I, S>(args: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let out = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(&args)
        .output()
        .expect("the ffmpeg CLI runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
