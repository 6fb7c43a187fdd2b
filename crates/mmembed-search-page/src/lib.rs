//! A search page over `mmembed batch` outputs: type a text or drop an
//! image, see a grid of the nearest images and video segments with their
//! thumbnails, scores and names; a video segment plays from its start.
//!
//! [`SearchPage::router`] is an axum router, mounted by `mmembed serve
//! --search-in TABLE` beside the Vertex-compatible API:
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (plain HTML and JavaScript, no build step) |
//! | `GET /api/search?q=TEXT&k=24&modality=image\|video` | hits as JSON |
//! | `POST /api/search/image?k=24` | the same for an image in the body |
//! | `GET /api/info` | model, space, tables |
//! | `GET /thumb/{table}/{row}` | a JPEG thumbnail (a video's from its segment) |
//! | `GET /media/{table}/{row}` | the file itself, with Range requests |
//!
//! Media are addressed by table and row number, never by path: only files
//! that are rows of the loaded tables can be served, and anything else
//! (other numbers, `..`, encoded slashes) is a 404. Rows in buckets have no
//! thumbnail or media here (404): the page shows their name.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use mmembed_core::{EmbedRequest, Embedder, Media};
use mmembed_search::index::{Index, IndexSearch};
use mmembed_search::{Filter, Found, Modality, Options, Row, SearchError, Table};
use serde::Deserialize;
use serde_json::json;
use tower::ServiceExt as _;

const PAGE: &str = include_str!("page.html");
/// Longest side of a thumbnail, in pixels.
const THUMB: u32 = 320;
/// Largest query image accepted.
const MAX_UPLOAD: usize = 20 << 20;
/// Most hits a query may ask for.
const MAX_K: usize = 200;

/// What can go wrong setting up a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// Reading the tables or the index.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// Nothing to search.
    #[error("the tables hold no embedded rows")]
    Empty,
    /// The backend embeds into another space than the tables'.
    #[error(
        "the backend `{model}` embeds into space {space}, the tables are in {tables}; serve it with the tables' model"
    )]
    Space {
        /// The backend's model.
        model: String,
        /// Its space.
        space: String,
        /// The tables' space.
        tables: String,
    },
}

enum Source {
    Tables(Vec<Table>),
    Index(Box<Index>),
}

/// The page's state: what it searches, and the backend that embeds
/// queries once it is loaded.
pub struct SearchPage {
    source: Source,
    tables: Vec<Table>,
    space: String,
    model: String,
    dimension: usize,
    embedder: OnceLock<Arc<dyn Embedder>>,
}

impl std::fmt::Debug for SearchPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchPage")
            .field("tables", &self.tables)
            .field("space", &self.space)
            .finish()
    }
}

impl SearchPage {
    /// A page over `tables` (streamed per query).
    pub fn over_tables(tables: Vec<Table>) -> Result<Self, PageError> {
        let s = mmembed_search::summarize(&tables)?.ok_or(PageError::Empty)?;
        Ok(Self {
            source: Source::Tables(tables.clone()),
            tables,
            space: s.space,
            model: s.model,
            dimension: s.dimension,
            embedder: OnceLock::new(),
        })
    }

    /// A page over an index built by `mmembed index build` (refused when
    /// one of its tables changed since).
    pub fn over_index(dir: &Path) -> Result<Self, PageError> {
        let index = Index::open(dir)?;
        index.check_fresh()?;
        let m = index.manifest().clone();
        Ok(Self {
            tables: index.tables(),
            source: Source::Index(Box::new(index)),
            space: m.space,
            model: m.model,
            dimension: m.dimension,
            embedder: OnceLock::new(),
        })
    }

    /// The model recorded in the tables (the backend to serve by default).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The tables' embedding space.
    pub fn space(&self) -> &str {
        &self.space
    }

    /// Hands the page the backend for queries; refused if it embeds into
    /// another space than the tables'. Until then searches answer 503.
    pub fn set_embedder(&self, e: Arc<dyn Embedder>) -> Result<(), PageError> {
        let info = e.info();
        if info.space.as_str() != self.space {
            return Err(PageError::Space {
                model: info.model_id.clone(),
                space: info.space.to_string(),
                tables: self.space.clone(),
            });
        }
        let _ = self.embedder.set(e);
        Ok(())
    }

    /// The routes of the page (see the crate docs).
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", get(|| async { Html(PAGE) }))
            .route("/api/info", get(info))
            .route("/api/search", get(search_text))
            .route("/api/search/image", post(search_image))
            .route("/thumb/{table}/{row}", get(thumb))
            .route("/media/{table}/{row}", get(media))
            .with_state(self)
    }

    fn run(&self, query: &[f32], k: usize, filter: Filter) -> Result<Found, SearchError> {
        match &self.source {
            Source::Tables(t) => mmembed_search::search(
                t,
                query,
                &Options {
                    k,
                    filter,
                    space: Some(self.space.clone()),
                    ..Options::default()
                },
            ),
            Source::Index(i) => i.search(
                query,
                &IndexSearch {
                    k,
                    filter,
                    ..IndexSearch::default()
                },
            ),
        }
    }

    /// The row behind a media URL, if the numbers name one.
    fn row(&self, table: &str, row: &str) -> Option<Row> {
        let t = self.tables.get(table.parse::<usize>().ok()?)?;
        let i: u64 = row.parse().ok()?;
        mmembed_search::rows(t, &[i]).ok()?.pop()
    }
}

type Shared = Arc<SearchPage>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such row or file")
}

async fn info(State(p): State<Shared>) -> Response {
    axum::Json(json!({
        "model": p.model,
        "space": p.space,
        "dimension": p.dimension,
        "tables": p.tables.iter().map(|t| t.path().display().to_string()).collect::<Vec<_>>(),
        "index": matches!(p.source, Source::Index(_)),
        "ready": p.embedder.get().is_some(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct SearchParams {
    q: Option<String>,
    k: Option<usize>,
    modality: Option<String>,
    prefix: Option<String>,
}

impl SearchParams {
    fn filter(&self) -> Result<Filter, String> {
        let modality = match self.modality.as_deref() {
            None | Some("" | "all") => None,
            Some("image") => Some(Modality::Image),
            Some("video") => Some(Modality::Video),
            Some(m) => return Err(format!("modality `{m}`: image, video or all")),
        };
        Ok(Filter {
            modality,
            uri_prefix: self.prefix.clone().filter(|p| !p.is_empty()),
            equals: vec![],
        })
    }
}

/// The file name of a row's URI, for people.
fn name_of(uri: &str) -> &str {
    uri.rsplit(['/', '\\']).next().unwrap_or(uri)
}

/// A row's local file, if it is one (rows in buckets are not served).
fn local_file(uri: &str) -> Option<PathBuf> {
    let p = uri.strip_prefix("file://").unwrap_or(uri);
    (!p.contains("://")).then(|| PathBuf::from(p))
}

async fn answer(p: Shared, req: EmbedRequest, params: &SearchParams) -> Response {
    let filter = match params.filter() {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(embedder) = p.embedder.get().cloned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
        );
    };
    let started = Instant::now();
    let req = if embedder.info().native_dimension != p.dimension {
        req.with_dimension(p.dimension as u32)
    } else {
        req
    };
    let e = match embedder.embed(req).await {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("embedding the query: {e}")),
    };
    let Some(q) = e.text.or(e.image) else {
        return error(StatusCode::BAD_GATEWAY, "the backend returned no vector");
    };
    let embed_ms = started.elapsed().as_secs_f64() * 1e3;
    let k = params.k.unwrap_or(24).clamp(1, MAX_K);
    let page = p.clone();
    let found = tokio::task::spawn_blocking(move || page.run(&q, k, filter)).await;
    let found = match found {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let hits: Vec<_> = found
        .hits
        .iter()
        .map(|h| {
            let id = format!("{}/{}", h.table, h.index);
            let local = local_file(&h.row.uri).is_some();
            json!({
                "score": h.score,
                "uri": h.row.uri,
                "name": name_of(&h.row.uri),
                "kind": if h.row.video_start_sec.is_some() || h.row.content_type.starts_with("video/") { "video" } else { "image" },
                "content_type": h.row.content_type,
                "start": h.row.video_start_sec,
                "end": h.row.video_end_sec,
                "thumb": local.then(|| format!("/thumb/{id}")),
                "media": local.then(|| format!("/media/{id}")),
            })
        })
        .collect();
    axum::Json(json!({
        "hits": hits,
        "scanned": found.scanned,
        "matched": found.matched,
        "embed_ms": embed_ms,
        "ms": started.elapsed().as_secs_f64() * 1e3,
    }))
    .into_response()
}

async fn search_text(State(p): State<Shared>, Query(params): Query<SearchParams>) -> Response {
    let Some(q) = params.q.clone().filter(|q| !q.trim().is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "give a query: ?q=…");
    };
    answer(p, EmbedRequest::text(q), &params).await
}

async fn search_image(
    State(p): State<Shared>,
    Query(params): Query<SearchParams>,
    body: Bytes,
) -> Response {
    if body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "send the image as the request body",
        );
    }
    if body.len() > MAX_UPLOAD {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{} bytes is over the {MAX_UPLOAD} byte limit", body.len()),
        );
    }
    answer(p, EmbedRequest::image(Media::from(body.to_vec())), &params).await
}

fn jpeg(img: mmembed_media::image_crate::RgbImage) -> Result<Vec<u8>, String> {
    use mmembed_media::image_crate::{DynamicImage, ImageFormat};
    let small = DynamicImage::ImageRgb8(img).thumbnail(THUMB, THUMB);
    let mut out = std::io::Cursor::new(Vec::new());
    small
        .write_to(&mut out, ImageFormat::Jpeg)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// A thumbnail of a row: the image scaled down, or the frame in the middle
/// of a video segment.
fn thumbnail(row: &Row, path: &Path) -> Result<Vec<u8>, String> {
    let is_video = row.video_start_sec.is_some() || row.content_type.starts_with("video/");
    if !is_video {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let img = mmembed_media::decode_image(
            &bytes,
            &path.display().to_string(),
            &mmembed_media::ImageLimits::default(),
        )
        .map_err(|e| e.to_string())?;
        return jpeg(img);
    }
    #[cfg(feature = "video")]
    {
        let (a, b) = (row.video_start_sec.unwrap_or(0.0), row.video_end_sec);
        let t = b.map_or(a, |b| (a + b) / 2.0);
        let mut frame = Err("no frame".to_string());
        mmembed_media::video::sample_frames(
            &mmembed_media::video::VideoBytes::Path(path),
            &[t],
            |_, r| frame = r.map(|f| f.image).map_err(|e| e.to_string()),
        )
        .map_err(|e| e.to_string())?;
        jpeg(frame?)
    }
    #[cfg(not(feature = "video"))]
    {
        Err("built without video support".into())
    }
}

async fn thumb(
    State(p): State<Shared>,
    UrlPath((table, row)): UrlPath<(String, String)>,
) -> Response {
    let Some(r) = p.row(&table, &row) else {
        return not_found();
    };
    let Some(path) = local_file(&r.uri) else {
        return not_found();
    };
    match tokio::task::spawn_blocking(move || thumbnail(&r, &path)).await {
        Ok(Ok(bytes)) => {
            let mut resp = Response::new(Body::from(bytes));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=3600"),
            );
            resp
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "no thumbnail");
            error(StatusCode::NOT_FOUND, format!("no thumbnail: {e}"))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn media(
    State(p): State<Shared>,
    UrlPath((table, row)): UrlPath<(String, String)>,
    req: Request,
) -> Response {
    let Some(path) = p.row(&table, &row).and_then(|r| local_file(&r.uri)) else {
        return not_found();
    };
    if !path.is_file() {
        return not_found();
    }
    // ServeFile answers Range requests (a video starts at its segment)
    // and sets the content type from the extension.
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests;
