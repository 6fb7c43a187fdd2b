//! The router against the demo model over a real table (rows made by
//! `mmembed_rows`, as `mmembed batch` makes them).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use mmembed::spec::BackendSpec;
use mmembed_media::image_crate::{self, GenericImageView};
use mmembed_rows::{RowInput, embed_rows};
use mmembed_shapes::{Colour, Scene, Shape};
use serde_json::Value;
use tower::ServiceExt as _;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    page: Arc<SearchPage>,
    red_star: PathBuf,
}

async fn demo() -> Arc<dyn Embedder> {
    "local:demo"
        .parse::<BackendSpec>()
        .unwrap()
        .build()
        .await
        .unwrap()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let embedder = demo().await;
    let mut inputs = vec![];
    for (i, (shape, colour)) in [
        (Shape::Star, Colour::Red),
        (Shape::Square, Colour::Blue),
        (Shape::Circle, Colour::Green),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir
            .path()
            .join(format!("{}-{}.png", colour.name(), shape.name()));
        Scene::sample(shape, colour, i as u64).save(&p).unwrap();
        inputs.push(RowInput::file(
            p.display().to_string(),
            &p,
            None,
            None,
            None,
        ));
    }
    // A row whose file is in a bucket: listed, never served.
    let mut rows: Vec<_> = embed_rows(embedder.as_ref(), None, inputs)
        .await
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let mut remote = rows[1].clone();
    remote.uri = "gs://bucket/blue-square.png".into();
    rows.push(remote);
    let table = dir.path().join("media.jsonl");
    let text: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    std::fs::write(&table, text.join("\n")).unwrap();
    let page = Arc::new(SearchPage::over_tables(vec![Table::new(&table).unwrap()]).unwrap());
    assert_eq!(page.model(), "demo");
    let red_star = dir.path().join("red-star.png");
    Fixture {
        _dir: dir,
        page,
        red_star,
    }
}

async fn get(page: &Arc<SearchPage>, uri: &str) -> (StatusCode, Vec<u8>) {
    let r = page
        .clone()
        .router()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = r.status();
    (
        status,
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
}

#[tokio::test]
async fn text_and_image_queries_answer_with_the_matching_file_first() {
    let f = fixture().await;
    let (s, body) = get(&f.page, "/api/search?q=a+red+star").await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "before the model is set"
    );
    assert!(String::from_utf8_lossy(&body).contains("loading"));

    let embedder = demo().await;
    f.page.set_embedder(embedder).unwrap();
    let (s, body) = get(&f.page, "/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("mmembed search"));
    for (q, want) in [
        ("a+red+star", "red-star.png"),
        ("a+blue+square", "blue-square.png"),
    ] {
        let (s, body) = get(&f.page, &format!("/api/search?q={q}&k=3")).await;
        assert_eq!(s, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["hits"][0]["name"], want, "{v}");
        assert_eq!(v["hits"].as_array().unwrap().len(), 3);
    }
    // By image: the file itself comes first.
    let bytes = std::fs::read(&f.red_star).unwrap();
    let r = f
        .page
        .clone()
        .router()
        .oneshot(
            Request::post("/api/search/image")
                .body(Body::from(bytes))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = serde_json::from_slice(
        &axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["hits"][0]["name"], "red-star.png");
    assert!(v["hits"][0]["score"].as_f64().unwrap() > 0.999);
    // The bucket row has no thumbnail or media link.
    let (_, body) = get(&f.page, "/api/search?q=a+blue+square&k=10").await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    let remote = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["uri"] == "gs://bucket/blue-square.png")
        .unwrap();
    assert!(remote["thumb"].is_null() && remote["media"].is_null());

    // Bad requests say what is wrong.
    for (uri, want) in [
        ("/api/search", "give a query"),
        ("/api/search?q=x&modality=audio", "modality"),
    ] {
        let (s, body) = get(&f.page, uri).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains(want), "{uri}");
    }
    let r = f
        .page
        .clone()
        .router()
        .oneshot(
            Request::post("/api/search/image")
                .body(Body::from("not an image"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn only_rows_of_the_tables_are_served() {
    let f = fixture().await;
    let (s, body) = get(&f.page, "/media/0/0").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, std::fs::read(&f.red_star).unwrap());
    // A range, as a video element asks.
    let r = f
        .page
        .clone()
        .router()
        .oneshot(
            Request::get("/media/0/0")
                .header("range", "bytes=0-9")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let (s, body) = get(&f.page, "/thumb/0/0").await;
    assert_eq!(s, StatusCode::OK);
    let thumb = image_crate::load_from_memory(&body).unwrap();
    assert!(thumb.dimensions().0 <= THUMB && thumb.dimensions().1 <= THUMB);
    for uri in [
        "/media/0/4",
        "/media/0/3",
        "/media/1/0",
        "/media/0/-1",
        "/media/x/0",
        "/media/0/..%2F..%2Fetc%2Fpasswd",
        "/media/../../etc/passwd",
        "/media/0/0/../../etc/passwd",
        "/thumb/0/%2e%2e",
        "/thumb/0/3",
        "/etc/passwd",
        "/media/%2Fetc%2Fpasswd/0",
    ] {
        assert_eq!(get(&f.page, uri).await.0, StatusCode::NOT_FOUND, "{uri}");
    }
}

#[tokio::test]
async fn a_page_over_an_index_answers_like_one_over_its_tables() {
    let f = fixture().await;
    let table = f.page.tables[0].clone();
    let dir = f._dir.path().join("media.index");
    mmembed_search::index::build(std::slice::from_ref(&table), &dir, &Default::default()).unwrap();
    let page = Arc::new(SearchPage::over_index(&dir).unwrap());
    let embedder = demo().await;
    page.set_embedder(embedder.clone()).unwrap();
    f.page.set_embedder(embedder).unwrap();
    let (_, body) = get(&page, "/api/info").await;
    let info: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["index"], true);
    let (_, by_index) = get(&page, "/api/search?q=a+green+circle&k=4").await;
    let (_, by_scan) = get(&f.page, "/api/search?q=a+green+circle&k=4").await;
    let hits = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap()["hits"].clone();
    assert_eq!(hits(&by_index), hits(&by_scan));
    assert_eq!(hits(&by_index)[0]["name"], "green-circle.png");
    assert_eq!(get(&page, "/media/0/0").await.0, StatusCode::OK);
}
