//! Combinators that are themselves backends: [`Fallback`] (a primary
//! backend, a secondary one when the primary is down or cannot serve a
//! request, with a circuit breaker) and [`Hedged`] (ask a second backend
//! when the first is slow; the first good answer wins).
//!
//! Both are written once over [`Backend`], which [`Embedder`]s and
//! [`Generator`]s both are: `Fallback<dyn Embedder>` is an `Embedder`,
//! `Fallback<dyn Generator>` a `Generator`.
//!
//! Both refuse backends of different embedding spaces unless mixing is
//! explicitly allowed: vectors of two models are not comparable, and a
//! silent fallback from one to the other would corrupt an index. Every
//! answer still names the backend and space that produced it
//! ([`Embeddings::backend`], [`Embeddings::space`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::generate::{GenerateRequest, Generation, Generator, GeneratorInfo};
use crate::{EmbedError, EmbedRequest, Embedder, EmbedderInfo, Embeddings, SpaceId};

type Results<B> = Vec<Result<<B as Backend>::Output, EmbedError>>;

/// What the combinators need of a backend: requests in, one result per
/// request out, a way to check a request before sending it, and how two
/// backends' descriptions combine. Implemented for `dyn Embedder` and
/// `dyn Generator`.
#[async_trait]
pub trait Backend: Send + Sync {
    /// One request.
    type Request: Clone + Send + Sync + 'static;
    /// One answer.
    type Output: Send + 'static;
    /// What the backend says about itself.
    type Info: Clone + Send + Sync + 'static;

    /// The description.
    fn describe(&self) -> &Self::Info;
    /// The backend's name, for logs.
    fn name(&self) -> &str;
    /// Whether it can serve `req` at all (modality, dimension).
    fn accepts(&self, req: &Self::Request) -> Result<(), EmbedError>;
    /// Whether it reads `uri` itself.
    fn reads(&self, uri: &str) -> bool;
    /// Runs a batch.
    async fn run(&self, reqs: Vec<Self::Request>) -> Vec<Result<Self::Output, EmbedError>>;
    /// The description of a combination `kind(a, b)`.
    fn combine(
        kind: &str,
        a: &Self::Info,
        b: &Self::Info,
        allow_mixed_spaces: bool,
    ) -> Result<Self::Info, EmbedError>;
}

#[async_trait]
impl<'a> Backend for dyn Embedder + 'a {
    type Request = EmbedRequest;
    type Output = Embeddings;
    type Info = EmbedderInfo;

    fn describe(&self) -> &EmbedderInfo {
        self.info()
    }
    fn name(&self) -> &str {
        &self.info().backend
    }
    fn accepts(&self, req: &EmbedRequest) -> Result<(), EmbedError> {
        self.info().check(req)
    }
    fn reads(&self, uri: &str) -> bool {
        self.reads_uri(uri)
    }
    async fn run(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        self.embed_batch(reqs).await
    }
    fn combine(
        kind: &str,
        a: &EmbedderInfo,
        b: &EmbedderInfo,
        allow_mixed_spaces: bool,
    ) -> Result<EmbedderInfo, EmbedError> {
        combined_info(kind, a, b, allow_mixed_spaces)
    }
}

#[async_trait]
impl<'a> Backend for dyn Generator + 'a {
    type Request = GenerateRequest;
    type Output = Generation;
    type Info = GeneratorInfo;

    fn describe(&self) -> &GeneratorInfo {
        self.info()
    }
    fn name(&self) -> &str {
        &self.info().backend
    }
    fn accepts(&self, req: &GenerateRequest) -> Result<(), EmbedError> {
        self.info().check(req)
    }
    fn reads(&self, uri: &str) -> bool {
        self.reads_uri(uri)
    }
    async fn run(&self, reqs: Vec<GenerateRequest>) -> Vec<Result<Generation, EmbedError>> {
        self.generate_batch(reqs).await
    }
    /// Answers of two models are text either way: no space to protect, so
    /// `allow_mixed_spaces` does not apply.
    fn combine(
        kind: &str,
        a: &GeneratorInfo,
        b: &GeneratorInfo,
        _allow_mixed_spaces: bool,
    ) -> Result<GeneratorInfo, EmbedError> {
        let mut modalities = a.modalities.clone();
        for m in &b.modalities {
            if !modalities.contains(m) {
                modalities.push(*m);
            }
        }
        Ok(GeneratorInfo {
            backend: format!("{kind}({},{})", a.backend, b.backend),
            model_id: if a.model_id == b.model_id {
                a.model_id.clone()
            } else {
                format!("{}|{}", a.model_id, b.model_id)
            },
            modalities,
        })
    }
}

/// Whether another backend may succeed where this error came from: the
/// backend was down, overloaded, slow or broken, as opposed to the input
/// being wrong (it would fail there too).
pub fn is_backend_failure(e: &EmbedError) -> bool {
    match e {
        EmbedError::Backend { .. }
        | EmbedError::ModelLoad { .. }
        | EmbedError::Timeout { .. }
        | EmbedError::Overloaded { .. } => true,
        // Retryable (429, 5xx), or the service refusing us rather than the
        // request: bad credentials, no permission, no such model.
        EmbedError::Remote {
            retryable,
            http_status,
            ..
        } => *retryable || matches!(http_status, None | Some(401 | 403 | 404)),
        _ => false,
    }
}

fn combined_info(
    kind: &str,
    a: &EmbedderInfo,
    b: &EmbedderInfo,
    allow_mixed_spaces: bool,
) -> Result<EmbedderInfo, EmbedError> {
    let space = if a.space == b.space {
        a.space.clone()
    } else if allow_mixed_spaces {
        SpaceId::mixed(&a.space, &b.space)
    } else {
        return Err(EmbedError::invalid(
            kind,
            format!(
                "`{}` embeds into space {} and `{}` into {}: their vectors are not comparable. \
                 Use two backends of the same model, or allow mixed spaces explicitly (every \
                 result then says which space it is in)",
                a.model_id, a.space, b.model_id, b.space
            ),
        ));
    };
    let mut dims: Vec<u32> = a
        .supported_dimensions
        .iter()
        .chain(&b.supported_dimensions)
        .copied()
        .collect();
    dims.sort_unstable();
    dims.dedup();
    let mut modalities = a.modalities.clone();
    for m in &b.modalities {
        if !modalities.contains(m) {
            modalities.push(*m);
        }
    }
    Ok(EmbedderInfo {
        backend: format!("{kind}({},{})", a.backend, b.backend),
        model_id: if a.model_id == b.model_id {
            a.model_id.clone()
        } else {
            format!("{}|{}", a.model_id, b.model_id)
        },
        space,
        native_dimension: a.native_dimension,
        supported_dimensions: dims,
        modalities,
        max_text_tokens: match (a.max_text_tokens, b.max_text_tokens) {
            (Some(x), Some(y)) => Some(x.max(y)),
            _ => None,
        },
    })
}

fn missing(backend: &str, n: usize) -> EmbedError {
    EmbedError::Backend {
        backend: backend.to_string(),
        message: format!("returned fewer results than the {n} requests sent"),
        retryable: false,
    }
}

/// Settings of a [`Fallback`].
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackOptions {
    /// Consecutive primary failures that open the circuit (default 3).
    pub failure_threshold: u32,
    /// How long an open circuit skips the primary before probing it again
    /// (default 30 s).
    pub open_for: Duration,
    /// Accept backends of different spaces (default false).
    pub allow_mixed_spaces: bool,
}

impl Default for FallbackOptions {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_for: Duration::from_secs(30),
            allow_mixed_spaces: false,
        }
    }
}

#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// The state of a [`Fallback`]'s circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// The primary is used.
    Closed,
    /// The primary is skipped until the instant has passed.
    Open,
    /// The open period is over: the next batch probes the primary.
    HalfOpen,
}

/// Uses `primary`, and `secondary` for requests the primary fails with a
/// backend error (down, overloaded, timed out: see [`is_backend_failure`])
/// or cannot serve (a modality or dimension it lacks). Requests that are
/// wrong in themselves (empty text, undecodable media) are answered with the
/// primary's error: they would fail on the secondary too.
///
/// A circuit breaker stops paying the primary's failure latency: after
/// `failure_threshold` consecutive backend failures the primary is skipped
/// for `open_for`, then one batch probes it; a success closes the circuit, a
/// failure opens it again.
///
/// ```
/// # use std::sync::Arc;
/// # use mmembed_core::{Embedder, hybrid::{Fallback, FallbackOptions}};
/// # fn demo(local: Arc<dyn Embedder>, remote: Arc<dyn Embedder>) -> Result<(), mmembed_core::EmbedError> {
/// let both = Fallback::new(local, remote, FallbackOptions::default())?;
/// # Ok(()) }
/// ```
pub struct Fallback<B: ?Sized + Backend = dyn Embedder> {
    primary: Arc<B>,
    secondary: Arc<B>,
    opts: FallbackOptions,
    info: B::Info,
    breaker: Mutex<Breaker>,
}

impl Fallback<dyn Embedder> {
    /// Combines two embedders; an error if their spaces differ and mixing
    /// is not allowed.
    pub fn new(
        primary: Arc<dyn Embedder>,
        secondary: Arc<dyn Embedder>,
        opts: FallbackOptions,
    ) -> Result<Self, EmbedError> {
        Self::combine(primary, secondary, opts)
    }
}

impl Fallback<dyn Generator> {
    /// Combines two generators (`allow_mixed_spaces` does not apply).
    pub fn for_generators(
        primary: Arc<dyn Generator>,
        secondary: Arc<dyn Generator>,
        opts: FallbackOptions,
    ) -> Result<Self, EmbedError> {
        Self::combine(primary, secondary, opts)
    }
}

impl<B: ?Sized + Backend> Fallback<B> {
    /// Combines two backends of any kind.
    pub fn combine(
        primary: Arc<B>,
        secondary: Arc<B>,
        opts: FallbackOptions,
    ) -> Result<Self, EmbedError> {
        let info = B::combine(
            "fallback",
            primary.describe(),
            secondary.describe(),
            opts.allow_mixed_spaces,
        )?;
        Ok(Self {
            primary,
            secondary,
            opts: FallbackOptions {
                failure_threshold: opts.failure_threshold.max(1),
                ..opts
            },
            info,
            breaker: Mutex::new(Breaker::default()),
        })
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The circuit breaker's state now.
    pub fn circuit(&self) -> Circuit {
        match self.breaker().open_until {
            None => Circuit::Closed,
            Some(t) if Instant::now() >= t => Circuit::HalfOpen,
            Some(_) => Circuit::Open,
        }
    }

    fn record(&self, backend_failure: bool) {
        let mut b = self.breaker();
        if backend_failure {
            b.consecutive_failures += 1;
            // A failed probe reopens at once.
            if b.consecutive_failures >= self.opts.failure_threshold || b.open_until.is_some() {
                if b.open_until.is_none_or(|t| Instant::now() >= t) {
                    tracing::warn!(
                        primary = %self.primary.name(),
                        failures = b.consecutive_failures,
                        open_for = ?self.opts.open_for,
                        "primary backend failing: skipping it"
                    );
                }
                b.open_until = Some(Instant::now() + self.opts.open_for);
            }
        } else {
            if b.open_until.is_some() {
                tracing::info!(primary = %self.primary.name(), "primary backend is back");
            }
            *b = Breaker::default();
        }
    }

    async fn route(&self, reqs: Vec<B::Request>) -> Results<B> {
        let n = reqs.len();
        let mut results: Vec<Option<Result<B::Output, EmbedError>>> =
            (0..n).map(|_| None).collect();
        let mut primary_errors: Vec<Option<EmbedError>> = vec![None; n];
        let mut to_primary = vec![];
        let mut to_secondary = vec![];
        let use_primary = self.circuit() != Circuit::Open;
        for (i, r) in reqs.iter().enumerate() {
            if !use_primary {
                to_secondary.push(i);
                continue;
            }
            match self.primary.accepts(r) {
                Ok(()) => to_primary.push(i),
                // Wrong in itself (an empty prompt): wrong everywhere.
                Err(e) if !e.is_unsupported() => results[i] = Some(Err(e)),
                Err(e) => {
                    primary_errors[i] = Some(e);
                    to_secondary.push(i);
                }
            }
        }
        if !to_primary.is_empty() {
            let batch = to_primary.iter().map(|&i| reqs[i].clone()).collect();
            let mut out = self.primary.run(batch).await.into_iter();
            for &i in &to_primary {
                let r = out
                    .next()
                    .unwrap_or_else(|| Err(missing(self.primary.name(), n)));
                match r {
                    Err(e) if is_backend_failure(&e) || e.is_unsupported() => {
                        self.record(!e.is_unsupported());
                        tracing::debug!(error = %e, "primary failed; using the secondary");
                        primary_errors[i] = Some(e);
                        to_secondary.push(i);
                    }
                    other => {
                        // An answer, even "your input is wrong", means the
                        // primary is up.
                        self.record(false);
                        results[i] = Some(other);
                    }
                }
            }
        }
        if !to_secondary.is_empty() {
            to_secondary.sort_unstable();
            let batch = to_secondary.iter().map(|&i| reqs[i].clone()).collect();
            let mut out = self.secondary.run(batch).await.into_iter();
            for &i in &to_secondary {
                let r = out
                    .next()
                    .unwrap_or_else(|| Err(missing(self.secondary.name(), n)));
                // Neither can serve it: the primary's reason is the first one.
                results[i] = Some(match (r, primary_errors[i].take()) {
                    (Err(e), Some(p)) if e.is_unsupported() => Err(p),
                    (r, _) => r,
                });
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(missing("fallback", n))))
            .collect()
    }
}

#[async_trait]
impl Embedder for Fallback<dyn Embedder> {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        // Either may serve the request, so both must read it.
        self.primary.reads_uri(uri) && self.secondary.reads_uri(uri)
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        self.route(reqs).await
    }
}

#[async_trait]
impl Generator for Fallback<dyn Generator> {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        self.primary.reads_uri(uri) && self.secondary.reads_uri(uri)
    }

    async fn generate_batch(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Vec<Result<Generation, EmbedError>> {
        self.route(reqs).await
    }
}

/// Settings of a [`Hedged`].
#[derive(Debug, Clone, PartialEq)]
pub struct HedgedOptions {
    /// How long the first backend has before the second is asked too
    /// (default 200 ms; a high percentile of the first's latency is a good
    /// choice).
    pub delay: Duration,
    /// Accept backends of different spaces (default false).
    pub allow_mixed_spaces: bool,
}

impl Default for HedgedOptions {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(200),
            allow_mixed_spaces: false,
        }
    }
}

/// Sends a batch to `first`; if no answer came within `delay`, sends it to
/// `second` as well, and returns whichever answers first. The other call is
/// dropped, which cancels it: an HTTP request is aborted; work a local
/// backend already handed to its blocking pool finishes there, unused.
///
/// An answer in which every request failed with a backend error (see
/// [`is_backend_failure`]) or was unsupported does not win: the other
/// backend's answer is awaited instead (and asked at once, if it was not yet).
pub struct Hedged<B: ?Sized + Backend = dyn Embedder> {
    first: Arc<B>,
    second: Arc<B>,
    delay: Duration,
    info: B::Info,
}

impl Hedged<dyn Embedder> {
    /// Combines two embedders; an error if their spaces differ and mixing
    /// is not allowed.
    pub fn new(
        first: Arc<dyn Embedder>,
        second: Arc<dyn Embedder>,
        opts: HedgedOptions,
    ) -> Result<Self, EmbedError> {
        Self::combine(first, second, opts)
    }
}

impl Hedged<dyn Generator> {
    /// Combines two generators.
    pub fn for_generators(
        first: Arc<dyn Generator>,
        second: Arc<dyn Generator>,
        opts: HedgedOptions,
    ) -> Result<Self, EmbedError> {
        Self::combine(first, second, opts)
    }
}

impl<B: ?Sized + Backend> Hedged<B> {
    /// Combines two backends of any kind.
    pub fn combine(first: Arc<B>, second: Arc<B>, opts: HedgedOptions) -> Result<Self, EmbedError> {
        let info = B::combine(
            "hedged",
            first.describe(),
            second.describe(),
            opts.allow_mixed_spaces,
        )?;
        Ok(Self {
            first,
            second,
            delay: opts.delay,
            info,
        })
    }

    async fn race(&self, reqs: Vec<B::Request>) -> Results<B> {
        let first = self.first.run(reqs.clone());
        tokio::pin!(first);
        let early = tokio::select! {
            r = &mut first => Some(r),
            () = tokio::time::sleep(self.delay) => None,
        };
        let second = self.second.run(reqs);
        match early {
            Some(r) if !all_failed(&r) => return r,
            Some(_) => return second.await,
            None => {}
        }
        tracing::debug!(delay = ?self.delay, "first backend slow; hedging");
        tokio::pin!(second);
        tokio::select! {
            r = &mut first => if all_failed(&r) { second.await } else { r },
            r = &mut second => if all_failed(&r) { first.await } else { r },
        }
    }
}

fn all_failed<T>(r: &[Result<T, EmbedError>]) -> bool {
    !r.is_empty()
        && r.iter().all(|x| {
            x.as_ref()
                .is_err_and(|e| is_backend_failure(e) || e.is_unsupported())
        })
}

#[async_trait]
impl Embedder for Hedged<dyn Embedder> {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        self.first.reads_uri(uri) && self.second.reads_uri(uri)
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        self.race(reqs).await
    }
}

#[async_trait]
impl Generator for Hedged<dyn Generator> {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        self.first.reads_uri(uri) && self.second.reads_uri(uri)
    }

    async fn generate_batch(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> Vec<Result<Generation, EmbedError>> {
        self.race(reqs).await
    }
}

/// Asks `inner` for `dimension` whenever a request names none: a backend
/// with a configured output size (`vertex:PROJECT?dimension=512`). Requests
/// that name a dimension keep it.
pub struct DefaultDimension {
    inner: Arc<dyn Embedder>,
    dimension: u32,
    info: EmbedderInfo,
}

impl DefaultDimension {
    /// Wraps `inner`; an error if it cannot produce `dimension`.
    pub fn new(inner: Arc<dyn Embedder>, dimension: u32) -> Result<Self, EmbedError> {
        let mut info = inner.info().clone();
        if !info.supported_dimensions.contains(&dimension) {
            return Err(EmbedError::UnsupportedDimension {
                requested: dimension,
                supported: info.supported_dimensions,
            });
        }
        info.native_dimension = dimension as usize;
        Ok(Self {
            inner,
            dimension,
            info,
        })
    }
}

#[async_trait]
impl Embedder for DefaultDimension {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn reads_uri(&self, uri: &str) -> bool {
        self.inner.reads_uri(uri)
    }

    async fn embed_batch(&self, reqs: Vec<EmbedRequest>) -> Vec<Result<Embeddings, EmbedError>> {
        let reqs = reqs
            .into_iter()
            .map(|mut r| {
                r.dimension.get_or_insert(self.dimension);
                r
            })
            .collect();
        self.inner.embed_batch(reqs).await
    }
}
