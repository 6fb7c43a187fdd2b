//! `mmembed batch` over buckets, against real protocol servers on loopback:
//! moto's S3 server and gcp-storage-emulator's GCS JSON API, started by
//! `scripts/test.sh` (`MMEMBED_TEST_S3`, `MMEMBED_TEST_GCS`, a bucket
//! `mmembed-test` in each), behind a fault-injecting proxy; and plain HTTP.
//!
//! Without the variables the bucket tests say so and pass, except under
//! `CI=true`, where a missing emulator is an error.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use mmembed_shapes::{Colour, Scene, Shape};
use mmembed_store::testkit::{FaultProxy, Faults, FileServer};
use mmembed_store::{PutMode, StoreOptions, Stores};
use serde_json::Value;

const SECRET: &str = "s3cr3t-key-never-printed";

fn png(shape: Shape, colour: Colour, seed: u64) -> Vec<u8> {
    encoded(shape, colour, seed, image::ImageFormat::Png)
}

fn encoded(shape: Shape, colour: Colour, seed: u64, format: image::ImageFormat) -> Vec<u8> {
    let img = Scene::sample(shape, colour, seed);
    let mut out = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

/// The objects of every test: four images, one more named without an
/// extension (an upload named by a hash: its bytes tell), a corrupt one, a
/// text file, a hidden one.
fn objects() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("red-star.png", png(Shape::Star, Colour::Red, 1)),
        ("uploads/3f2a9c", png(Shape::Cross, Colour::Black, 6)),
        ("blue-square.png", png(Shape::Square, Colour::Blue, 2)),
        ("sub/green-circle.png", png(Shape::Circle, Colour::Green, 3)),
        (
            "sub/yellow-triangle.png",
            png(Shape::Triangle, Colour::Yellow, 4),
        ),
        ("garbage.png", b"not a png".to_vec()),
        ("notes.txt", b"hello".to_vec()),
        (".hidden/x.png", png(Shape::Ring, Colour::Orange, 5)),
    ]
}

enum Kind {
    S3,
    Gcs,
    /// Azurite's Blob service, through `object_store`'s emulator mode.
    Azure,
}

struct Bucket {
    kind: Kind,
    endpoint: String,
    stores: Stores,
}

fn bucket(kind: Kind) -> Option<Bucket> {
    let var = match kind {
        Kind::S3 => "MMEMBED_TEST_S3",
        Kind::Gcs => "MMEMBED_TEST_GCS",
        Kind::Azure => "MMEMBED_TEST_AZURE",
    };
    let endpoint = match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set: scripts/test.sh starts the emulators and sets it")
        }
        _ => {
            eprintln!("{var} not set; skipping (scripts/test.sh starts the emulators)");
            return None;
        }
    };
    let gcs = matches!(kind, Kind::Gcs).then(|| endpoint.clone());
    if matches!(kind, Kind::Azure) {
        // SAFETY: as below.
        unsafe {
            std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
            std::env::set_var("AZURITE_BLOB_STORAGE_URL", &endpoint);
        }
    }
    if matches!(kind, Kind::S3) {
        // SAFETY: every test sets the same values before building a store.
        unsafe {
            std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
            std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
            std::env::set_var("AWS_REGION", "us-east-1");
        }
    }
    Some(Bucket {
        kind,
        endpoint,
        stores: Stores::new(StoreOptions {
            gcs_endpoint: gcs,
            ..StoreOptions::default()
        }),
    })
}

impl Bucket {
    fn base(&self, test: &str) -> String {
        let scheme = match self.kind {
            Kind::S3 => "s3",
            Kind::Gcs => "gs",
            Kind::Azure => "az",
        };
        format!("{scheme}://mmembed-test/{test}-{:x}", fastrand_u64())
    }

    /// The binary, talking to the store through `via` (a proxy URL).
    fn mmembed(&self, cache: &Path, via: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mmembed"));
        for (k, _) in std::env::vars() {
            if ["MMEMBED_", "AWS_", "AZURE_", "AZURITE_"]
                .iter()
                .any(|p| k.starts_with(p))
                || k == "STORAGE_EMULATOR_HOST"
            {
                c.env_remove(k);
            }
        }
        c.env("MMEMBED_CACHE_DIR", cache)
            .env("MMEMBED_MODEL", "demo")
            .env("MMEMBED_DEVICE", "cpu")
            .env("HF_HUB_OFFLINE", "1")
            .env("MMEMBED_STORE_BACKOFF_MS", "5")
            .env("MMEMBED_STORE_TIMEOUT_SECS", "1");
        match self.kind {
            Kind::S3 => {
                c.env("AWS_ENDPOINT_URL", via)
                    .env("AWS_ACCESS_KEY_ID", "testing")
                    .env("AWS_SECRET_ACCESS_KEY", SECRET)
                    .env("AWS_REGION", "us-east-1");
            }
            Kind::Gcs => {
                c.env("STORAGE_EMULATOR_HOST", via);
            }
            Kind::Azure => {
                c.env("AZURE_STORAGE_USE_EMULATOR", "true")
                    .env("AZURITE_BLOB_STORAGE_URL", via);
            }
        }
        c
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn jsonl(bytes: &[u8]) -> Vec<Value> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The same objects embedded from local disk: the reference vectors.
fn local_reference(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let media = dir.join("ref-media");
    for (k, b) in objects() {
        let p = media.join(k);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b).unwrap();
    }
    let out = dir.join("ref.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_mmembed"))
        .env("MMEMBED_CACHE_DIR", dir.join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["batch", "--model", "demo", "--device", "cpu"])
        .arg(&media)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let prefix = format!("{}/", media.display());
    vectors(&jsonl(&std::fs::read(out).unwrap()), &prefix)
}

/// `(name under prefix, embedding)` of the ok rows, sorted.
fn vectors(rows: &[Value], prefix: &str) -> Vec<(String, Vec<f64>)> {
    let mut v: Vec<_> = rows
        .iter()
        .filter(|r| r["status"] == "")
        .map(|r| {
            let uri = r["uri"].as_str().unwrap();
            let name = uri.strip_prefix(prefix).unwrap_or(uri).to_string();
            let e = r["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (name, e)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The one vector `mmembed embed` printed, named `name`.
fn embedded(name: &str, o: &std::process::Output) -> (String, Vec<f64>) {
    assert!(o.status.success(), "{}", stderr(o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = v["embedding"].as_array().unwrap();
    (
        name.to_string(),
        e.iter().map(|x| x.as_f64().unwrap()).collect(),
    )
}

fn assert_same_vectors(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)]) {
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    for ((n, x), (_, y)) in a.iter().zip(b) {
        let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!(dot > 0.99999, "{n}: cosine {dot}");
    }
}

fn whole_job(kind: Kind) {
    let Some(b) = bucket(kind) else { return };
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let reference = local_reference(d.path());
    let rt = rt();
    let base = b.base("job");
    let input = format!("{base}/in/");
    rt.block_on(async {
        for (k, bytes) in objects() {
            // As uploaders set it: by the extension, else the default.
            let content_type = match k.rsplit_once('.').map(|x| x.1) {
                Some("png") => "image/png",
                Some("txt") => "text/plain",
                _ => "application/octet-stream",
            };
            b.stores
                .put(
                    &format!("{input}{k}"),
                    Bytes::from(bytes),
                    content_type,
                    PutMode::Overwrite,
                )
                .await
                .unwrap();
        }
    });
    // Storage faults on the way: a 503 burst in every 7 requests, every
    // 3rd body cut off half-way, every 13th request held past the client's
    // 1 s timeout (MMEMBED_STORE_TIMEOUT_SECS below), 5 ms on every request.
    let proxy = rt
        .block_on(FaultProxy::start(
            &b.endpoint,
            Faults {
                delay: Duration::from_millis(5),
                unavailable: Some((7, 2)),
                cut_body_every: Some(3),
                slow: Some((13, Duration::from_millis(1500))),
            },
        ))
        .unwrap();
    // The output sits inside the input prefix: it must never be an input.
    let out = format!("{input}out.jsonl");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = b.mmembed(&cache, &proxy.url);
        c.args(["batch", &input, "-o", &out]).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let _guard = rt.enter();
        c.output().unwrap()
    };
    let o = run(&[], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains(SECRET));
    let read_out = || {
        let (bytes, _) = rt.block_on(b.stores.read(&out, 1 << 30)).unwrap();
        jsonl(&bytes)
    };
    let rows = read_out();
    assert!(!format!("{rows:?}").contains(SECRET));
    let uris: Vec<&str> = rows.iter().map(|r| r["uri"].as_str().unwrap()).collect();
    assert_eq!(uris.len(), 7, "{uris:?}");
    assert!(
        uris.iter()
            .all(|u| u.starts_with(&input) && !u.contains("out.jsonl") && !u.contains(".hidden"))
    );
    for r in &rows {
        assert!(r["etag"].is_string() || r["generation"].is_string(), "{r}");
        assert!(r["updated"].is_string(), "{r}");
        assert!(r["size_bytes"].as_i64().unwrap() > 0);
    }
    assert_same_vectors(&reference, &vectors(&rows, &input));
    assert!(proxy.stats.unavailable.load(Ordering::Relaxed) > 0);
    assert!(proxy.stats.cut.load(Ordering::Relaxed) > 0);
    assert!(proxy.stats.slowed.load(Ordering::Relaxed) > 0);
    // Parts and lock are gone.
    let left = rt
        .block_on(b.stores.list(&format!("{input}out.jsonl.parts/")))
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !rt.block_on(b.stores.exists(&format!("{out}.lock")))
            .unwrap()
    );

    // `mmembed embed` reads bucket objects too.
    let o = b
        .mmembed(&cache, &proxy.url)
        .args(["embed", &format!("{input}blue-square.png")])
        .output()
        .unwrap();
    assert_same_vectors(&reference[..1], &[embedded("blue-square.png", &o)]);
    // An object named without an extension, stored as octet-stream: its
    // first bytes say it is a PNG.
    let o = b
        .mmembed(&cache, &proxy.url)
        .args(["embed", &format!("{input}uploads/3f2a9c")])
        .output()
        .unwrap();
    let untyped = reference.iter().find(|x| x.0 == "uploads/3f2a9c").unwrap();
    assert_same_vectors(
        std::slice::from_ref(untyped),
        &[embedded("uploads/3f2a9c", &o)],
    );

    // A manifest in the bucket: its relative names are objects beside it,
    // its other columns carried.
    let manifest = format!("{base}/list.csv");
    rt.block_on(b.stores.put(
        &manifest,
        Bytes::from_static(b"uri,label\nin/blue-square.png,b\nin/sub/green-circle.png,g\n"),
        "text/csv",
        PutMode::Overwrite,
    ))
    .unwrap();
    let listed_out = format!("{base}/listed.jsonl");
    let o = b
        .mmembed(&cache, &proxy.url)
        .args(["batch", &manifest, "-o", &listed_out])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (bytes, _) = rt.block_on(b.stores.read(&listed_out, 1 << 30)).unwrap();
    let rows = jsonl(&bytes);
    let labels: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["uri"].as_str().unwrap(), r["label"].as_str().unwrap()))
        .collect();
    assert_eq!(
        labels,
        [
            (format!("{input}blue-square.png").as_str(), "b"),
            (format!("{input}sub/green-circle.png").as_str(), "g")
        ]
    );
    let wanted: Vec<_> = reference
        .iter()
        .filter(|(n, _)| n == "blue-square.png" || n == "sub/green-circle.png")
        .cloned()
        .collect();
    assert_same_vectors(&wanted, &vectors(&rows, &input));
    // Without version columns, resuming takes its objects as unchanged,
    // and says so.
    let o = b
        .mmembed(&cache, &proxy.url)
        .args(["batch", &manifest, "-o", &listed_out, "--resume"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("2 of the skipped objects are named by the manifest without their version"),
        "{}",
        stderr(&o)
    );
    // An object table exported as CSV (BigQuery's columns and timestamp
    // form): its versions are the objects' identity, so resuming after the
    // table says an object changed embeds that one again.
    let listed = rt.block_on(b.stores.list(&format!("{input}sub/"))).unwrap();
    let table_csv = |bump: bool| {
        let mut text = String::from("uri,generation,etag,content_type,size,md5_hash,updated\n");
        for o in &listed {
            let changed = |v: &Option<String>| match v {
                Some(v) if bump => format!("{v}0"),
                Some(v) => v.clone(),
                None => String::new(),
            };
            text += &format!(
                "{},{},\"{}\",image/png,{},x,{}\n",
                o.uri,
                changed(&o.generation),
                changed(&o.etag).replace('"', "\"\""),
                o.size,
                o.updated.unwrap().format("%Y-%m-%d %H:%M:%S%.6f UTC")
            );
        }
        Bytes::from(text)
    };
    let object_table = format!("{base}/table.csv");
    let table_out = format!("{base}/table.jsonl");
    let put_table = |bump| {
        rt.block_on(b.stores.put(
            &object_table,
            table_csv(bump),
            "text/csv",
            PutMode::Overwrite,
        ))
        .unwrap()
    };
    let batch_table = |extra: &[&str]| {
        let o = b
            .mmembed(&cache, &proxy.url)
            .args(["batch", &object_table, "-o", &table_out])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    put_table(false);
    batch_table(&[]);
    let e = batch_table(&["--resume"]);
    assert!(
        e.contains("unchanged_and_done=2 changed=0 to_embed=0"),
        "{e}"
    );
    assert!(!e.contains("without their version"), "{e}");
    put_table(true);
    let e = batch_table(&["--resume"]);
    assert!(
        e.contains("unchanged_and_done=0 changed=2 to_embed=2"),
        "{e}"
    );
    let (bytes, _) = rt.block_on(b.stores.read(&table_out, 1 << 30)).unwrap();
    let rows = jsonl(&bytes);
    assert_eq!(rows.len(), 2);
    for (r, o) in rows.iter().zip(&listed) {
        assert_eq!(r["uri"].as_str(), Some(o.uri.as_str()));
        assert_eq!(r["md5_hash"], "x");
        assert!(r.get("size").is_none(), "{r}");
        // The output records the version it read, not the table's.
        assert_eq!(r["generation"].as_str(), o.generation.as_deref());
        assert_eq!(r["etag"].as_str(), o.etag.as_deref());
    }
    // The same file as a table for `score` (and `generate`, `classify`):
    // its columns kept, its relative names read from beside it.
    let scores = format!("{base}/scores.jsonl");
    let o = b
        .mmembed(&cache, &proxy.url)
        .args(["score", &manifest, "--text", "a blue square", "-o", &scores])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let (bytes, _) = rt.block_on(b.stores.read(&scores, 1 << 30)).unwrap();
    let rows = jsonl(&bytes);
    let got: Vec<(&str, &str, bool)> = rows
        .iter()
        .map(|r| {
            let ok = r["status"] == "" && r["result"].is_f64();
            (r["uri"].as_str().unwrap(), r["label"].as_str().unwrap(), ok)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("in/blue-square.png", "b", true),
            ("in/sub/green-circle.png", "g", true)
        ]
    );
    assert!(rows[0]["result"].as_f64() > rows[1]["result"].as_f64());
    // Resumed, the bucket output is read back and written again the same.
    let o = b
        .mmembed(&cache, &proxy.url)
        .args([
            "score",
            &manifest,
            "--text",
            "a blue square",
            "-o",
            &scores,
            "--resume",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("keeping 2 rows already done; running 0"),
        "{}",
        stderr(&o)
    );
    let (again, _) = rt.block_on(b.stores.read(&scores, 1 << 30)).unwrap();
    assert_eq!(again, bytes);

    // A rerun skips what is done and unchanged, retries the failures.
    let o = run(&["--resume"], &[]);
    let e = stderr(&o);
    assert!(
        e.contains("unchanged_and_done=5 changed=0 to_embed=2"),
        "{e}"
    );
    assert_eq!(read_out().len(), 7);

    // A changed object is embedded again; the others are not.
    rt.block_on(b.stores.put(
        &format!("{input}red-star.png"),
        Bytes::from(png(Shape::Cross, Colour::Purple, 9)),
        "image/png",
        PutMode::Overwrite,
    ))
    .unwrap();
    let o = run(&["--resume"], &[]);
    let e = stderr(&o);
    assert!(
        e.contains("unchanged_and_done=4 changed=1 to_embed=3"),
        "{e}"
    );
    let after = vectors(&read_out(), &input);
    let red =
        |v: &[(String, Vec<f64>)]| v.iter().find(|x| x.0 == "red-star.png").unwrap().1.clone();
    let dot: f64 = red(&after)
        .iter()
        .zip(red(&reference))
        .map(|(p, q)| p * q)
        .sum();
    assert!(dot < 0.9999, "the changed object kept its old vector");

    // Killed mid-job (as kill -9 would): parts stay in the bucket, the
    // lock of the dead process is taken over, nothing lost or duplicated.
    let out2 = format!("{base}/out2.jsonl");
    let mut c = b.mmembed(&cache, &proxy.url);
    c.args(["batch", &input, "-o", &out2, "--batch-size", "1"])
        .env("MMEMBED_TEST_ABORT_AFTER_PARTS", "2");
    let o = c.output().unwrap();
    assert!(
        o.status.code().is_none(),
        "aborted: {:?} {}",
        o.status,
        stderr(&o)
    );
    let parts = rt
        .block_on(b.stores.list(&format!("{out2}.parts/")))
        .unwrap();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(
        rt.block_on(b.stores.exists(&format!("{out2}.lock")))
            .unwrap()
    );
    let mut c = b.mmembed(&cache, &proxy.url);
    c.args(["batch", &input, "-o", &out2, "--resume"]);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let (bytes, _) = rt.block_on(b.stores.read(&out2, 1 << 30)).unwrap();
    let resumed = jsonl(&bytes);
    // The first job's output sits in this job's input: one more row (an
    // unsupported type).
    assert_eq!(resumed.len(), 8);
    assert_eq!(
        resumed
            .iter()
            .filter(|r| r["uri"] == format!("{input}out.jsonl"))
            .count(),
        1
    );
    assert_same_vectors(&after, &vectors(&resumed, &input));
    drop(proxy);
}

#[test]
fn s3_batch_reads_writes_resumes_and_survives_faults() {
    whole_job(Kind::S3);
}

#[test]
fn azure_batch_reads_writes_resumes_and_survives_faults() {
    whole_job(Kind::Azure);
}

#[test]
fn gcs_batch_reads_writes_resumes_and_survives_faults() {
    whole_job(Kind::Gcs);
}

#[test]
fn a_second_job_on_a_bucket_output_is_refused_naming_the_holder() {
    let Some(b) = bucket(Kind::Gcs) else { return };
    let d = tempfile::tempdir().unwrap();
    let rt = rt();
    let base = b.base("lock");
    let out = format!("{base}/out.parquet");
    let holder = serde_json::json!({
        "host": "other-machine", "pid": 4242,
        "started": "2026-01-01T00:00:00Z", "expires": "2999-01-01T00:00:00Z",
        "token": "t",
    });
    rt.block_on(b.stores.put(
        &format!("{out}.lock"),
        Bytes::from(holder.to_string()),
        "text/plain",
        PutMode::Overwrite,
    ))
    .unwrap();
    let o = b
        .mmembed(&d.path().join("cache"), &b.endpoint)
        .args(["batch", &format!("{base}/in/"), "-o", &out])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("being written by another job (pid 4242 on other-machine"),
        "{e}"
    );
}

/// Vertex reads `gs://` objects itself: the job sends their URIs, having
/// typed one named without an extension (stored as octet-stream) by its
/// first bytes here, and failed a text file so named without asking Vertex.
/// A GIF goes by URI without a `mimeType` (which names only JPEG and PNG);
/// a WebP, which the service does not read, is fetched and sent as PNG.
#[test]
fn vertex_gets_gs_uris_typed_here() {
    let Some(b) = bucket(Kind::Gcs) else { return };
    let fake = mmembed_vertex::fake::FakeVertex::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let rt = rt();
    let base = b.base("vertex");
    let generic = "application/octet-stream";
    let objects = [
        (
            "uploads/3f2a9c",
            png(Shape::Cross, Colour::Black, 6),
            generic,
        ),
        ("uploads/77", b"plain text".to_vec(), generic),
        (
            "uploads/9b1e",
            encoded(Shape::Star, Colour::Green, 3, image::ImageFormat::Gif),
            generic,
        ),
        (
            "uploads/typed",
            png(Shape::Ring, Colour::Blue, 2),
            "image/png",
        ),
        ("star.png", png(Shape::Star, Colour::Red, 1), generic),
        (
            "ring.webp",
            encoded(Shape::Ring, Colour::Red, 4, image::ImageFormat::WebP),
            generic,
        ),
    ];
    for (k, bytes, ct) in objects {
        let uri = format!("{base}/{k}");
        rt.block_on(
            b.stores
                .put(&uri, Bytes::from(bytes), ct, PutMode::Overwrite),
        )
        .unwrap();
    }
    let out = d.path().join("vertex.jsonl");
    let o = b
        .mmembed(&d.path().join("cache"), &b.endpoint)
        .env_remove("MMEMBED_MODEL")
        .env("MMEMBED_VERTEX_ACCESS_TOKEN", "t")
        .args(["batch", &format!("{base}/"), "-o"])
        .arg(&out)
        .args(["--backend", "vertex", "--project", "test-proj"])
        .args(["--vertex-url", &fake.url, "--rpm", "6000"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let rows = jsonl(&std::fs::read(&out).unwrap());
    let row = |k: &str| {
        let uri = format!("{base}/{k}");
        rows.iter()
            .find(|r| r["uri"] == uri.as_str())
            .unwrap()
            .clone()
    };
    let untyped = row("uploads/3f2a9c");
    assert_eq!(untyped["status"], "", "{untyped}");
    assert_eq!(untyped["content_type"], "image/png");
    assert_eq!(row("star.png")["status"], "");
    assert_eq!(row("uploads/typed")["status"], "");
    let text = row("uploads/77");
    assert!(
        text["status"].as_str().unwrap().contains("unsupported"),
        "{text}"
    );
    // Vertex got the URIs, not bytes, and nothing for the text file.
    let sent: Vec<String> = fake.requests().iter().map(|r| r.body.to_string()).collect();
    let gcs = |k: &str| format!("\"gcsUri\":\"{base}/{k}\"");
    assert!(
        sent.iter().any(|b| b.contains(&gcs("uploads/3f2a9c"))),
        "{sent:?}"
    );
    assert!(
        sent.iter().any(|b| b.contains(&gcs("star.png"))),
        "{sent:?}"
    );
    assert!(!sent.iter().any(|b| b.contains("uploads/77")), "{sent:?}");
    assert_eq!(row("ring.webp")["status"], "");
    assert!(!sent.iter().any(|b| b.contains("ring.webp")), "{sent:?}");
    let inline: Vec<&String> = sent
        .iter()
        .filter(|b| b.contains("bytesBase64Encoded"))
        .collect();
    assert_eq!(inline.len(), 1, "only the WebP goes as bytes: {sent:?}");
    assert!(
        inline[0].contains("\"mimeType\":\"image/png\""),
        "{inline:?}"
    );
    let gif = sent
        .iter()
        .find(|b| b.contains(&gcs("uploads/9b1e")))
        .expect("the GIF by its URI");
    assert!(!gif.contains("mimeType"), "{gif}");

    // Gemini too reads gs:// objects given their type: the stored one when
    // the name has none; for one stored as octet-stream, the type its
    // first bytes say (a PNG); a GIF, which Gemini does not read, is read
    // here and sent inline as PNG. Through a proxy that counts the storage
    // requests: one metadata request each, and one read of each untyped
    // object (the PNG's abandoned after its first bytes, the GIF's to the
    // end; neither asks for the metadata again).
    let proxy = rt
        .block_on(FaultProxy::start(&b.endpoint, Faults::default()))
        .unwrap();
    let table = d.path().join("prompts.csv");
    let uris = format!("photo\n{base}/uploads/typed\n{base}/uploads/3f2a9c\n{base}/uploads/9b1e\n");
    std::fs::write(&table, uris).unwrap();
    let out = d.path().join("answers.jsonl");
    let gemini = format!(
        "gemini:test-proj/us-central1?base_url={}&max_attempts=1&rpm=60000",
        fake.url
    );
    let o = b
        .mmembed(&d.path().join("cache"), &proxy.url)
        .env("MMEMBED_VERTEX_ACCESS_TOKEN", "t")
        .arg("generate")
        .arg(&table)
        .arg("-o")
        .arg(&out)
        .args(["-g", &gemini, "--prompt", "What is in {@photo}?"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(proxy.stats.requests.load(Ordering::Relaxed), 5);
    let sent: Vec<Value> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("generateContent"))
        .map(|r| r.body)
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    let parts: Vec<&Value> = sent.iter().map(|b| &b["contents"][0]["parts"][1]).collect();
    for k in ["uploads/typed", "uploads/3f2a9c"] {
        let uri = format!("{base}/{k}");
        let by_file = parts
            .iter()
            .find(|p| p["fileData"]["fileUri"] == uri.as_str());
        assert_eq!(
            by_file.expect(k)["fileData"]["mimeType"],
            "image/png",
            "{parts:?}"
        );
    }
    let inline: Vec<_> = parts
        .iter()
        .filter(|p| p.get("inlineData").is_some())
        .collect();
    assert_eq!(inline.len(), 1, "{parts:?}");
    assert_eq!(inline[0]["inlineData"]["mimeType"], "image/png");
}

#[test]
fn http_objects_named_by_a_manifest() {
    let d = tempfile::tempdir().unwrap();
    let reference = local_reference(d.path());
    let rt = rt();
    let server = rt
        .block_on(FileServer::start(d.path().join("ref-media")))
        .unwrap();
    let url = &server.url;
    let manifest = d.path().join("m.csv");
    let mut text = String::from("uri,label\n");
    for (k, _) in objects() {
        text.push_str(&format!("{url}/{k},x\n"));
    }
    text.push_str(&format!("{url}/missing.png,y\n"));
    // A URL with a query (a signed URL's, a CDN's parameters) is read with
    // it; this server ignores it.
    text.push_str(&format!("{url}/red-star.png?v=2&sig=abc,q\n"));
    std::fs::write(&manifest, text).unwrap();
    let out = d.path().join("http.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_mmembed"))
        .env("MMEMBED_CACHE_DIR", d.path().join("cache"))
        .env("HF_HUB_OFFLINE", "1")
        .env("MMEMBED_STORE_RETRIES", "1")
        .args(["batch", "--model", "demo", "--device", "cpu"])
        .arg(&manifest)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let rows = jsonl(&std::fs::read(&out).unwrap());
    let missing = rows
        .iter()
        .find(|r| r["uri"].as_str().unwrap().ends_with("missing.png"))
        .unwrap();
    assert!(
        missing["status"].as_str().unwrap().contains("not found"),
        "{missing}"
    );
    // The hidden object is listed by the manifest, so it is an input here.
    let mut want = reference.clone();
    let mut got = vectors(&rows, &format!("{url}/"));
    let hidden = got.iter().find(|x| x.0 == ".hidden/x.png").unwrap().clone();
    want.insert(0, hidden);
    let queried = got.iter().position(|x| x.0.contains('?')).unwrap();
    let (name, v) = got.remove(queried);
    assert_eq!(name, "red-star.png?v=2&sig=abc");
    assert_same_vectors(&want, &got);
    let red = want.iter().find(|x| x.0 == "red-star.png").unwrap();
    assert_same_vectors(&[(red.0.clone(), v)], std::slice::from_ref(red));

    // `mmembed embed` types a URL without an extension by its first bytes
    // (this server says octet-stream), and refuses one that is no media.
    let embed = |path: &str| {
        Command::new(env!("CARGO_BIN_EXE_mmembed"))
            .env("MMEMBED_CACHE_DIR", d.path().join("cache"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["embed", "--model", "demo", "--device", "cpu"])
            .arg(format!("{url}/{path}"))
            .output()
            .unwrap()
    };
    let untyped = want.iter().find(|x| x.0 == "uploads/3f2a9c").unwrap();
    let got = embedded("uploads/3f2a9c", &embed("uploads/3f2a9c"));
    assert_same_vectors(std::slice::from_ref(untyped), &[got]);
    std::fs::write(d.path().join("ref-media/uploads/blob"), b"plain text").unwrap();
    let o = embed("uploads/blob");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown file type"), "{}", stderr(&o));
}

#[test]
fn local_outputs_inside_the_input_and_a_second_local_job() {
    let d = tempfile::tempdir().unwrap();
    let media = d.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    std::fs::write(media.join("a.png"), png(Shape::Star, Colour::Red, 1)).unwrap();
    let out = media.join("out.jsonl");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mmembed"))
            .env("MMEMBED_CACHE_DIR", d.path().join("cache"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["batch", "--model", "demo", "--device", "cpu"])
            .arg(&media)
            .arg("-o")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["--resume"]);
    assert!(
        o.status.success(),
        "the output was read as an input: {}",
        stderr(&o)
    );
    let rows = jsonl(&std::fs::read(&out).unwrap());
    assert_eq!(rows.len(), 1);
    assert!(Path::new(rows[0]["uri"].as_str().unwrap()).is_absolute());

    // Another job holds the output: refused at once, naming it.
    let lock = std::fs::File::create(media.join("out.jsonl.lock")).unwrap();
    lock.lock().unwrap();
    let o = run(&["--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("being written by another job"),
        "{}",
        stderr(&o)
    );
    drop(lock);
}
