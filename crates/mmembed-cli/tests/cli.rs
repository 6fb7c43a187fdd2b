//! The real `mmembed` binary on the bundled demo model: batch rows and
//! statuses, crash and resume, shards, Parquet schema, search, embed, models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow_schema::DataType;
use mmembed_core::testkit;
use mmembed_shapes::{Colour, Scene, Shape};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

fn mmembed(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmembed"));
    // No variable of the developer's shell leaks into the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("MMEMBED_") || k.starts_with("GOOGLE_CLOUD_") {
            c.env_remove(k);
        }
    }
    c.env("MMEMBED_CACHE_DIR", cache)
        .env("MMEMBED_MODEL", "demo")
        .env("MMEMBED_DEVICE", "cpu")
        .env("HF_HUB_OFFLINE", "1");
    c
}

fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("the binary runs");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const SHOWN: [(Shape, Colour); 4] = [
    (Shape::Star, Colour::Red),
    (Shape::Square, Colour::Blue),
    (Shape::Circle, Colour::Green),
    (Shape::Triangle, Colour::Yellow),
];

fn scene(shape: Shape, colour: Colour, seed: u64) -> image::RgbImage {
    Scene::sample(shape, colour, seed)
}

/// A media folder: 4 shape images (one in a subfolder), a 3-segment
/// slideshow, and bad files: garbage named .png, a truncated JPEG, an
/// unsupported .txt, an empty .mp4; plus a hidden file that is skipped.
fn media(dir: &Path) -> PathBuf {
    let root = dir.join("media");
    std::fs::create_dir_all(root.join("more")).unwrap();
    for (i, (shape, colour)) in SHOWN.iter().enumerate() {
        let sub = if i == 3 { "more/" } else { "" };
        let p = root.join(format!("{sub}{}-{}.png", colour.name(), shape.name()));
        scene(*shape, *colour, i as u64).save(p).unwrap();
    }
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for (i, (shape, colour)) in [
        (Shape::Ring, Colour::Orange),
        (Shape::Cross, Colour::Purple),
        (Shape::Star, Colour::White),
    ]
    .into_iter()
    .enumerate()
    {
        scene(shape, colour, 10 + i as u64)
            .save(frames.join(format!("f{i:02}.png")))
            .unwrap();
    }
    let pattern = frames.join("f%02d.png");
    let video = root.join("slideshow.mp4");
    testkit::ffmpeg([
        "-framerate".as_ref(),
        "1/4".as_ref(),
        "-i".as_ref(),
        pattern.as_os_str(),
        "-vf".as_ref(),
        "fps=25,format=yuv420p".as_ref(),
        "-c:v".as_ref(),
        "libx264".as_ref(),
        video.as_os_str(),
    ]);
    std::fs::write(root.join("garbage.png"), b"this is not a PNG at all").unwrap();
    let jpeg = black_cross_jpeg();
    std::fs::write(root.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(root.join("notes.txt"), b"hello").unwrap();
    std::fs::write(root.join("empty.mp4"), b"").unwrap();
    std::fs::write(root.join(".DS_Store"), b"\0\0").unwrap();
    root
}

/// A JPEG of a black cross.
fn black_cross_jpeg() -> Vec<u8> {
    let mut jpeg = vec![];
    scene(Shape::Cross, Colour::Black, 7)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    jpeg
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Rows by (uri, segment start) with status and embedding.
fn by_key(rows: &[Value]) -> BTreeMap<(String, String), (String, Vec<f64>)> {
    let mut m = BTreeMap::new();
    for r in rows {
        let key = (
            r["uri"].as_str().unwrap().to_string(),
            r["video_start_sec"].to_string(),
        );
        let emb = r["embedding"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect())
            .unwrap_or_default();
        let old = m.insert(
            key.clone(),
            (r["status"].as_str().unwrap().to_string(), emb),
        );
        assert!(old.is_none(), "duplicate row {key:?}");
    }
    m
}

fn assert_same_rows(a: &[Value], b: &[Value]) {
    let (a, b) = (by_key(a), by_key(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, (sa, ea)) in &a {
        let (sb, eb) = &b[k];
        assert_eq!(sa, sb, "{k:?}");
        assert_eq!(ea.len(), eb.len(), "{k:?}");
        // Chunking differs between runs; vectors agree to float rounding.
        let dot: f64 = ea.iter().zip(eb).map(|(x, y)| x * y).sum();
        assert!(ea.is_empty() || dot > 0.99999, "{k:?}: cosine {dot}");
    }
}

fn batch(cache: &Path, input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = mmembed(cache);
    c.arg("batch").arg(input).arg("-o").arg(out).args(extra);
    c
}

#[test]
fn batch_gives_one_row_per_image_and_segment_with_statuses() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let out = d.path().join("out.jsonl");
    let o = batch(d.path(), &root, &out, &["--interval", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "failed rows make exit 1: {stderr}"
    );
    assert!(stderr.contains("rows: 7 ok, 4 failed"), "{stderr}");
    let rows = read_jsonl(&out);
    let m = by_key(&rows);
    let uri = |name: &str| root.join(name).to_string_lossy().into_owned();
    let status = |name: &str, start: &str| m[&(uri(name), start.to_string())].0.clone();
    for name in [
        "red-star.png",
        "blue-square.png",
        "green-circle.png",
        "more/yellow-triangle.png",
    ] {
        assert_eq!(status(name, "null"), "", "{name}");
    }
    for start in ["0.0", "4.0", "8.0"] {
        assert_eq!(status("slideshow.mp4", start), "", "segment {start}");
    }
    assert!(
        status("garbage.png", "null").contains("decode"),
        "{}",
        status("garbage.png", "null")
    );
    assert!(!status("truncated.jpg", "null").is_empty());
    assert!(status("notes.txt", "null").contains("unsupported file type"));
    assert!(!status("empty.mp4", "null").is_empty());
    assert_eq!(rows.len(), 11, "no row for the hidden file, none lost");
    let seg = rows
        .iter()
        .find(|r| r["uri"] == uri("slideshow.mp4") && r["video_start_sec"] == 8.0)
        .unwrap();
    assert_eq!(seg["video_end_sec"], 12.0);
    assert_eq!(seg["content_type"], "video/mp4");
    assert_eq!(seg["model"], "demo");
    assert!(seg["space"].as_str().unwrap().starts_with("clip-blake3:"));
    let ok = rows
        .iter()
        .find(|r| r["uri"] == uri("red-star.png"))
        .unwrap();
    assert_eq!(
        ok["embedding"].as_array().unwrap().len() as u64,
        ok["dimension"].as_u64().unwrap()
    );
    assert!(ok["size_bytes"].as_u64().unwrap() > 100);
    assert!(
        rows.iter()
            .filter(|r| r["status"] != "")
            .all(|r| r["embedding"].is_null())
    );
    assert!(
        !d.path().join("out.jsonl.parts").exists(),
        "parts are cleaned up"
    );

    // An existing output is never clobbered by accident.
    let o = batch(d.path(), &root, &out, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

/// Objects named without an extension (uploads named by a hash or a
/// number) are typed by the type declared for them (a manifest's
/// `content_type`, as an object table's) or else by their first bytes; the
/// vectors are those of the same bytes under a named file.
#[test]
fn objects_named_without_an_extension_are_typed_by_their_content() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let dir = d.path().join("uploads");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = |from: &str, to: &str| std::fs::copy(root.join(from), dir.join(to)).unwrap();
    copy("red-star.png", "red-star.png");
    copy("red-star.png", "3f2a9c");
    copy("slideshow.mp4", "clip");
    copy("notes.txt", "blob");
    copy("notes.txt", "sidecar.json");
    std::fs::write(dir.join("frame.000123"), black_cross_jpeg()).unwrap();

    let out = d.path().join("out.jsonl");
    let o = batch(d.path(), &dir, &out, &["--interval", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("rows: 6 ok, 2 failed"), "{stderr}");
    let rows = read_jsonl(&out);
    let row = |name: &str| {
        let uri = dir.join(name).to_string_lossy().into_owned();
        rows.iter()
            .find(|r| r["uri"] == uri.as_str())
            .unwrap_or_else(|| panic!("no row for {name}"))
    };
    assert_eq!(row("3f2a9c")["status"], "");
    assert_eq!(row("3f2a9c")["content_type"], "image/png");
    assert_eq!(
        row("3f2a9c")["embedding"],
        row("red-star.png")["embedding"],
        "the same bytes, the same vector"
    );
    assert_eq!(row("frame.000123")["content_type"], "image/jpeg");
    assert_eq!(row("frame.000123")["status"], "");
    let clip = dir.join("clip").to_string_lossy().into_owned();
    let segments: Vec<_> = rows.iter().filter(|r| r["uri"] == clip.as_str()).collect();
    assert_eq!(segments.len(), 3, "{segments:?}");
    assert!(
        segments
            .iter()
            .all(|r| r["status"] == "" && r["content_type"] == "video/mp4")
    );
    for name in ["blob", "sidecar.json"] {
        let r = row(name);
        assert!(
            r["status"]
                .as_str()
                .unwrap()
                .contains("unsupported file type"),
            "{r}"
        );
        assert_eq!(r["content_type"], "application/octet-stream");
    }

    // A manifest's `content_type` (an object table's) is believed: a PNG
    // declared as text is not looked at; an extension-less video declared
    // as one is split into segments.
    let manifest = d.path().join("table.csv");
    std::fs::write(
        &manifest,
        "uri,content_type,label\n\
         uploads/3f2a9c,text/plain,a\n\
         uploads/clip,video/mp4,b\n\
         uploads/blob,IMAGE/PNG,c\n",
    )
    .unwrap();
    let out = d.path().join("declared.jsonl");
    let o = batch(d.path(), &manifest, &out, &["--interval", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("rows: 3 ok, 2 failed"), "{stderr}");
    let rows = read_jsonl(&out);
    let by = |label: &str| -> Vec<&Value> { rows.iter().filter(|r| r["label"] == label).collect() };
    let text = by("a");
    assert_eq!(text[0]["content_type"], "text/plain");
    let status = text[0]["status"].as_str().unwrap();
    assert!(status.contains("content type \"text/plain\""), "{status}");
    assert_eq!(by("b").len(), 3);
    let blob = by("c");
    assert_eq!(blob[0]["content_type"], "image/png");
    assert!(
        blob[0]["status"].as_str().unwrap().contains("decode"),
        "{}",
        blob[0]
    );

    // `classify`/`score` type them the same way: from a folder's table,
    // and from a manifest that names them without a `content_type`.
    let names = d.path().join("names.csv");
    std::fs::write(&names, "path,label\nuploads/3f2a9c,a\nuploads/blob,b\n").unwrap();
    for input in [&dir, &names] {
        let scores = d.path().join("scores.jsonl");
        let o = mmembed(d.path())
            .arg("score")
            .arg(input)
            .args(["--text", "a red star", "--overwrite", "-o"])
            .arg(&scores)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let rows = read_jsonl(&scores);
        let scored = |name: &str| {
            let r = rows
                .iter()
                .find(|r| r["uri"].as_str().unwrap().ends_with(name))
                .unwrap();
            (
                r["status"].as_str().unwrap().to_string(),
                r["result"].clone(),
            )
        };
        let (status, score) = scored("3f2a9c");
        assert_eq!(status, "", "{input:?}");
        assert!(score.as_f64().is_some(), "{score}");
        assert!(
            scored("blob").0.contains("not an image or video"),
            "{input:?}"
        );
    }

    // `mmembed embed` takes such a file by its bytes too.
    let o = run_ok(mmembed(d.path()).arg("embed").arg(dir.join("3f2a9c")));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["modality"], "image");
    let o = mmembed(d.path())
        .arg("embed")
        .arg(dir.join("blob"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown file type"));
}

/// `--resume` of the media folder's finished job skips the 5 files that
/// succeeded and are unchanged, and runs the 4 that failed again.
fn resume_redoes_only_the_4_failed(cache: &Path, root: &Path, out: &Path) {
    let o = batch(cache, root, out, &["--interval", "4", "--resume"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("unchanged_and_done=5 changed=0 to_embed=4"),
        "{stderr}"
    );
}

#[test]
fn a_crashed_job_resumes_to_the_same_rows() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let full = d.path().join("full.jsonl");
    let _ = batch(d.path(), &root, &full, &["--interval", "4"])
        .output()
        .unwrap();
    let expected = read_jsonl(&full);

    // Deterministic crash: abort after the second part of 2 files.
    let out = d.path().join("crashed.jsonl");
    let o = batch(
        d.path(),
        &root,
        &out,
        &["--interval", "4", "--batch-size", "2"],
    )
    .env("MMEMBED_TEST_ABORT_AFTER_PARTS", "2")
    .output()
    .unwrap();
    assert!(
        o.status.code().is_none(),
        "aborted by a signal: {:?}",
        o.status
    );
    assert!(!out.exists());
    let parts = d.path().join("crashed.jsonl.parts");
    assert_eq!(std::fs::read_dir(&parts).unwrap().count(), 2);
    // A torn temporary file, as a kill during a write leaves, is ignored.
    std::fs::write(parts.join(".part-000003.jsonl.tmp"), b"{\"uri\":").unwrap();
    let o = batch(d.path(), &root, &out, &["--interval", "4", "--resume"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_same_rows(&expected, &read_jsonl(&out));

    // Resuming a finished job re-tries only the failed files.
    let before = std::fs::metadata(&out).unwrap().modified().unwrap();
    resume_redoes_only_the_4_failed(d.path(), &root, &out);
    assert_same_rows(&expected, &read_jsonl(&out));
    assert!(std::fs::metadata(&out).unwrap().modified().unwrap() >= before);
}

/// Rows of objects deleted since the last run stay unless `--prune` drops
/// them; an empty listing never prunes an output to nothing.
#[test]
fn resume_keeps_the_rows_of_deleted_objects_unless_pruned() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("photos");
    std::fs::create_dir_all(&root).unwrap();
    for (i, (shape, colour)) in SHOWN.iter().take(3).enumerate() {
        scene(*shape, *colour, i as u64)
            .save(root.join(format!("{i}.png")))
            .unwrap();
    }
    let out = d.path().join("out.jsonl");
    run_ok(&mut batch(d.path(), &root, &out, &[]));
    let before = read_jsonl(&out);
    assert_eq!(before.len(), 3);
    let gone = root.join("1.png").to_string_lossy().into_owned();
    std::fs::remove_file(&gone).unwrap();

    let o = run_ok(&mut batch(d.path(), &root, &out, &["--resume"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("keeping 1 rows of 1 URIs the input no longer lists"),
        "{stderr}"
    );
    assert_same_rows(&before, &read_jsonl(&out));

    // --prune without --resume is a usage error; the output is untouched.
    let o = batch(d.path(), &root, &out, &["--prune"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));

    let o = run_ok(&mut batch(d.path(), &root, &out, &["--resume", "--prune"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("dropping 1 rows of 1 URIs the input no longer lists"),
        "{stderr}"
    );
    assert!(
        stderr.contains("embedding 0"),
        "nothing embedded again: {stderr}"
    );
    let pruned: Vec<Value> = before
        .iter()
        .filter(|r| r["uri"] != gone.as_str())
        .cloned()
        .collect();
    assert_eq!(pruned.len(), 2);
    assert_same_rows(&pruned, &read_jsonl(&out));

    // An input that lists nothing (a typo, an unmounted disk) is refused.
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = batch(d.path(), &empty, &out, &["--resume", "--prune"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--prune would empty"), "{stderr}");
    assert_same_rows(&pruned, &read_jsonl(&out));
}

#[test]
fn kill_9_mid_job_then_resume_loses_and_duplicates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let full = d.path().join("full.jsonl");
    let _ = batch(d.path(), &root, &full, &["--interval", "4"])
        .output()
        .unwrap();
    let expected = read_jsonl(&full);

    let out = d.path().join("killed.jsonl");
    let parts = d.path().join("killed.jsonl.parts");
    let mut child = batch(
        d.path(),
        &root,
        &out,
        &["--interval", "4", "--batch-size", "1"],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Kill as soon as the first part is in place (or the job is over).
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(120) {
        let n = std::fs::read_dir(&parts).map(|r| r.count()).unwrap_or(0);
        if n >= 1 || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    let _ = batch(d.path(), &root, &out, &["--interval", "4", "--resume"])
        .output()
        .unwrap();
    assert_same_rows(&expected, &read_jsonl(&out));
}

#[test]
fn shards_partition_the_job_and_parquet_has_the_schema() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let full = d.path().join("full.parquet");
    let _ = batch(d.path(), &root, &full, &["--interval", "4"])
        .output()
        .unwrap();

    let f = std::fs::File::open(&full).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
    let schema = reader.schema().clone();
    let want = [
        ("uri", DataType::Utf8),
        ("content_type", DataType::Utf8),
        ("size_bytes", DataType::Int64),
        ("status", DataType::Utf8),
        ("video_start_sec", DataType::Float64),
        ("video_end_sec", DataType::Float64),
        ("model", DataType::Utf8),
        ("space", DataType::Utf8),
        ("dimension", DataType::Int32),
    ];
    for (name, ty) in want {
        assert_eq!(
            schema.field_with_name(name).unwrap().data_type(),
            &ty,
            "{name}"
        );
    }
    match schema.field_with_name("embedding").unwrap().data_type() {
        DataType::List(item) => assert_eq!(item.data_type(), &DataType::Float32),
        other => panic!("embedding is {other:?}"),
    }
    let n: usize = reader.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(n, 11);

    // Parquet keeps microseconds, the files' times have nanoseconds: a
    // resume still knows the 5 files that succeeded as unchanged.
    resume_redoes_only_the_4_failed(d.path(), &root, &full);
    // It records how the vectors were made: another decode or segmentation
    // is refused rather than mixed in.
    let before = std::fs::read(&full).unwrap();
    for (flags, says) in [
        (
            &["--interval", "4", "--jpeg-draft"][..],
            "jpeg_draft \"false\" (now \"true\")",
        ),
        (
            &["--interval", "4", "--heic-thumbnail"][..],
            "heic_thumbnail \"false\" (now \"true\")",
        ),
        (
            &["--interval", "4", "--max-patches", "576"][..],
            "max_patches \"default\" (now \"576\")",
        ),
        (
            &["--interval", "8"][..],
            "video_segments \"start default end default interval 4\" (now \"start default end default interval 8\")",
        ),
    ] {
        let o = batch(d.path(), &root, &full, &[flags, &["--resume"]].concat())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    assert_eq!(std::fs::read(&full).unwrap(), before);

    // The same job as JSONL, whole and in three shards: every file in
    // exactly one shard, and the shards' rows together are the whole job's.
    // (Which shard a file lands in hashes its absolute path, so it changes
    // with the temporary directory's name; one shard may well be empty.)
    let rel = Path::new("media");
    let whole = d.path().join("whole.jsonl");
    let _ = batch(d.path(), rel, &whole, &["--interval", "4"])
        .current_dir(d.path())
        .output()
        .unwrap();
    let mut union = vec![];
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..3 {
        let p = d.path().join(format!("shard-{i}.jsonl"));
        let o = batch(
            d.path(),
            rel,
            &p,
            &["--interval", "4", "--shard", &format!("{i}/3")],
        )
        .current_dir(d.path())
        .output()
        .unwrap();
        let rows = read_jsonl(&p);
        let files: std::collections::BTreeSet<_> =
            rows.iter().map(|r| r["uri"].to_string()).collect();
        for f in files {
            if let Some(other) = seen.insert(f.clone(), i) {
                panic!(
                    "{f} in shards {other} and {i}; stderr: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        union.extend(rows);
    }
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert_same_rows(&read_jsonl(&whole), &union);
}

#[test]
fn search_ranks_the_matching_file_first_and_refuses_mixed_spaces() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let out = d.path().join("media.parquet");
    let _ = batch(d.path(), &root, &out, &["--interval", "4"])
        .output()
        .unwrap();
    for (query, want) in [
        ("a red star", "red-star.png"),
        ("a photo of a blue square", "blue-square.png"),
        ("a green circle", "green-circle.png"),
        ("a purple cross", "slideshow.mp4  [4.0-8.0 s]"),
    ] {
        let o = run_ok(
            mmembed(d.path())
                .env_remove("MMEMBED_MODEL")
                .args(["search", query, "--in"])
                .arg(&out)
                .args(["-k", "3"]),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.ends_with(want), "{query}: {text}");
    }
    // An image query: the red star itself comes first.
    let o = run_ok(
        mmembed(d.path())
            .args(["search", "--json", "--image"])
            .arg(root.join("red-star.png"))
            .arg("--in")
            .arg(&out),
    );
    let first: Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    assert!(
        first["uri"].as_str().unwrap().ends_with("red-star.png"),
        "{first}"
    );
    assert!(first["score"].as_f64().unwrap() > 0.999);

    // Filters: the purple cross is a video segment; among images only, or
    // under another folder, it is not found; among videos every hit is one.
    let hits = |extra: &[&str]| -> Vec<Value> {
        let o = run_ok(
            mmembed(d.path())
                .args(["search", "a purple cross", "--json", "--in"])
                .arg(&out)
                .args(extra),
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let images = hits(&["--modality", "image", "-k", "50"]);
    assert!(!images.is_empty());
    assert!(
        images.iter().all(|h| h["video_start_sec"].is_null()),
        "{images:?}"
    );
    let videos = hits(&["--modality", "video"]);
    assert!(
        videos
            .iter()
            .all(|h| h["uri"].as_str().unwrap().ends_with(".mp4")),
        "{videos:?}"
    );
    assert_eq!(videos[0]["video_start_sec"], 4.0);
    let prefix = format!("{}/", root.join("more").display());
    let under = hits(&["--uri-prefix", &prefix]);
    assert_eq!(under.len(), 1, "{under:?}");
    assert!(
        under[0]["uri"].as_str().unwrap().starts_with(&prefix),
        "{under:?}"
    );
    let o = mmembed(d.path())
        .args(["search", "x", "--where", "novalue", "--in"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("COLUMN=VALUE"));

    // Through an index: the same first hits; stale once the table changes.
    let idx = d.path().join("media.index");
    let o = run_ok(
        mmembed(d.path())
            .args(["index", "build"])
            .arg(&out)
            .arg("-o")
            .arg(&idx),
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("index built"));
    for (query, want) in [
        ("a red star", "red-star.png"),
        ("a purple cross", "slideshow.mp4  [4.0-8.0 s]"),
    ] {
        let o = run_ok(
            mmembed(d.path())
                .args(["search", query, "--index"])
                .arg(&idx),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.lines().next().unwrap_or_default().ends_with(want),
            "{query}: {text}"
        );
    }
    let o = run_ok(
        mmembed(d.path())
            .args(["index", "build"])
            .arg(&out)
            .arg("-o")
            .arg(&idx),
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("up to date"));
    let copy = d.path().join("copy.parquet");
    std::fs::copy(&out, &copy).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::copy(&copy, &out).unwrap();
    let o = mmembed(d.path())
        .args(["search", "x", "--index"])
        .arg(&idx)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stale"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The search page is refused where it would bypass --api-key or
    // shadow the predict route.
    for (extra, want) in [
        (["--api-key", "k"], "no access control"),
        (["--predict-route", "/"], "collides with the search page"),
    ] {
        let o = mmembed(d.path())
            .args(["serve", "--port", "0", "--search-in"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // Rows of another space are refused, not silently compared.
    let other = d.path().join("other.jsonl");
    let mut row: Value = serde_json::from_str(
        &serde_json::to_string(&serde_json::json!({
            "uri": "x.png", "content_type": "image/png", "size_bytes": 1, "embedding": [1.0],
            "status": "", "video_start_sec": null, "video_end_sec": null, "model": "m",
            "space": "another-space", "dimension": 1
        }))
        .unwrap(),
    )
    .unwrap();
    row["dimension"] = 1.into();
    std::fs::write(&other, format!("{row}\n")).unwrap();
    let o = mmembed(d.path())
        .args(["search", "a red star", "--in"])
        .arg(&out)
        .arg("--in")
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("mix embedding spaces"));
}

#[test]
fn embed_prints_json_and_reports_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("red-star.png");
    scene(Shape::Star, Colour::Red, 1).save(&img).unwrap();
    let o = run_ok(
        mmembed(d.path())
            .args(["embed", "--text", "a red star"])
            .arg(&img),
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["modality"], "text");
    assert_eq!(lines[1]["modality"], "image");
    let (a, b) = (
        lines[0]["embedding"].as_array().unwrap(),
        lines[1]["embedding"].as_array().unwrap(),
    );
    assert_eq!(a.len(), lines[0]["dimension"].as_u64().unwrap() as usize);
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.as_f64().unwrap() * y.as_f64().unwrap())
        .sum();
    assert!(dot > 0.2, "caption and picture agree: {dot}");

    let mut c = mmembed(d.path());
    c.args(["embed", "--text", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a blue square\n\na green ring\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);

    let o = mmembed(d.path())
        .args(["embed", "--text", "   "])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(line["error"].as_str().unwrap().contains("empty"), "{line}");
    let o = mmembed(d.path())
        .args(["embed", "notes.txt"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = mmembed(d.path())
        .args(["embed", "--interval", "2", "--text", "x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("interval"));

    // A size the model cannot make is refused up front, not per input or row.
    let out = d.path().join("o.jsonl");
    for args in [
        vec!["embed", "--text", "x", "--dimension", "65"],
        vec![
            "batch",
            d.path().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--dimension",
            "65",
        ],
    ] {
        let o = mmembed(d.path()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--dimension: unsupported dimension 65: this model produces [64]"),
            "{stderr}"
        );
        assert!(o.stdout.is_empty());
    }
    assert!(!out.exists() && !d.path().join("o.jsonl.parts").exists());
}

#[test]
fn models_lists_the_demo_as_present() {
    let d = tempfile::tempdir().unwrap();
    let o = run_ok(mmembed(d.path()).args(["models", "--json"]));
    let models: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(models[0]["id"], "mmembed/demo");
    assert_eq!(models[0]["local"], true);
    assert!(
        models
            .iter()
            .any(|m| m["id"] == "openai/clip-vit-base-patch32")
    );
    // Every family has a listed checkpoint.
    for family in ["clip", "siglip", "chinese_clip", "mobileclip"] {
        assert!(
            models.iter().any(|m| m["family"] == family),
            "no {family} model listed"
        );
    }
    let o = run_ok(mmembed(d.path()).arg("--help"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Examples"));
}

#[test]
fn batch_on_the_vertex_backend_against_the_fake_service() {
    let fake = mmembed_vertex::fake::FakeVertex::start().unwrap();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("red-star.png");
    scene(Shape::Star, Colour::Red, 1).save(&img).unwrap();
    std::fs::write(d.path().join("broken.png"), b"nope").unwrap();
    let manifest = d.path().join("objects.jsonl");
    std::fs::write(
        &manifest,
        "{\"uri\": \"red-star.png\", \"label\": \"star\"}\n\
         {\"uri\": \"gs://bucket/cat.jpg\", \"label\": \"cat\"}\n\
         {\"uri\": \"broken.png\", \"label\": 7}\n",
    )
    .unwrap();
    let out = d.path().join("vertex.jsonl");
    let token = "ya29.secret-token-for-the-test";
    let o = mmembed(d.path())
        .env_remove("MMEMBED_MODEL")
        .args(["batch"])
        .arg(&manifest)
        .arg("-o")
        .arg(&out)
        .args([
            "--backend",
            "vertex",
            "--project",
            "test-proj",
            "--dimension",
            "256",
        ])
        .args(["--vertex-url", &fake.url, "--rpm", "6000"])
        .env("MMEMBED_VERTEX_ACCESS_TOKEN", token)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("secret-token"), "{stderr}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 3, "{stderr}");
    for r in &rows {
        assert_eq!(r["model"], "multimodalembedding@001");
        assert_eq!(r["space"], "vertex:multimodalembedding@001");
        assert_eq!(r["dimension"], 256);
        assert!(!r.to_string().contains("secret-token"));
    }
    // Local files are named by their absolute path, remote objects by URI.
    let by_uri = |u: &str| {
        rows.iter()
            .find(|r| r["uri"].as_str().unwrap().ends_with(u))
            .unwrap()
    };
    assert!(
        by_uri("red-star.png")["uri"]
            .as_str()
            .unwrap()
            .starts_with('/')
    );
    assert_eq!(by_uri("red-star.png")["status"], "");
    assert_eq!(by_uri("red-star.png")["label"], "star");
    assert_eq!(
        by_uri("red-star.png")["embedding"]
            .as_array()
            .unwrap()
            .len(),
        256
    );
    assert_eq!(by_uri("gs://bucket/cat.jpg")["status"], "");
    assert_eq!(
        by_uri("broken.png")["label"],
        7,
        "carried values keep their JSON type"
    );
    assert_ne!(by_uri("broken.png")["status"], "");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let sent = fake.requests();
    assert!(
        sent.iter()
            .any(|r| r.body.to_string().contains("gs://bucket/cat.jpg"))
    );

    // Resuming (the broken file is retried) with another size or another
    // model is refused before anything is embedded: one output never holds
    // vectors that cannot be compared.
    let before = std::fs::read(&out).unwrap();
    let resume = |extra: &[&str]| {
        let mut c = mmembed(d.path());
        if extra.contains(&"vertex") {
            c.env_remove("MMEMBED_MODEL");
        }
        c.args(["batch"])
            .arg(&manifest)
            .arg("-o")
            .arg(&out)
            .arg("--resume")
            .args(extra)
            .args(["--vertex-url", &fake.url, "--rpm", "6000"])
            .env("MMEMBED_VERTEX_ACCESS_TOKEN", token)
            .output()
            .unwrap()
    };
    let sent_before = fake.requests().len();
    let vertex = ["--backend", "vertex", "--project", "test-proj"];
    let o = resume(&[&vertex[..], &["--dimension", "512"]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "holds 2 vectors of model `multimodalembedding@001` in space \
             vertex:multimodalembedding@001 at dimension 256"
        ) && stderr.contains("at dimension 512"),
        "{stderr}"
    );
    let o = resume(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("this run embeds with `demo` into space clip-blake3:"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "the output is untouched"
    );
    assert_eq!(fake.requests().len(), sent_before, "nothing was sent");
    // The same model and size go on.
    let o = resume(&[&vertex[..], &["--dimension", "256"]].concat());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the broken file fails again: {stderr}"
    );
    assert_eq!(read_jsonl(&out).len(), 3);

    // Searching Vertex rows with the default local backend says what to do.
    let o = mmembed(d.path())
        .env_remove("MMEMBED_MODEL")
        .args(["search", "a star", "--in"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--backend vertex"));
}

#[test]
fn backend_specs_combine_backends_and_refuse_mixed_spaces() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("red-star.png");
    scene(Shape::Star, Colour::Red, 1).save(&img).unwrap();
    let o = run_ok(
        mmembed(d.path())
            .args([
                "embed",
                "--backend",
                "fallback(local:demo?device=cpu, local:demo)?failure_threshold=2",
            ])
            .arg(&img),
    );
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["backend"], "local");
    assert!(line["space"].as_str().unwrap().starts_with("clip-blake3:"));

    let toml = d.path().join("hybrid.toml");
    std::fs::write(
        &toml,
        "kind = 'fallback'\n[primary]\nkind = 'local'\nmodel = 'demo'\n\
         [secondary]\nkind = 'vertex'\nproject = 'p'\nbase_url = 'http://127.0.0.1:9'\n",
    )
    .unwrap();
    let o = mmembed(d.path())
        .args(["embed", "--text", "a red star", "--backend"])
        .arg(&toml)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("not comparable"), "{stderr}");

    let o = mmembed(d.path())
        .args(["embed", "--text", "x", "--backend", "fallback(local:demo)"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("two backends"));
}

#[test]
fn bench_compares_backends_and_writes_csv_and_svg() {
    let d = tempfile::tempdir().unwrap();
    let (csv, svg) = (d.path().join("b.csv"), d.path().join("b.svg"));
    let o = run_ok(
        mmembed(d.path())
            .args(["bench", "local:demo?device=cpu", "--fake-vertex-ms", "5"])
            .args([
                "--workloads",
                "text:1,image:2",
                "--iterations",
                "3",
                "--warmup",
                "1",
            ])
            .arg("--csv")
            .arg(&csv)
            .arg("--svg")
            .arg(&svg),
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("p50 ms") && table.contains("vertex-fake+5ms"),
        "{table}"
    );
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&csv)
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 4, "2 backends x 2 workloads");
    for r in &rows {
        assert_eq!(&r[2], "3", "{r:?}");
        assert!(r[3].parse::<f64>().unwrap() > 0.0);
        assert_eq!(&r[7], "", "no error: {r:?}");
    }
    // The fake answers after 5 ms: its p50 cannot be below that.
    let fake = rows
        .iter()
        .find(|r| r[0].starts_with("vertex-fake"))
        .unwrap();
    assert!(fake[3].parse::<f64>().unwrap() >= 5.0, "{fake:?}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("image x2"));
}

/// One HTTP/1.1 exchange on loopback; returns the status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

#[test]
fn serve_follows_the_vertex_custom_container_variables() {
    use std::io::BufRead;
    let cache = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let mut c = mmembed(cache.path());
    c.env_remove("MMEMBED_MODEL")
        .env("AIP_HTTP_PORT", "0")
        .env("AIP_PREDICT_ROUTE", "/v1/models/demo:predict")
        .env("AIP_HEALTH_ROUTE", "/ping")
        .env("AIP_DEPLOYED_MODEL_ID", "42")
        .env("AIP_STORAGE_URI", demo.to_str().unwrap())
        .args(["serve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // AIP_HTTP_PORT set: all interfaces, as the contract requires.
    let port: u16 = line
        .trim()
        .strip_prefix("listening on http://0.0.0.0:")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let mut healthy = false;
    for _ in 0..600 {
        if matches!(http(port, "GET", "/ping", ""), Ok((200, _))) {
            healthy = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(healthy, "never healthy on /ping");
    let (status, body) = http(
        port,
        "POST",
        "/v1/models/demo:predict",
        r#"{"instances": [{"text": "a red star"}]}"#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["deployedModelId"], "42");
    assert_eq!(
        v["predictions"][0]["textEmbedding"]
            .as_array()
            .unwrap()
            .len(),
        64
    );
    // SIGTERM: a clean stop.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(child.wait().unwrap().success());

    // A bucket as the model location is refused with a clear message.
    let out = mmembed(cache.path())
        .env_remove("MMEMBED_MODEL")
        .env("AIP_STORAGE_URI", "gs://bucket/models/clip")
        .args(["serve", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AIP_STORAGE_URI is `gs://bucket/models/clip`"),
        "{err}"
    );
}
