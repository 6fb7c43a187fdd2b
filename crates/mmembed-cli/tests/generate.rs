//! `mmembed generate`, `classify` and `score` as a user runs them: the
//! real binary over tables and media folders, on the bundled demo model
//! (classify/score, offline), the fake Gemini service and the fake
//! OpenAI-compatible and Ollama servers.

use std::path::Path;
use std::process::{Command, Output};

use arrow_schema::DataType;
use mmembed_llm::fake::{Behaviour as LlmBehaviour, FakeLlm};
use mmembed_shapes::{Colour, Scene, Shape};
use mmembed_vertex::fake::{Behaviour, FakeVertex};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Value, json};

const TOKEN: &str = "ya29.cli-token-that-must-never-leak";

fn mmembed(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mmembed"));
    for (k, _) in std::env::vars() {
        if k.starts_with("MMEMBED_") || k.starts_with("GOOGLE_CLOUD_") {
            c.env_remove(k);
        }
    }
    c.env("MMEMBED_CACHE_DIR", cache)
        .env("MMEMBED_DEVICE", "cpu")
        .env("MMEMBED_VERTEX_ACCESS_TOKEN", TOKEN)
        .env("HF_HUB_OFFLINE", "1");
    c
}

fn run(c: &mut Command) -> (bool, String) {
    let out: Output = c.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains(TOKEN), "token printed: {stderr}");
    (out.status.success(), stderr)
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn gemini(fake: &FakeVertex) -> String {
    format!(
        "gemini:test-proj/us-central1?base_url={}&max_attempts=2&rpm=60000&concurrency=1",
        fake.url
    )
}

/// Images of known scenes, a manifest naming them, and broken files.
fn media(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("media");
    std::fs::create_dir_all(&root).unwrap();
    for (i, (shape, colour)) in [
        (Shape::Star, Colour::Red),
        (Shape::Square, Colour::Blue),
        (Shape::Circle, Colour::Green),
    ]
    .into_iter()
    .enumerate()
    {
        Scene::sample(shape, colour, i as u64)
            .save(root.join(format!("{}-{}.png", colour.name(), shape.name())))
            .unwrap();
    }
    std::fs::write(root.join("garbage.png"), b"not a png").unwrap();
    std::fs::write(root.join("notes.txt"), b"hello").unwrap();
    root
}

#[test]
fn classify_and_score_on_the_demo_model_offline() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let out = d.path().join("labels.jsonl");
    let (ok, err) = run(mmembed(d.path())
        .args([
            "classify",
            "--model",
            "demo",
            "--labels",
            "red star,blue square,green circle",
            "--label-template",
            "a {}",
        ])
        .arg(&root)
        .arg("-o")
        .arg(&out));
    assert!(
        !ok,
        "broken files fail their rows, so the exit status says so: {err}"
    );
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 5, "{rows:?}");
    let by = |name: &str| {
        rows.iter()
            .find(|r| r["uri"].as_str().unwrap().ends_with(name))
            .unwrap()
            .clone()
    };
    for (file, label) in [
        ("red-star.png", "red star"),
        ("blue-square.png", "blue square"),
        ("green-circle.png", "green circle"),
    ] {
        let r = by(file);
        assert_eq!(r["result"], label, "{r}");
        assert_eq!(r["status"], "");
        assert_eq!(r["content_type"], "image/png");
        let full: Value = serde_json::from_str(r["full_response"].as_str().unwrap()).unwrap();
        let p = full["probabilities"][label].as_f64().unwrap();
        assert!(p > 0.34, "{full}");
    }
    assert!(
        by("garbage.png")["status"]
            .as_str()
            .unwrap()
            .contains("cannot decode")
    );
    assert!(by("garbage.png")["result"].is_null());
    assert!(
        by("notes.txt")["status"]
            .as_str()
            .unwrap()
            .contains("not an image or video")
    );

    // Score: the red star scores highest against "a red star".
    let out = d.path().join("scores.parquet");
    run(mmembed(d.path())
        .args(["score", "--model", "demo", "--text", "a red star"])
        .arg(&root)
        .arg("-o")
        .arg(&out));
    let file = std::fs::File::open(&out).unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    assert_eq!(
        b.schema().field_with_name("result").unwrap().data_type(),
        &DataType::Float64
    );
    let rows: Vec<Value> = b
        .build()
        .unwrap()
        .flat_map(|batch| {
            let batch = batch.unwrap();
            let mut w = arrow_json::ArrayWriter::new(Vec::new());
            w.write(&batch).unwrap();
            w.finish().unwrap();
            serde_json::from_slice::<Vec<Value>>(&w.into_inner()).unwrap()
        })
        .collect();
    let best = rows
        .iter()
        .filter(|r| r.get("result").is_some_and(Value::is_f64))
        .max_by(|a, b| {
            a["result"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["result"].as_f64().unwrap())
        })
        .unwrap();
    assert!(
        best["uri"].as_str().unwrap().ends_with("red-star.png"),
        "{rows:?}"
    );

    // Resuming with another text is refused (the Parquet output records
    // it); with the same one the job goes on.
    let before = std::fs::read(&out).unwrap();
    let score = |text: &str| {
        run(mmembed(d.path())
            .args(["score", "--model", "demo", "--resume", "--text", text])
            .arg(&root)
            .arg("-o")
            .arg(&out))
    };
    let (ok, err) = score("a blue square");
    assert!(
        !ok && err.contains("was made with text \"a red star\" (now \"a blue square\")"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let (_, err) = score("a red star");
    assert!(err.contains("keeping 5 rows already done"), "{err}");
}

#[test]
fn generate_on_gemini_with_typed_columns_statuses_and_resume() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let manifest = d.path().join("cities.jsonl");
    std::fs::write(
        &manifest,
        format!(
            "{{\"state\": \"Washington\", \"photo\": \"{}\", \"n\": 1}}\n{{\"state\": \"Oregon\", \"photo\": \"media/blue-square.png\", \"n\": 2}}\n{{\"state\": \"Nevada\", \"photo\": null, \"n\": 3}}\n",
            root.join("red-star.png").display()
        ),
    )
    .unwrap();
    let fake = FakeVertex::start().unwrap();
    let out = d.path().join("out.parquet");
    let generate = |extra: &[&str]| {
        let mut c = mmembed(d.path());
        c.arg("generate")
            .arg(&manifest)
            .arg("-o")
            .arg(&out)
            .args(["-g", &gemini(&fake)])
            .args(["--prompt", "Capital of {state}? See {@photo}", "--output-schema"])
            .arg("capital STRING, population INT64, share FLOAT64, coastal BOOL, cities ARRAY<STRING>, loc STRUCT<lat FLOAT64>")
            .args(["--model-params", r#"{"generation_config": {"temperature": 0}}"#])
            .args(extra);
        c
    };
    // Row 1: a 429, retried; row 3 names no media.
    fake.push(Behaviour::Status {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        retry_after: Some("0"),
    });
    let (ok, err) = run(&mut generate(&[]));
    assert!(!ok, "the media-less row and the blocked one failed: {err}");
    let file = std::fs::File::open(&out).unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = b.schema().clone();
    let types: Vec<(String, String)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), format!("{:?}", f.data_type())))
        .collect();
    let ty = |n: &str| types.iter().find(|t| t.0 == n).unwrap().1.clone();
    assert_eq!(ty("population"), "Int64");
    assert_eq!(ty("share"), "Float64");
    assert_eq!(ty("coastal"), "Boolean");
    assert!(ty("cities").starts_with("List"), "{}", ty("cities"));
    assert!(ty("loc").starts_with("Struct"), "{}", ty("loc"));
    assert_eq!(ty("n"), "Int64", "input columns keep their types");
    let names: Vec<&str> = types.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "state",
            "photo",
            "n",
            "capital",
            "population",
            "share",
            "coastal",
            "cities",
            "loc",
            "full_response",
            "status"
        ]
    );

    let rows: Vec<Value> = b
        .build()
        .unwrap()
        .flat_map(|batch| {
            let mut w = arrow_json::ArrayWriter::new(Vec::new());
            w.write(&batch.unwrap()).unwrap();
            w.finish().unwrap();
            serde_json::from_slice::<Vec<Value>>(&w.into_inner()).unwrap()
        })
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["state"], "Washington");
    assert_eq!(rows[0]["status"], "");
    assert_eq!(rows[0]["population"], 2);
    assert_eq!(rows[0]["share"], 2.0);
    assert_eq!(rows[0]["cities"], json!(["fake"]));
    assert!(
        rows[2]["status"]
            .as_str()
            .unwrap()
            .contains("names no media"),
        "{}",
        rows[2]
    );
    // The requests: text and media in order, params merged, relative paths
    // from the manifest's folder.
    let sent: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(":generateContent"))
        .collect();
    assert_eq!(sent.len(), 3, "429 retried once, two rows sent");
    let parts = &sent[0].body["contents"][0]["parts"];
    assert_eq!(parts[0]["text"], "Capital of Washington? See ");
    assert_eq!(parts[1]["inlineData"]["mimeType"], "image/png");
    assert_eq!(sent[0].body["generationConfig"]["temperature"], 0);

    // A second run without --resume refuses; with it, nothing is redone.
    let (ok, err) = run(&mut generate(&[]));
    assert!(!ok && err.contains("--resume"), "{err}");
    let before = fake.request_count();
    run(&mut generate(&["--resume"]));
    assert_eq!(fake.request_count(), before, "done rows are kept");

    // Retryable failures are retried by --resume; final ones are kept.
    let out2 = d.path().join("out2.jsonl");
    let g2 = |extra: &[&str]| {
        let mut c = mmembed(d.path());
        c.arg("generate")
            .arg(&manifest)
            .arg("-o")
            .arg(&out2)
            .args(["-g", &gemini(&fake)])
            .args(["--prompt", "Population of {state}?", "--returns", "double"])
            .args(extra);
        c
    };
    for _ in 0..2 {
        fake.push(Behaviour::Status {
            code: 503,
            status: "UNAVAILABLE",
            retry_after: Some("0"),
        });
    }
    fake.push(Behaviour::Reply(
        json!({"promptFeedback": {"blockReason": "SAFETY"}}).to_string(),
    ));
    run(&mut g2(&[]));
    let rows = read_jsonl(&out2);
    assert!(
        rows[0]["status"]
            .as_str()
            .unwrap()
            .starts_with("A retryable error occurred: "),
        "{}",
        rows[0]
    );
    assert_eq!(rows[1]["status"], "blocked: SAFETY");
    assert_eq!(rows[2]["result"], 2.0);
    let before = fake.request_count();
    let (ok, _) = run(&mut g2(&["--resume"]));
    assert!(!ok, "the blocked row stays failed");
    assert_eq!(
        fake.request_count(),
        before + 1,
        "only the retryable row ran again"
    );
    let rows = read_jsonl(&out2);
    assert_eq!(rows[0]["result"], 2.0);
    assert_eq!(rows[0]["status"], "");
    assert_eq!(rows[1]["status"], "blocked: SAFETY");
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows.iter()
            .map(|r| r["state"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["Washington", "Oregon", "Nevada"]
    );
}

#[test]
fn generate_on_local_llm_servers_and_fallback() {
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    let llm = FakeLlm::start().unwrap();
    let out = d.path().join("captions.jsonl");
    // An object table (a folder) with a media prompt on an OpenAI-compatible server.
    let (ok, err) = run(mmembed(d.path())
        .arg("generate")
        .arg(&root)
        .arg("-o")
        .arg(&out)
        .args(["-g", &format!("openai:{}?model=qwen", llm.url)])
        .args(["--prompt", "Describe {@uri}.", "--returns", "bool"]));
    assert!(!ok, "broken files fail: {err}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 5);
    let star = rows
        .iter()
        .find(|r| r["uri"].as_str().unwrap().ends_with("red-star.png"))
        .unwrap();
    assert_eq!(star["result"], true);
    assert_eq!(star["status"], "");
    let garbage = rows
        .iter()
        .find(|r| r["uri"].as_str().unwrap().ends_with("garbage.png"))
        .unwrap();
    assert!(
        garbage["status"]
            .as_str()
            .unwrap()
            .contains("not a recognised image"),
        "{garbage}"
    );
    let sent = llm.requests();
    assert!(sent.iter().all(|r| r.path == "/v1/chat/completions"));
    assert_eq!(
        sent[0].body["response_format"]["json_schema"]["schema"]["properties"]["result"]["type"],
        "boolean"
    );

    // Ollama down (500s): the fallback answers from Gemini.
    let fake = FakeVertex::start().unwrap();
    let csv = d.path().join("q.csv");
    std::fs::write(&csv, "q\nWhy is the sky blue?\n").unwrap();
    for _ in 0..2 {
        llm.push(LlmBehaviour::Status {
            code: 500,
            body: json!({"error": "boom"}).to_string(),
            retry_after: None,
        });
    }
    let out = d.path().join("answers.jsonl");
    let (ok, err) = run(mmembed(d.path())
        .arg("generate")
        .arg(&csv)
        .arg("-o")
        .arg(&out)
        .args([
            "-g",
            &format!(
                "fallback(ollama:{}?model=gemma3&max_attempts=2, {})",
                llm.url,
                gemini(&fake)
            ),
        ])
        .args(["--prompt", "{q}"]));
    assert!(ok, "{err}");
    let rows = read_jsonl(&out);
    assert_eq!(
        rows[0]["result"],
        "You asked: Why is the sky blue? (0 media)"
    );
    assert_eq!(rows[0]["q"], "Why is the sky blue?");

    // Mistakes are named before any request.
    let (ok, err) = run(mmembed(d.path()).arg("generate").arg(&csv).args([
        "-o",
        "x.jsonl",
        "-g",
        "gemini:p?base_url=http://127.0.0.1:9",
        "--prompt",
        "{nope}",
    ]));
    assert!(
        !ok && err.contains("column `nope`") && err.contains("it has: q"),
        "{err}"
    );
    let (ok, err) = run(mmembed(d.path()).arg("generate").arg(&csv).args([
        "-o",
        "x.jsonl",
        "-g",
        "gemini:p",
        "--prompt",
        "{q}",
        "--output-schema",
        "a TEXT",
    ]));
    assert!(!ok && err.contains("unknown type `TEXT`"), "{err}");
    let (ok, err) = run(mmembed(d.path())
        .arg("generate")
        .arg(&csv)
        .args(["-o", "x.jsonl", "-g", "claude:x", "--prompt", "{q}"]));
    assert!(!ok && err.contains("unknown backend `claude`"), "{err}");
}

#[test]
fn parquet_tables_and_classify_score_on_gemini() {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch, StringArray};
    let d = tempfile::tempdir().unwrap();
    let root = media(d.path());
    // A Parquet table: its column types survive into the output.
    let table = d.path().join("items.parquet");
    let batch = RecordBatch::try_from_iter([
        (
            "name",
            Arc::new(StringArray::from(vec!["apple", "pear"])) as arrow_array::ArrayRef,
        ),
        (
            "qty",
            Arc::new(Int64Array::from(vec![3, 5])) as arrow_array::ArrayRef,
        ),
    ])
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&table).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let fake = FakeVertex::start().unwrap();
    let spec = format!("gemini:test-proj/us-central1?base_url={}", fake.url);
    let out = d.path().join("prices.jsonl");
    let (ok, err) = run(mmembed(d.path())
        .arg("generate")
        .arg(&table)
        .arg("-o")
        .arg(&out)
        .args(["-g", &spec, "--concurrency", "1", "--max-attempts", "1"])
        .args(["--prompt", "Price of {qty} {name}s?", "--returns", "int"]));
    assert!(ok, "{err}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0]["name"].clone(),
            rows[0]["qty"].clone(),
            rows[0]["result"].clone()
        ),
        (json!("apple"), json!(3), json!(2))
    );
    assert_eq!(
        fake.requests()[1].body["contents"][0]["parts"][0]["text"],
        "Price of 5 pears?"
    );
    // A Parquet output records the prompt: resuming with another is refused.
    let pq = d.path().join("prices.parquet");
    let generate = |prompt: &str, extra: &[&str]| {
        run(mmembed(d.path())
            .arg("generate")
            .arg(&table)
            .arg("-o")
            .arg(&pq)
            .args(["-g", &spec, "--max-attempts", "1", "--returns", "int"])
            .args(["--prompt", prompt])
            .args(extra))
    };
    assert!(generate("Price of {qty} {name}s?", &[]).0);
    let (ok, err) = generate("Cost of {qty} {name}s?", &["--resume"]);
    assert!(
        !ok && err.contains("made with prompt \"Price of {qty} {name}s?\" (now \"Cost of"),
        "{err}"
    );
    let (ok, err) = generate("Price of {qty} {name}s?", &["--resume"]);
    assert!(
        ok && err.contains("keeping 2 rows already done; running 0"),
        "{err}"
    );

    // An input column named like an output column is refused, naming it.
    let (ok, err) = run(mmembed(d.path()).arg("generate").arg(&out).args([
        "-o",
        "again.jsonl",
        "-g",
        &spec,
        "--prompt",
        "{name}",
    ]));
    assert!(
        !ok && err.contains("column `result`") && err.contains("rename"),
        "{err}"
    );

    // classify and score on a generator: enum and number schemas, same rows.
    let labels = d.path().join("g-labels.jsonl");
    let (ok, _) = run(mmembed(d.path())
        .args(["classify", "--labels", "star,square", "-g", &spec])
        .arg(&root)
        .arg("-o")
        .arg(&labels));
    assert!(!ok, "the broken files fail");
    let rows = read_jsonl(&labels);
    assert_eq!(rows.len(), 5);
    let star = rows
        .iter()
        .find(|r| r["uri"].as_str().unwrap().ends_with("red-star.png"))
        .unwrap();
    assert_eq!(
        star["result"], "star",
        "the fake answers the first allowed value"
    );
    assert!(star["video_start_sec"].is_null());
    let sent = fake.requests();
    let classify_req = sent
        .iter()
        .rev()
        .find(|r| !r.body["generationConfig"]["responseSchema"].is_null())
        .unwrap();
    assert_eq!(
        classify_req.body["generationConfig"]["responseSchema"]["properties"]["result"]["enum"],
        json!(["star", "square"])
    );
    let scores = d.path().join("g-scores.jsonl");
    run(mmembed(d.path())
        .args(["score", "--text", "a red star", "-g", &spec])
        .arg(&root)
        .arg("-o")
        .arg(&scores));
    let rows = read_jsonl(&scores);
    let star = rows
        .iter()
        .find(|r| r["uri"].as_str().unwrap().ends_with("red-star.png"))
        .unwrap();
    assert_eq!(star["result"], 2.0);
    assert_eq!(star["status"], "");
}

#[test]
fn repeated_rows_are_answered_once_and_the_output_keeps_the_input_order() {
    let d = tempfile::tempdir().unwrap();
    let llm = FakeLlm::start().unwrap();
    let csv = d.path().join("q.csv");
    let out = d.path().join("answers.jsonl");
    let generate = |extra: &[&str]| {
        run(mmembed(d.path())
            .arg("generate")
            .arg(&csv)
            .arg("-o")
            .arg(&out)
            .args(["-g", &format!("openai:{}?model=qwen", llm.url)])
            .args(["--prompt", "{q}", "--chunk-rows", "1"])
            .args(extra))
    };
    let asked = |rows: &[Value]| -> Vec<String> {
        rows.iter()
            .map(|r| r["q"].as_str().unwrap().to_string())
            .collect()
    };
    std::fs::write(&csv, "q\none\ntwo\none\nthree\n").unwrap();
    let (ok, err) = generate(&[]);
    assert!(ok, "{err}");
    assert!(err.contains("answered once"), "{err}");
    assert_eq!(asked(&read_jsonl(&out)), ["one", "two", "three"]);
    assert_eq!(llm.requests().len(), 3);
    assert_eq!(read_jsonl(&out)[2]["result"], "You asked: three (0 images)");

    // The input reordered, with a new row: only that row is asked, and the
    // output follows the new order (the earlier output, out of that
    // order, is read whole).
    std::fs::write(&csv, "q\nthree\nfour\none\ntwo\n").unwrap();
    let (ok, err) = generate(&["--resume"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("keeping 3 rows already done; running 1"),
        "{err}"
    );
    assert_eq!(llm.requests().len(), 4);
    assert_eq!(asked(&read_jsonl(&out)), ["three", "four", "one", "two"]);
    assert_eq!(read_jsonl(&out)[1]["result"], "You asked: four (0 images)");

    // Rows taken out of the input leave the output, and the job says so.
    std::fs::write(&csv, "q\nfour\ntwo\n").unwrap();
    let (ok, err) = generate(&["--resume"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("dropping the rows of 2 earlier input rows the input no longer has"),
        "{err}"
    );
    assert_eq!(llm.requests().len(), 4);
    assert_eq!(asked(&read_jsonl(&out)), ["four", "two"]);

    // Another input's columns: resuming is refused, naming the output.
    std::fs::write(&csv, "q,lang\nthree,en\n").unwrap();
    let (ok, err) = generate(&["--resume"]);
    assert!(
        !ok && err.contains("other columns") && err.contains("answers.jsonl"),
        "{err}"
    );
    assert_eq!(llm.requests().len(), 4);
}
