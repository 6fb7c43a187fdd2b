//! Dynamic batching: a [`Batcher`] is an [`Embedder`] that merges the
//! requests of concurrent callers into model batches for the backend
//! behind it, with a bounded queue.
//!
//! A backend such as the local CLIP model is fastest on full batches, but
//! a server's callers send one instance each (the Vertex SDK always does).
//! The batcher queues every request it is given; one dispatcher task takes
//! queued requests by a *budget* (cost units: a text or an image costs 1, a
//! video a whole batch, since its frames fill batches by themselves) and
//! hands them to the backend as one `embed_batch` call, then routes each
//! answer back to its caller. While the backend is busy, requests pile up
//! and the next batch takes them all (continuous batching, as in TEI's
//! `core/src/queue.rs`); when it is idle, the first request waits at most
//! [`BatchOptions::max_wait`] for company.
//!
//! - **Backpressure**: a call whose items would take the queue over
//!   [`BatchOptions::max_queued`] is refused at once with
//!   [`EmbedError::Overloaded`] (a server answers 429), instead of growing
//!   memory without bound.
//! - **Deadlines**: a caller that stops waiting (a timeout around the
//!   future, a dropped connection) leaves its requests in the queue only
//!   until the dispatcher reaches them: requests nobody waits for are
//!   dropped unrun.
//!
//! ```
//! # async fn demo(local: std::sync::Arc<dyn mmembed_core::Embedder>) {
//! use mmembed_core::batching::{BatchOptions, Batcher};
//! use mmembed_core::{Embedder, EmbedRequest};
//! let batched = Batcher::new(local, BatchOptions::default());
//! // Concurrent callers' texts reach the model as one batch.
//! let (a, b) = tokio::join!(
//!     batched.embed(EmbedRequest::text("a cat")),
//!     batched.embed(EmbedRequest::text("a dog")),
//! );
//! # let _ = (a, b);
//! # }
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;

use crate::{EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings};

/// Settings of a [`Batcher`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Cost units per backend call (default 32: a text or image is 1, a
    /// video counts as a whole batch). Set it to the backend's model batch
    /// size, or a small multiple of it so the backend can overlap decoding
    /// with the model.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others when the
    /// backend is idle (default 0: a lone request runs at once; batches
    /// still form while the backend is busy).
    pub max_wait: Duration,
    /// Most cost units waiting at once (default 1024); more is refused
    /// with [`EmbedError::Overloaded`].
    pub max_queued: usize,
    /// Backend calls in flight at once (default 1: the local backend runs
    /// one batch at a time; more suits remote backends).
    pub max_concurrent_batches: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::ZERO,
            max_queued: 1024,
            max_concurrent_batches: 1,
        }
    }
}

/// What one backend call carried, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchEvent {
    /// Requests in the call.
    pub requests: usize,
    /// Their cost units.
    pub cost: usize,
    /// How long the oldest of them waited in the queue.
    pub oldest_wait: Duration,
    /// Requests dropped unrun because their callers had stopped waiting.
    pub abandoned: usize,
}

/// Called after each batch is taken from the queue.
pub type BatchHook = Arc<dyn Fn(&BatchEvent) + Send + Sync>;

struct Pending {
    req: EmbedRequest,
    cost: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embeddings, EmbedError>>,
}

struct Shared {
    queue: Mutex<VecDeque<Pending>>,
    queued_cost: AtomicUsize,
    wake: Notify,
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        // A panic while holding the lock cannot leave the queue half-edited
        // (every edit is one push or pop), so a poisoned lock is still good.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Merges concurrent callers' requests into backend batches (see the
/// [module docs](self)). Must be created inside a Tokio runtime: it spawns
/// its dispatcher task, which ends when the batcher is dropped.
pub struct Batcher {
    info: EmbedderInfo,
    shared: Arc<Shared>,
    opts: BatchOptions,
    /// Only to answer `reads_uri`; batches go through the dispatcher.
    inner: Arc<dyn Embedder>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("info", &self.info)
            .field("opts", &self.opts)
            .field("queued", &self.queued())
            .finish()
    }
}

impl Batcher {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Embedder>, opts: BatchOptions) -> Self {
        Self::with_hook(inner, opts, None)
    }

    /// Wraps `inner`, calling `hook` for every batch (metrics).
    pub fn with_hook(
        inner: Arc<dyn Embedder>,
        opts: BatchOptions,
        hook: Option<BatchHook>,
    ) -> Self {
        let opts = BatchOptions {
            max_batch: opts.max_batch.max(1),
            max_queued: opts.max_queued.max(1),
            max_concurrent_batches: opts.max_concurrent_batches.max(1),
            ..opts
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            queued_cost: AtomicUsize::new(0),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let info = inner.info().clone();
        tokio::spawn(dispatch(inner.clone(), shared.clone(), opts.clone(), hook));
        Self {
            info,
            shared,
            opts,
            inner,
        }
    }

    /// Cost units waiting now (a gauge for metrics).
    pub fn queued(&self) -> usize {
        self.shared.queued_cost.load(Ordering::Relaxed)
    }

    /// The settings in use.
    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    fn cost(&self, r: &EmbedRequest) -> usize {
        let mut c = usize::from(r.text.is_some()) + usize::from(r.image.is_some());
        if r.video.is_some() {
            c += self.opts.max_batch;
        }
        c.max(1)
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

#[async_trait]
impl Embedder for Batcher {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        self.inner.reads_uri(uri)
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        let costs: Vec<usize> = reqs.iter().map(|r| self.cost(r)).collect();
        let total: usize = costs.iter().sum();
        let mut receivers = Vec::with_capacity(reqs.len());
        {
            let mut q = self.shared.lock();
            let queued = self.shared.queued_cost.load(Ordering::Relaxed);
            // An empty queue takes any call, however large, so one big
            // library call is never refused outright.
            if queued > 0 && queued + total > self.opts.max_queued {
                let e = EmbedError::Overloaded {
                    queued,
                    limit: self.opts.max_queued,
                    retry_after: Duration::from_secs(1),
                };
                return reqs.iter().map(|_| Err(e.clone())).collect();
            }
            let now = Instant::now();
            for (req, cost) in reqs.into_iter().zip(costs) {
                let (tx, rx) = oneshot::channel();
                q.push_back(Pending {
                    req,
                    cost,
                    enqueued: now,
                    reply: tx,
                });
                receivers.push(rx);
            }
            self.shared.queued_cost.fetch_add(total, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        let mut out = Vec::with_capacity(receivers.len());
        for rx in receivers {
            out.push(rx.await.unwrap_or_else(|_| {
                Err(EmbedError::Backend {
                    backend: self.info.backend.clone(),
                    message: "the batching queue stopped before answering".into(),
                    retryable: true,
                })
            }));
        }
        out
    }
}

/// The dispatcher: takes batches off the queue as backend slots free up.
async fn dispatch(
    inner: Arc<dyn Embedder>,
    shared: Arc<Shared>,
    opts: BatchOptions,
    hook: Option<BatchHook>,
) {
    let slots = Arc::new(Semaphore::new(opts.max_concurrent_batches));
    loop {
        // Wait for work (or for the batcher to go away).
        loop {
            if shared.closed.load(Ordering::Acquire) && shared.lock().is_empty() {
                return;
            }
            if !shared.lock().is_empty() {
                break;
            }
            shared.wake.notified().await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // The backend is free. If the batch is not full yet, give the
        // oldest request up to `max_wait` (from when it arrived) for company.
        if !opts.max_wait.is_zero() {
            loop {
                let oldest = shared.lock().front().map(|p| p.enqueued);
                let Some(oldest) = oldest else { break };
                if shared.queued_cost.load(Ordering::Relaxed) >= opts.max_batch {
                    break;
                }
                let until = oldest + opts.max_wait;
                if Instant::now() >= until {
                    break;
                }
                let _ = tokio::time::timeout_at(until, shared.wake.notified()).await;
            }
        }
        let (batch, event) = take_batch(&shared, opts.max_batch);
        if let Some(h) = &hook {
            h(&event);
        }
        if batch.is_empty() {
            continue;
        }
        let inner = inner.clone();
        tokio::spawn(async move {
            let (reqs, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.req, p.reply)).unzip();
            let n = reqs.len();
            let mut results = inner.embed_batch(reqs).await.into_iter();
            for reply in replies {
                let r = results.next().unwrap_or_else(|| {
                    Err(EmbedError::Backend {
                        backend: inner.info().backend.clone(),
                        message: format!("returned fewer results than the {n} requests sent"),
                        retryable: false,
                    })
                });
                // The caller may have stopped waiting; nothing to do then.
                let _ = reply.send(r);
            }
            drop(permit);
        });
    }
}

/// Pops requests up to `budget` cost units (always at least one live
/// request when there is one), dropping those nobody waits for.
fn take_batch(shared: &Shared, budget: usize) -> (Vec<Pending>, BatchEvent) {
    let mut q = shared.lock();
    let now = Instant::now();
    let (mut batch, mut cost, mut abandoned, mut popped) = (Vec::new(), 0usize, 0usize, 0usize);
    let mut oldest_wait = Duration::ZERO;
    while let Some(front) = q.front() {
        if front.reply.is_closed() {
            popped += front.cost;
            abandoned += 1;
            q.pop_front();
            continue;
        }
        if !batch.is_empty() && cost + front.cost > budget {
            break;
        }
        let Some(p) = q.pop_front() else { break };
        cost += p.cost;
        popped += p.cost;
        oldest_wait = oldest_wait.max(now.saturating_duration_since(p.enqueued));
        batch.push(p);
    }
    shared.queued_cost.fetch_sub(popped, Ordering::Relaxed);
    let event = BatchEvent {
        requests: batch.len(),
        cost,
        oldest_wait,
        abandoned,
    };
    (batch, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Modality, SpaceId};
    use std::sync::atomic::AtomicUsize;

    /// Records the size of every batch it gets; answers each text with a
    /// one-element vector holding the text's length, after `delay`.
    struct Recorder {
        info: EmbedderInfo,
        batches: Mutex<Vec<usize>>,
        delay: Duration,
        calls: AtomicUsize,
    }

    impl Recorder {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(Self {
                info: EmbedderInfo {
                    backend: "rec".into(),
                    model_id: "m".into(),
                    space: SpaceId::new("s"),
                    native_dimension: 1,
                    supported_dimensions: vec![1],
                    modalities: vec![Modality::Text, Modality::Video],
                    max_text_tokens: None,
                },
                batches: Mutex::new(Vec::new()),
                delay,
                calls: AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl Embedder for Recorder {
        fn info(&self) -> &EmbedderInfo {
            &self.info
        }
        async fn embed_batch(
            &self,
            reqs: Vec<EmbedRequest>,
        ) -> Vec<Result<Embeddings, EmbedError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.batches.lock().unwrap().push(reqs.len());
            tokio::time::sleep(self.delay).await;
            reqs.into_iter()
                .map(|r| match r.text {
                    Some(t) if t == "bad" => Err(EmbedError::invalid("text", "bad")),
                    t => Ok(Embeddings {
                        text: t.map(|t| vec![t.len() as f32]),
                        image: None,
                        video: Vec::new(),
                        dimension: 1,
                        space: SpaceId::new("s"),
                        model: "m".into(),
                        backend: "rec".into(),
                    }),
                })
                .collect()
        }
    }

    fn text_of(r: &Result<Embeddings, EmbedError>) -> f32 {
        r.as_ref().unwrap().text.as_ref().unwrap()[0]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_batches_and_get_their_own_answers() {
        let rec = Recorder::new(Duration::from_millis(30));
        let b = Arc::new(Batcher::new(rec.clone(), BatchOptions::default()));
        let mut tasks = Vec::new();
        for i in 0..40usize {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let text = "x".repeat(i + 1);
                (i, b.embed(EmbedRequest::text(text)).await)
            }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(text_of(&r), (i + 1) as f32, "answer routed to its caller");
        }
        let batches = rec.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 40);
        assert!(batches.iter().all(|&n| n <= 32), "{batches:?}");
        // 40 callers while each batch takes 30 ms: far fewer than 40 calls.
        assert!(batches.len() <= 4, "not merged: {batches:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn lone_request_waits_at_most_max_wait() {
        let rec = Recorder::new(Duration::ZERO);
        let opts = BatchOptions {
            max_wait: Duration::from_millis(5),
            ..BatchOptions::default()
        };
        let b = Batcher::new(rec.clone(), opts);
        let t0 = Instant::now();
        let r = b.embed(EmbedRequest::text("abc")).await;
        assert_eq!(text_of(&r), 3.0);
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(5) && waited < Duration::from_millis(10),
            "{waited:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_refuses_with_overloaded_and_others_still_succeed() {
        let rec = Recorder::new(Duration::from_millis(100));
        let opts = BatchOptions {
            max_batch: 2,
            max_queued: 4,
            ..BatchOptions::default()
        };
        let b = Arc::new(Batcher::new(rec.clone(), opts));
        // Occupy the backend, then fill the queue.
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(EmbedRequest::text("aa")).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let fill = {
            let b = b.clone();
            tokio::spawn(async move {
                b.embed_batch((0..4).map(|_| EmbedRequest::text("a")).collect())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = b.embed(EmbedRequest::text("late")).await;
        match refused {
            Err(e @ EmbedError::Overloaded { .. }) => {
                assert!(e.is_retryable());
                assert!(e.to_string().contains("limit 4"), "{e}");
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
        assert_eq!(text_of(&first.await.unwrap()), 2.0);
        assert!(fill.await.unwrap().iter().all(|r| r.is_ok()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_requests_are_not_run_and_errors_stay_per_item() {
        let rec = Recorder::new(Duration::from_millis(80));
        let b = Arc::new(Batcher::new(rec.clone(), BatchOptions::default()));
        let busy = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(EmbedRequest::text("busy")).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Gives up long before the backend is free.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(5),
            b.embed(EmbedRequest::text("abandoned")),
        )
        .await;
        assert!(gave_up.is_err());
        let mixed = b
            .embed_batch(vec![EmbedRequest::text("bad"), EmbedRequest::text("good")])
            .await;
        assert!(matches!(mixed[0], Err(EmbedError::InvalidInput { .. })));
        assert_eq!(text_of(&mixed[1]), 4.0);
        busy.await.unwrap().unwrap();
        // busy, then bad+good; the abandoned one never reached the backend.
        assert_eq!(rec.batches.lock().unwrap().clone(), vec![1, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_video_fills_a_batch_by_itself() {
        let rec = Recorder::new(Duration::from_millis(50));
        let b = Arc::new(Batcher::new(rec.clone(), BatchOptions::default()));
        let busy = {
            let b = b.clone();
            tokio::spawn(async move { b.embed(EmbedRequest::text("busy")).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let reqs = vec![
            EmbedRequest::text("a"),
            EmbedRequest::video(vec![1u8], None),
            EmbedRequest::text("b"),
        ];
        let out = b.embed_batch(reqs).await;
        assert_eq!(out.len(), 3);
        busy.await.unwrap().unwrap();
        assert_eq!(rec.batches.lock().unwrap().clone(), vec![1, 1, 1, 1]);
    }
}
