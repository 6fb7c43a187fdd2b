//! Fallback and hedging with scripted fake backends, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mmembed_core::hybrid::{Circuit, Fallback, FallbackOptions, Hedged, HedgedOptions};
use mmembed_core::{
    EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, Modality, SpaceId,
};

#[derive(Clone)]
enum Act {
    Ok,
    Fail(EmbedError),
}

struct Fake {
    info: EmbedderInfo,
    script: Mutex<VecDeque<Act>>,
    latency: Duration,
    calls: AtomicUsize,
    completed: AtomicUsize,
    cancelled: Arc<AtomicUsize>,
}

struct CancelGuard(Arc<AtomicUsize>, bool);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn fake(name: &str, space: &str, modalities: &[Modality], latency_ms: u64) -> Arc<Fake> {
    Arc::new(Fake {
        info: EmbedderInfo {
            backend: name.into(),
            model_id: format!("{name}-model"),
            space: SpaceId::new(space),
            native_dimension: 2,
            supported_dimensions: vec![2],
            modalities: modalities.to_vec(),
            max_text_tokens: None,
        },
        script: Mutex::new(VecDeque::new()),
        latency: Duration::from_millis(latency_ms),
        calls: AtomicUsize::new(0),
        completed: AtomicUsize::new(0),
        cancelled: Arc::new(AtomicUsize::new(0)),
    })
}

impl Fake {
    fn then(&self, act: Act) {
        self.script.lock().unwrap().push_back(act);
    }
}

#[async_trait]
impl Embedder for Fake {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }
    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut guard = CancelGuard(self.cancelled.clone(), false);
        tokio::time::sleep(self.latency).await;
        guard.1 = true;
        self.completed.fetch_add(1, Ordering::SeqCst);
        reqs.iter()
            .map(|r| {
                self.info.check(r)?;
                if r.text.as_deref() == Some("") {
                    return Err(EmbedError::invalid("text", "is empty"));
                }
                let act = self.script.lock().unwrap().pop_front().unwrap_or(Act::Ok);
                match act {
                    Act::Fail(e) => Err(e),
                    Act::Ok => Ok(Embeddings {
                        text: r.text.as_ref().map(|_| vec![1.0, 0.0]),
                        image: r.image.as_ref().map(|_| vec![0.0, 1.0]),
                        video: vec![],
                        dimension: 2,
                        space: self.info.space.clone(),
                        model: self.info.model_id.clone(),
                        backend: self.info.backend.clone(),
                    }),
                }
            })
            .collect()
    }
}

const TEXT_IMAGE: &[Modality] = &[Modality::Text, Modality::Image];

fn unavailable() -> EmbedError {
    EmbedError::Remote {
        http_status: Some(503),
        status: Some("UNAVAILABLE".into()),
        message: "try later".into(),
        retryable: true,
    }
}

fn fallback(p: &Arc<Fake>, s: &Arc<Fake>, opts: FallbackOptions) -> Fallback {
    Fallback::new(p.clone(), s.clone(), opts).unwrap()
}

async fn who(e: &dyn Embedder, req: EmbedRequest) -> Result<String, EmbedError> {
    e.embed(req).await.map(|x| x.backend)
}

#[tokio::test(start_paused = true)]
async fn falls_back_on_each_backend_error_class_and_not_on_bad_input() {
    let p = fake("local", "s", TEXT_IMAGE, 1);
    let s = fake("vertex", "s", TEXT_IMAGE, 1);
    let f = fallback(
        &p,
        &s,
        FallbackOptions {
            failure_threshold: 100,
            ..Default::default()
        },
    );
    assert_eq!(who(&f, EmbedRequest::text("a")).await.unwrap(), "local");
    let backend_errors = [
        unavailable(),
        EmbedError::Timeout {
            after: Duration::from_secs(60),
        },
        EmbedError::Backend {
            backend: "local".into(),
            message: "CUDA out of memory".into(),
            retryable: false,
        },
        EmbedError::Remote {
            http_status: Some(403),
            status: Some("PERMISSION_DENIED".into()),
            message: "no".into(),
            retryable: false,
        },
        EmbedError::ModelLoad {
            model: "m".into(),
            reason: "gone".into(),
            source: None,
        },
    ];
    for e in backend_errors {
        p.then(Act::Fail(e.clone()));
        assert_eq!(
            who(&f, EmbedRequest::text("a")).await.unwrap(),
            "vertex",
            "{e}"
        );
    }
    // Wrong input would fail on the secondary too: the primary's error, no second call.
    let before = s.calls.load(Ordering::SeqCst);
    let e = who(&f, EmbedRequest::text("")).await.unwrap_err();
    assert!(matches!(e, EmbedError::InvalidInput { .. }), "{e}");
    p.then(Act::Fail(EmbedError::media("x.png", "truncated", None)));
    assert!(matches!(
        who(&f, EmbedRequest::text("a")).await,
        Err(EmbedError::MediaDecode { .. })
    ));
    p.then(Act::Fail(EmbedError::Remote {
        http_status: Some(400),
        status: Some("INVALID_ARGUMENT".into()),
        message: "bad".into(),
        retryable: false,
    }));
    assert!(who(&f, EmbedRequest::text("a")).await.is_err());
    assert_eq!(s.calls.load(Ordering::SeqCst), before);
}

#[tokio::test(start_paused = true)]
async fn unsupported_requests_go_to_the_secondary_and_batches_keep_their_order() {
    let p = fake("local", "s", &[Modality::Text], 1);
    let s = fake("vertex", "s", TEXT_IMAGE, 1);
    let f = fallback(&p, &s, FallbackOptions::default());
    assert!(f.info().modalities.contains(&Modality::Image));
    p.then(Act::Ok);
    p.then(Act::Fail(unavailable()));
    let out = f
        .embed_batch(vec![
            EmbedRequest::text("a"),
            EmbedRequest::image(vec![1u8, 2, 3]),
            EmbedRequest::text("b"),
            EmbedRequest::text(""),
        ])
        .await;
    let names: Vec<String> = out
        .iter()
        .map(|r| {
            r.as_ref()
                .map_or_else(|e| format!("err: {e}"), |e| e.backend.clone())
        })
        .collect();
    assert_eq!(names[..3], ["local", "vertex", "vertex"]);
    assert!(
        names[3].starts_with("err: invalid input `text`"),
        "{names:?}"
    );
    assert!(out[1].as_ref().unwrap().image.is_some());
    // Neither serves video: the primary's refusal comes back.
    let e = who(&f, EmbedRequest::video(vec![0u8], None))
        .await
        .unwrap_err();
    assert!(e.is_unsupported(), "{e}");
}

#[tokio::test(start_paused = true)]
async fn the_circuit_opens_after_k_failures_and_probes_after_t() {
    let p = fake("local", "s", TEXT_IMAGE, 10);
    let s = fake("vertex", "s", TEXT_IMAGE, 10);
    let opts = FallbackOptions {
        failure_threshold: 3,
        open_for: Duration::from_secs(30),
        ..Default::default()
    };
    let f = fallback(&p, &s, opts);
    for _ in 0..3 {
        p.then(Act::Fail(unavailable()));
        assert_eq!(who(&f, EmbedRequest::text("a")).await.unwrap(), "vertex");
    }
    assert_eq!(f.circuit(), Circuit::Open);
    let calls = p.calls.load(Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(who(&f, EmbedRequest::text("a")).await.unwrap(), "vertex");
    assert_eq!(
        p.calls.load(Ordering::SeqCst),
        calls,
        "the primary is skipped while open"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(f.circuit(), Circuit::HalfOpen);
    // A failed probe reopens at once, for another full period.
    p.then(Act::Fail(unavailable()));
    assert_eq!(who(&f, EmbedRequest::text("a")).await.unwrap(), "vertex");
    assert_eq!(p.calls.load(Ordering::SeqCst), calls + 1);
    assert_eq!(f.circuit(), Circuit::Open);
    tokio::time::advance(Duration::from_secs(30)).await;
    // A good probe closes it.
    assert_eq!(who(&f, EmbedRequest::text("a")).await.unwrap(), "local");
    assert_eq!(f.circuit(), Circuit::Closed);
    // Failures must be consecutive: a success in between resets the count.
    for act in [
        Act::Fail(unavailable()),
        Act::Fail(unavailable()),
        Act::Ok,
        Act::Fail(unavailable()),
    ] {
        p.then(act);
        who(&f, EmbedRequest::text("a")).await.unwrap();
    }
    assert_eq!(f.circuit(), Circuit::Closed);
}

#[tokio::test(start_paused = true)]
async fn different_spaces_are_refused_unless_allowed() {
    let p = fake("local", "clip-a", TEXT_IMAGE, 1);
    let s = fake("vertex", "vertex-b", TEXT_IMAGE, 1);
    let e = Fallback::new(p.clone(), s.clone(), FallbackOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("not comparable"), "{e}");
    assert!(Hedged::new(p.clone(), s.clone(), HedgedOptions::default()).is_err());
    let f = fallback(
        &p,
        &s,
        FallbackOptions {
            allow_mixed_spaces: true,
            ..Default::default()
        },
    );
    assert_eq!(f.info().space.as_str(), "mixed(clip-a,vertex-b)");
    p.then(Act::Fail(unavailable()));
    let out = f.embed(EmbedRequest::text("a")).await.unwrap();
    assert_eq!(
        (out.backend.as_str(), out.space.as_str()),
        ("vertex", "vertex-b")
    );
}

#[tokio::test(start_paused = true)]
async fn hedging_asks_the_second_only_when_the_first_is_slow_and_cancels_the_loser() {
    let fast = fake("fast", "s", TEXT_IMAGE, 50);
    let slow = fake("slow", "s", TEXT_IMAGE, 1000);
    let opts = HedgedOptions {
        delay: Duration::from_millis(100),
        ..Default::default()
    };

    // The first answers within the delay: the second is never asked.
    let h = Hedged::new(fast.clone(), slow.clone(), opts.clone()).unwrap();
    assert_eq!(who(&h, EmbedRequest::text("a")).await.unwrap(), "fast");
    assert_eq!(slow.calls.load(Ordering::SeqCst), 0);

    // The first is slow: the second is asked after 100 ms and wins at 150 ms;
    // the first's call is dropped mid-flight.
    let h = Hedged::new(slow.clone(), fast.clone(), opts.clone()).unwrap();
    let t0 = tokio::time::Instant::now();
    assert_eq!(who(&h, EmbedRequest::text("a")).await.unwrap(), "fast");
    assert_eq!(t0.elapsed(), Duration::from_millis(150));
    assert_eq!(slow.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(slow.completed.load(Ordering::SeqCst), 0);

    // A fast failure does not win: the other is asked at once.
    let failing = fake("failing", "s", TEXT_IMAGE, 10);
    failing.then(Act::Fail(unavailable()));
    let h = Hedged::new(failing.clone(), fast.clone(), opts).unwrap();
    let t0 = tokio::time::Instant::now();
    assert_eq!(who(&h, EmbedRequest::text("a")).await.unwrap(), "fast");
    assert_eq!(t0.elapsed(), Duration::from_millis(60));
}

/// A generator that answers with its name after `latency`, or fails.
struct Talker {
    info: mmembed_core::GeneratorInfo,
    latency: Duration,
    fail: Option<EmbedError>,
    calls: AtomicUsize,
}

fn talker(name: &str, latency_ms: u64, fail: Option<EmbedError>) -> Arc<Talker> {
    Arc::new(Talker {
        info: mmembed_core::GeneratorInfo {
            backend: name.into(),
            model_id: format!("{name}-model"),
            modalities: vec![Modality::Text],
        },
        latency: Duration::from_millis(latency_ms),
        fail,
        calls: AtomicUsize::new(0),
    })
}

#[async_trait]
impl mmembed_core::Generator for Talker {
    fn info(&self) -> &mmembed_core::GeneratorInfo {
        &self.info
    }
    async fn generate_batch(
        &self,
        reqs: Vec<mmembed_core::GenerateRequest>,
    ) -> Vec<Result<mmembed_core::Generation, EmbedError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        reqs.iter()
            .map(|_| match &self.fail {
                Some(e) => Err(e.clone()),
                None => Ok(mmembed_core::Generation::from_answer(
                    Ok(self.info.backend.clone()),
                    None,
                    "{}".into(),
                    &self.info.backend,
                    &self.info.model_id,
                )),
            })
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_combinators_serve_generators() {
    use mmembed_core::{GenerateRequest, Generator};
    let down = EmbedError::Remote {
        http_status: Some(503),
        status: Some("UNAVAILABLE".into()),
        message: "down".into(),
        retryable: true,
    };
    let a = talker("a", 0, Some(down));
    let b = talker("b", 0, None);
    let f = Fallback::for_generators(a.clone(), b.clone(), FallbackOptions::default()).unwrap();
    let out = f
        .generate_batch(vec![
            GenerateRequest::text("x"),
            GenerateRequest::text("   "),
        ])
        .await;
    assert_eq!(out[0].as_ref().unwrap().text.as_deref(), Some("b"));
    // An empty prompt is the caller's mistake: refused before either runs it.
    assert!(
        matches!(out[1], Err(EmbedError::InvalidInput { .. })),
        "{:?}",
        out[1]
    );
    assert_eq!(f.info().backend, "fallback(a,b)");

    // Hedged: the slow first is overtaken by the second after the delay.
    let slow = talker("slow", 1000, None);
    let fast = talker("fast", 10, None);
    let h = Hedged::for_generators(
        slow.clone(),
        fast.clone(),
        HedgedOptions {
            delay: Duration::from_millis(100),
            allow_mixed_spaces: false,
        },
    )
    .unwrap();
    let start = tokio::time::Instant::now();
    let g = h.generate(GenerateRequest::text("x")).await.unwrap();
    assert_eq!(g.text.as_deref(), Some("fast"));
    assert!(start.elapsed() < Duration::from_millis(200));
    assert_eq!(
        (
            slow.calls.load(Ordering::SeqCst),
            fast.calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
}
