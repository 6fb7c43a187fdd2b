use std::path::Path;

use mmembed_rows::arrow::{EmbeddingLayout, to_batch};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::Value;

use super::*;

/// Seeded rows: every 7th a failure, every 5th a video segment, a
/// `label` column cycling through three values.
fn make_rows(n: usize, dim: usize, seed: u64, prefix: &str) -> Vec<Row> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let failed = i % 7 == 3;
            let video = i % 5 == 1;
            let v: Vec<f32> = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
            Row {
                uri: format!(
                    "{prefix}/{}/{i:06}.{}",
                    i % 3,
                    if video { "mp4" } else { "png" }
                ),
                content_type: if video { "video/mp4" } else { "image/png" }.into(),
                size_bytes: Some(10),
                generation: None,
                etag: None,
                updated: None,
                embedding: (!failed).then_some(v),
                status: if failed {
                    "cannot decode".into()
                } else {
                    String::new()
                },
                video_start_sec: video.then_some(0.0),
                video_end_sec: video.then_some(4.0),
                model: "m".into(),
                space: "s".into(),
                dimension: Some(dim as i32),
                carried: [(
                    "label".to_string(),
                    Value::String(["cat", "dog", "owl"][i % 3].into()),
                )]
                .into_iter()
                .collect(),
            }
        })
        .collect()
}

fn write_parquet(path: &Path, rows: &[Row], group: usize, layout: EmbeddingLayout) {
    let b = to_batch(rows, &["label".into()], layout).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(group))
        // Small pages, so that a unit starting inside a row group skips
        // pages through the page index.
        .set_data_page_row_count_limit(100)
        .build();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), b.schema(), Some(props)).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

fn write_jsonl(path: &Path, rows: &[Row]) {
    let mut text = String::new();
    for (i, r) in rows.iter().enumerate() {
        text.push_str(&serde_json::to_string(r).unwrap());
        // Blank lines are not rows.
        text.push_str(if i % 100 == 0 { "\n\n" } else { "\n" });
    }
    std::fs::write(path, text).unwrap();
}

/// The independent reference: every row in memory, cosine in f64, sorted.
fn reference(
    tables: &[Vec<Row>],
    q: &[f32],
    keep: impl Fn(&Row) -> bool,
) -> Vec<(usize, u64, f64)> {
    let mut all = vec![];
    for (t, rows) in tables.iter().enumerate() {
        for (i, r) in rows.iter().enumerate() {
            let Some(v) = r.embedding.as_ref().filter(|_| r.ok() && keep(r)) else {
                continue;
            };
            let dot: f64 = q.iter().zip(v).map(|(a, b)| *a as f64 * *b as f64).sum();
            let nq: f64 = q.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            let nv: f64 = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
            all.push((t, i as u64, dot / nq / nv));
        }
    }
    all.sort_by(|a, b| b.2.total_cmp(&a.2));
    all
}

fn check(found: &Found, want: &[(usize, u64, f64)], tables: &[Vec<Row>], k: usize) {
    assert_eq!(found.hits.len(), k.min(want.len()));
    for (h, w) in found.hits.iter().zip(want) {
        assert_eq!(
            (h.table, h.index),
            (w.0, w.1),
            "score {} vs {}",
            h.score,
            w.2
        );
        assert!(
            (h.score as f64 - w.2).abs() < 1e-5,
            "{} vs {}",
            h.score,
            w.2
        );
        assert_eq!(h.row, tables[h.table][h.index as usize]);
    }
}

fn opts(k: usize, threads: usize, unit_rows: usize) -> Options {
    Options {
        k,
        threads,
        unit_rows,
        ..Options::default()
    }
}

#[test]
fn parquet_and_jsonl_tables_rank_like_the_in_memory_reference() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_rows(3000, 40, 1, "gs://b/a");
    let b = make_rows(5000, 40, 2, "/data/b");
    let c = make_rows(700, 40, 3, "/data/c");
    write_parquet(
        &dir.path().join("a.parquet"),
        &a,
        1000,
        EmbeddingLayout::List,
    );
    write_jsonl(&dir.path().join("b.jsonl"), &b);
    write_parquet(
        &dir.path().join("c.parquet"),
        &c,
        10_000,
        EmbeddingLayout::FixedSize(40),
    );
    let tables: Vec<Table> = ["a.parquet", "b.jsonl", "c.parquet"]
        .iter()
        .map(|n| Table::new(dir.path().join(n)).unwrap())
        .collect();
    let all = vec![a, b, c];
    let q: Vec<f32> = make_rows(1, 40, 99, "q")[0].embedding.clone().unwrap();
    let want = reference(&all, &q, |_| true);
    // One thread whole row groups; three threads with row groups cut into
    // units of 256 rows (starting mid-page and mid-group).
    // And as many threads as anyone may ask for (started: at most 256).
    for o in [
        opts(25, 1, 1 << 16),
        opts(25, 3, 256),
        opts(25, 100_000, 256),
    ] {
        let found = search(&tables, &q, &o).unwrap();
        check(&found, &want, &all, 25);
        assert_eq!(found.scanned, want.len() as u64);
        assert_eq!(found.matched, found.scanned);
    }
    // More hits than rows: all of them; also for a `k` no memory could
    // hold (it once reserved room for `k` hits up front and aborted).
    for k in [10_000, 1 << 40, usize::MAX] {
        let found = search(&tables[2..], &q, &opts(k, 2, 100)).unwrap();
        check(&found, &reference(&all[2..], &q, |_| true), &all[2..], k);
    }
}

#[test]
fn filters_apply_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_rows(2000, 16, 5, "/m/a");
    let b = make_rows(900, 16, 6, "/m/b");
    write_parquet(
        &dir.path().join("a.parquet"),
        &a,
        500,
        EmbeddingLayout::List,
    );
    write_jsonl(&dir.path().join("b.jsonl"), &b);
    let tables = [
        Table::new(dir.path().join("a.parquet")).unwrap(),
        Table::new(dir.path().join("b.jsonl")).unwrap(),
    ];
    let all = vec![a, b];
    let q = vec![0.3f32; 16];
    type Keep = Box<dyn Fn(&Row) -> bool>;
    let cases: Vec<(Filter, Keep)> = vec![
        (
            Filter {
                modality: Some(Modality::Video),
                ..Filter::default()
            },
            Box::new(|r: &Row| r.content_type.starts_with("video/")),
        ),
        (
            Filter {
                modality: Some(Modality::Image),
                ..Filter::default()
            },
            Box::new(|r: &Row| r.content_type.starts_with("image/")),
        ),
        (
            Filter {
                uri_prefix: Some("/m/b/2/".into()),
                ..Filter::default()
            },
            Box::new(|r: &Row| r.uri.starts_with("/m/b/2/")),
        ),
        (
            Filter {
                equals: vec![("label".into(), "owl".into())],
                modality: Some(Modality::Image),
                ..Filter::default()
            },
            Box::new(|r: &Row| r.carried["label"] == "owl" && r.content_type.starts_with("image/")),
        ),
        (
            Filter {
                equals: vec![("no_such_column".into(), "x".into())],
                ..Filter::default()
            },
            Box::new(|_: &Row| false),
        ),
    ];
    for (filter, keep) in cases {
        let want = reference(&all, &q, &keep);
        let o = Options {
            filter: filter.clone(),
            ..opts(12, 2, 300)
        };
        let found = search(&tables, &q, &o).unwrap();
        check(&found, &want, &all, 12);
        assert_eq!(found.matched, want.len() as u64, "{filter:?}");
        assert!(found.hits.iter().all(|h| keep(&h.row)), "{filter:?}");
    }
}

#[test]
fn ties_rank_in_table_and_row_order_whatever_the_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = make_rows(600, 4, 7, "/t");
    for r in a.iter_mut().filter(|r| r.ok()) {
        r.embedding = Some(vec![1.0, 0.0, 0.0, 0.0]);
    }
    write_parquet(
        &dir.path().join("a.parquet"),
        &a,
        100,
        EmbeddingLayout::List,
    );
    let tables = [Table::new(dir.path().join("a.parquet")).unwrap()];
    let first_ok: Vec<u64> = (0..600u64)
        .filter(|i| a[*i as usize].ok())
        .take(5)
        .collect();
    for threads in [1, 2, 5] {
        let found = search(&tables, &[2.0, 0.0, 0.0, 0.0], &opts(5, threads, 64)).unwrap();
        let got: Vec<u64> = found.hits.iter().map(|h| h.index).collect();
        assert_eq!(got, first_ok);
        assert!(found.hits.iter().all(|h| (h.score - 1.0).abs() < 1e-6));
    }
}

#[test]
fn spaces_lengths_and_damage_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_rows(50, 8, 8, "/a");
    let mut b = make_rows(50, 8, 9, "/b");
    write_parquet(
        &dir.path().join("a.parquet"),
        &a,
        1000,
        EmbeddingLayout::List,
    );
    let ta = Table::new(dir.path().join("a.parquet")).unwrap();
    let q = vec![1.0f32; 8];

    // Another space in a later row of another table.
    b[30].space = "other".into();
    write_jsonl(&dir.path().join("b.jsonl"), &b);
    let tb = Table::new(dir.path().join("b.jsonl")).unwrap();
    let err = search(&[ta.clone(), tb], &q, &opts(3, 2, 10)).unwrap_err();
    assert!(
        matches!(&err, SearchError::MixedSpaces { other, .. } if other == "other"),
        "{err}"
    );
    assert!(err.to_string().contains("search them separately"), "{err}");

    // Tables of different spaces from their first rows.
    for r in &mut b {
        r.space = "other".into();
    }
    write_jsonl(&dir.path().join("c.jsonl"), &b);
    let tc = Table::new(dir.path().join("c.jsonl")).unwrap();
    assert!(matches!(
        summarize(&[ta.clone(), tc]),
        Err(SearchError::MixedSpaces { .. })
    ));

    // A query of another length.
    let err = search(std::slice::from_ref(&ta), &[1.0; 9], &opts(3, 2, 10)).unwrap_err();
    assert!(
        err.to_string()
            .contains("a vector of 8 values, the query 9"),
        "{err}"
    );
    assert!(matches!(
        search(std::slice::from_ref(&ta), &[0.0; 8], &Options::default()),
        Err(SearchError::Query)
    ));
    assert!(matches!(
        search(std::slice::from_ref(&ta), &[], &Options::default()),
        Err(SearchError::Query)
    ));

    // Not Parquet; a broken line (with its number); no such file; no format.
    std::fs::write(dir.path().join("bad.parquet"), b"PAR1 not really").unwrap();
    let err = search(
        &[Table::new(dir.path().join("bad.parquet")).unwrap()],
        &q,
        &Options {
            space: Some("s".into()),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, SearchError::Parquet { .. }), "{err}");
    let mut text = std::fs::read_to_string(dir.path().join("c.jsonl")).unwrap();
    text.push_str("{\"uri\": oops\n");
    std::fs::write(dir.path().join("d.jsonl"), &text).unwrap();
    let err = search(
        &[Table::new(dir.path().join("d.jsonl")).unwrap()],
        &q,
        &opts(3, 2, 10),
    )
    .unwrap_err();
    let lines = text.lines().count();
    assert!(
        err.to_string()
            .contains(&format!("d.jsonl:{lines}: not an output row")),
        "{err}"
    );
    let err = search(
        &[Table::new(dir.path().join("nope.parquet")).unwrap()],
        &q,
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, SearchError::Io { .. }), "{err}");
    assert!(matches!(Table::new("x.csv"), Err(SearchError::Format(_))));

    // A table without embedded rows: nothing to find, no error.
    let failed: Vec<Row> = make_rows(20, 8, 1, "/f")
        .into_iter()
        .filter(|r| !r.ok())
        .collect();
    write_jsonl(&dir.path().join("e.jsonl"), &failed);
    let te = Table::new(dir.path().join("e.jsonl")).unwrap();
    assert_eq!(summarize(std::slice::from_ref(&te)).unwrap(), None);
    let found = search(&[te], &q, &Options::default()).unwrap();
    assert!(found.hits.is_empty() && found.scanned == 0);
}

#[test]
fn rows_are_read_back_by_index() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_rows(1200, 8, 11, "/r");
    write_parquet(
        &dir.path().join("a.parquet"),
        &a,
        500,
        EmbeddingLayout::List,
    );
    write_jsonl(&dir.path().join("a.jsonl"), &a);
    for name in ["a.parquet", "a.jsonl"] {
        let t = Table::new(dir.path().join(name)).unwrap();
        let want = [1199u64, 3, 500, 3, 0];
        let got = rows(&t, &want).unwrap();
        for (r, i) in got.iter().zip(want) {
            assert_eq!(*r, a[i as usize], "{name} row {i}");
        }
        assert!(
            matches!(
                rows(&t, &[1200]),
                Err(SearchError::NoRow { index: 1200, .. })
            ),
            "{name}"
        );
        assert_eq!(
            summarize(&[t]).unwrap(),
            Some(Summary {
                space: "s".into(),
                model: "m".into(),
                dimension: 8
            })
        );
    }
}

#[test]
fn cosine_matches_a_plain_loop_at_every_length() {
    let mut rng = fastrand::Rng::with_seed(3);
    for n in [1, 7, 8, 9, 64, 515] {
        let q: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
        let nq = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        let q: Vec<f32> = q.iter().map(|x| x / nq).collect();
        let v: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
        let dot: f64 = q.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum();
        let nv: f64 = v.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            (cosine_to_unit(&q, &v) as f64 - dot / nv).abs() < 1e-5,
            "{n}"
        );
    }
    assert_eq!(cosine_to_unit(&[1.0], &[0.0]), 0.0);
}

mod index {
    use super::*;
    use crate::index::{BuildOptions, Index, IndexSearch, Outcome, Quantization, build};

    fn small() -> BuildOptions {
        BuildOptions {
            threads: 2,
            ..BuildOptions::default()
        }
    }

    /// Share of the exact top `k` (by the in-memory reference) that the
    /// index found.
    fn recall(found: &Found, want: &[(usize, u64, f64)], k: usize) -> f64 {
        let got: Vec<(usize, u64)> = found.hits.iter().map(|h| (h.table, h.index)).collect();
        want[..k]
            .iter()
            .filter(|w| got.contains(&(w.0, w.1)))
            .count() as f64
            / k as f64
    }

    #[test]
    fn index_finds_what_brute_force_finds_with_exact_scores() {
        let dir = tempfile::tempdir().unwrap();
        let a = make_rows(3000, 24, 21, "/i/a");
        let b = make_rows(1500, 24, 22, "/i/b");
        write_parquet(
            &dir.path().join("a.parquet"),
            &a,
            1000,
            EmbeddingLayout::List,
        );
        write_jsonl(&dir.path().join("b.jsonl"), &b);
        let tables = [
            Table::new(dir.path().join("a.parquet")).unwrap(),
            Table::new(dir.path().join("b.jsonl")).unwrap(),
        ];
        let all = vec![a, b];
        let idx = dir.path().join("media.index");
        for q8 in [Quantization::F16, Quantization::I8] {
            let _ = std::fs::remove_dir_all(&idx);
            let r = build(
                &tables,
                &idx,
                &BuildOptions {
                    quantization: q8,
                    ..small()
                },
            )
            .unwrap();
            assert_eq!(r.outcome, Outcome::Built { reason: None });
            let embedded = all.iter().flatten().filter(|r| r.ok()).count() as u64;
            assert_eq!((r.added, r.vectors), (embedded, embedded));
            let index = Index::open(&idx).unwrap();
            index.check_fresh().unwrap();
            let mut total = 0.0;
            for s in 0..10 {
                let q = make_rows(1, 24, 100 + s, "q")[0].embedding.clone().unwrap();
                let want = reference(&all, &q, |_| true);
                let found = index
                    .search(
                        &q,
                        &IndexSearch {
                            k: 10,
                            ..IndexSearch::default()
                        },
                    )
                    .unwrap();
                assert_eq!(found.hits.len(), 10);
                total += recall(&found, &want, 10);
                // Scores are the exact cosines of the rows found, best first.
                for h in &found.hits {
                    let w = want
                        .iter()
                        .find(|w| (w.0, w.1) == (h.table, h.index))
                        .unwrap();
                    assert!((h.score as f64 - w.2).abs() < 1e-5);
                    assert_eq!(h.row, all[h.table][h.index as usize]);
                }
                assert!(found.hits.windows(2).all(|p| p[0].score >= p[1].score));
            }
            assert!(total / 10.0 >= 0.95, "{q8:?}: recall@10 {}", total / 10.0);
        }
        // A filter: candidates are fetched until k pass.
        let index = Index::open(&idx).unwrap();
        let q = vec![0.2f32; 24];
        let keep = |r: &Row| r.content_type.starts_with("video/") && r.uri.starts_with("/i/b/");
        let filter = Filter {
            modality: Some(Modality::Video),
            uri_prefix: Some("/i/b/".into()),
            ..Filter::default()
        };
        let found = index
            .search(
                &q,
                &IndexSearch {
                    k: 5,
                    filter,
                    ..IndexSearch::default()
                },
            )
            .unwrap();
        assert_eq!(found.hits.len(), 5);
        assert!(found.hits.iter().all(|h| keep(&h.row)));
        let want = reference(&all, &q, keep);
        assert!(recall(&found, &want, 5) >= 0.8);
        // A query of another length.
        assert!(matches!(
            index.search(&[1.0; 3], &IndexSearch::default()),
            Err(SearchError::Dimension { .. })
        ));
    }

    #[test]
    fn index_grows_with_its_tables_and_is_rebuilt_when_one_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = make_rows(800, 8, 31, "/g/a");
        let b = make_rows(300, 8, 32, "/g/b");
        let pa = dir.path().join("a.parquet");
        let pb = dir.path().join("b.parquet");
        write_parquet(&pa, &a, 1000, EmbeddingLayout::List);
        write_parquet(&pb, &b, 1000, EmbeddingLayout::List);
        let (ta, tb) = (Table::new(&pa).unwrap(), Table::new(&pb).unwrap());
        let idx = dir.path().join("idx");
        let ok = |rows: &[Row]| rows.iter().filter(|r| r.ok()).count() as u64;

        build(std::slice::from_ref(&ta), &idx, &small()).unwrap();
        let r = build(&[ta.clone(), tb.clone()], &idx, &small()).unwrap();
        assert_eq!(r.outcome, Outcome::Extended { tables: 1 });
        assert_eq!((r.added, r.vectors), (ok(&b), ok(&a) + ok(&b)));
        let index = Index::open(&idx).unwrap();
        // A row of the added table is found by its own vector.
        let target = b.iter().position(|r| r.ok()).unwrap();
        let q = b[target].embedding.clone().unwrap();
        let found = index
            .search(
                &q,
                &IndexSearch {
                    k: 1,
                    ..IndexSearch::default()
                },
            )
            .unwrap();
        assert_eq!(
            (found.hits[0].table, found.hits[0].index),
            (1, target as u64)
        );
        assert!((found.hits[0].score - 1.0).abs() < 1e-5);

        assert_eq!(
            build(&[ta.clone(), tb.clone()], &idx, &small())
                .unwrap()
                .outcome,
            Outcome::Unchanged
        );

        // Listing fewer tables, other options, or a changed table: rebuilt.
        let r = build(std::slice::from_ref(&tb), &idx, &small()).unwrap();
        assert!(
            matches!(&r.outcome, Outcome::Built { reason: Some(w) } if w.contains("no longer listed")),
            "{r:?}"
        );
        assert_eq!(r.vectors, ok(&b));
        let r = build(
            std::slice::from_ref(&tb),
            &idx,
            &BuildOptions {
                connectivity: 8,
                ..small()
            },
        )
        .unwrap();
        assert!(
            matches!(&r.outcome, Outcome::Built { reason: Some(w) } if w.contains("options")),
            "{r:?}"
        );
        let fewer = make_rows(100, 8, 33, "/g/b");
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_parquet(&pb, &fewer, 1000, EmbeddingLayout::List);
        // Until it is rebuilt, the index refuses to answer for the changed table.
        let err = Index::open(&idx).unwrap().check_fresh().unwrap_err();
        assert!(matches!(err, SearchError::Stale { .. }), "{err}");
        assert!(err.to_string().contains("mmembed index build"), "{err}");
        let opts = BuildOptions {
            connectivity: 8,
            ..small()
        };
        let r = build(std::slice::from_ref(&tb), &idx, &opts).unwrap();
        assert!(
            matches!(&r.outcome, Outcome::Built { reason: Some(w) } if w.contains("changed")),
            "{r:?}"
        );
        assert_eq!(r.vectors, ok(&fewer));
        Index::open(&idx).unwrap().check_fresh().unwrap();

        // Tables of another space are refused.
        let mut other = make_rows(50, 8, 34, "/g/c");
        for r in &mut other {
            r.space = "elsewhere".into();
        }
        let pc = dir.path().join("c.jsonl");
        write_jsonl(&pc, &other);
        let err = build(&[tb.clone(), Table::new(&pc).unwrap()], &idx, &opts).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
        // A folder that is not an index is not overwritten.
        let err = build(std::slice::from_ref(&tb), dir.path(), &opts).unwrap_err();
        assert!(err.to_string().contains("not overwriting"), "{err}");
        // A graph that does not match its manifest is reported.
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(idx.join("manifest.json")).unwrap())
                .unwrap();
        m["vectors"] = 1.into();
        std::fs::write(idx.join("manifest.json"), m.to_string()).unwrap();
        let err = Index::open(&idx).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        // Searching where there is no index says how to make one.
        for (at, what) in [
            (dir.path(), "no index here"),
            (&dir.path().join("nope"), "no such folder"),
        ] {
            let err = Index::open(at).unwrap_err().to_string();
            assert!(
                err.contains(what) && err.contains("mmembed index build"),
                "{err}"
            );
        }
    }
}
