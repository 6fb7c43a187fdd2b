//! The store layer against real protocol servers on loopback: moto's S3
//! server, gcp-storage-emulator's GCS JSON API and Azurite's Blob service
//! (Microsoft's emulator), started by `scripts/test.sh` (which sets
//! `MMEMBED_TEST_S3`, `MMEMBED_TEST_GCS` and `MMEMBED_TEST_AZURE` to their
//! endpoints, with a bucket or container `mmembed-test` in each).
//!
//! Without the variables the tests say so and pass, except under `CI=true`
//! where a missing emulator is an error.

use bytes::Bytes;
use mmembed_store::{PutMode, StoreError, StoreOptions, Stores};

fn endpoint(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set: scripts/test.sh starts the emulators and sets it")
        }
        _ => {
            eprintln!("{var} not set; skipping (scripts/test.sh starts the emulators)");
            None
        }
    }
}

fn stores(gcs: Option<String>) -> Stores {
    Stores::new(StoreOptions {
        gcs_endpoint: gcs,
        initial_backoff: std::time::Duration::from_millis(10),
        ..StoreOptions::default()
    })
}

/// Uploads a file of `size` seeded bytes in pieces of `chunk` and
/// downloads it back to a file, both streamed: the same bytes, and the
/// object's size and type as uploaded; a smaller file goes in one put.
async fn files_both_ways(s: &Stores, base: &str, size: usize) {
    let d = tempfile::tempdir().unwrap();
    let mut rng = fastrand::Rng::with_seed(size as u64);
    let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
    let (up, down) = (d.path().join("up.bin"), d.path().join("down.bin"));
    std::fs::write(&up, &data).unwrap();
    let uri = format!("{base}/files-{}/big.parquet", fastrand::u64(..));
    s.upload(&uri, &up, "application/vnd.apache.parquet")
        .await
        .unwrap();
    let info = s.download(&uri, &down).await.unwrap();
    assert_eq!(info.size, size as u64);
    assert!(
        std::fs::read(&down).unwrap() == data,
        "{uri}: the bytes differ"
    );
    // A second upload replaces the object whole.
    std::fs::write(&up, b"small").unwrap();
    s.upload(&uri, &up, "application/octet-stream")
        .await
        .unwrap();
    s.download(&uri, &down).await.unwrap();
    assert_eq!(std::fs::read(&down).unwrap(), b"small");
    let e = s
        .upload(&uri, &d.path().join("missing"), "x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

fn s3_env(endpoint: &str) {
    // SAFETY: every test of this file sets the same values before any store
    // is built; nothing reads them concurrently with a different value.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", endpoint);
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret-never-printed");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
}

/// Azurite's endpoint for `object_store`'s emulator mode (its well-known
/// account and key).
fn azure_env(endpoint: &str) {
    // SAFETY: as in `s3_env`.
    unsafe {
        std::env::set_var("AZURE_STORAGE_USE_EMULATOR", "true");
        std::env::set_var("AZURITE_BLOB_STORAGE_URL", endpoint);
    }
}

async fn round_trip(s: &Stores, base: &str) {
    let run = format!("{base}/rt-{}", fastrand::u64(..));
    for (k, body) in [
        ("a/1.png", "one"),
        ("a/2.jpg", "two!"),
        ("a/.hidden/x.png", "h"),
        ("b/3.png", "3"),
    ] {
        s.put(
            &format!("{run}/{k}"),
            Bytes::from(body),
            "image/png",
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    }
    let all = s.list(&format!("{run}/")).await.unwrap();
    let names: Vec<_> = all
        .iter()
        .map(|o| o.uri.strip_prefix(&run).unwrap().to_string())
        .collect();
    assert_eq!(names, ["/a/1.png", "/a/2.jpg", "/b/3.png"]);
    assert_eq!(all[1].size, 4);
    assert!(
        all.iter()
            .all(|o| o.updated.is_some() && (o.etag.is_some() || o.generation.is_some()))
    );
    let globbed = s.list(&format!("{run}/**/*.png")).await.unwrap();
    assert_eq!(globbed.len(), 2, "{globbed:?}");
    let one = s.list(&format!("{run}/a/2.jpg")).await.unwrap();
    assert_eq!(one.len(), 1);

    let (bytes, info) = s.read(&format!("{run}/a/2.jpg"), 100).await.unwrap();
    assert_eq!(&bytes[..], b"two!");
    assert_eq!(info.size, 4);
    // A listing and a HEAD give one object one identity (Azure's listings
    // leave out the ETag's quotes).
    assert_eq!(
        (&info.etag, &info.generation, info.size, info.updated),
        (
            &all[1].etag,
            &all[1].generation,
            all[1].size,
            all[1].updated
        )
    );
    let e = s.read(&format!("{run}/a/2.jpg"), 3).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::TooLarge {
                size: 4,
                limit: 3,
                ..
            }
        ),
        "{e}"
    );
    let e = s
        .read(&format!("{run}/missing.png"), 100)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");

    // Rewriting changes the identity.
    s.put(
        &format!("{run}/a/2.jpg"),
        Bytes::from("changed"),
        "image/jpeg",
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    let again = s.head(&format!("{run}/a/2.jpg")).await.unwrap();
    assert_ne!(
        (&again.etag, &again.generation),
        (&info.etag, &info.generation)
    );

    s.delete(&format!("{run}/a/1.png")).await.unwrap();
    s.delete(&format!("{run}/a/1.png")).await.unwrap();
    assert!(!s.exists(&format!("{run}/a/1.png")).await.unwrap());
}

#[tokio::test]
async fn s3_on_moto() {
    let Some(ep) = endpoint("MMEMBED_TEST_S3") else {
        return;
    };
    s3_env(&ep);
    let s = stores(None);
    round_trip(&s, "s3://mmembed-test").await;
    // 12 MiB in 5 MiB parts (S3's smallest): a multipart upload of three.
    let parts = Stores::new(StoreOptions {
        upload_chunk: 5 << 20,
        ..StoreOptions::default()
    });
    files_both_ways(&parts, "s3://mmembed-test", (12 << 20) + 123).await;
    // Create-if-absent is atomic on S3 (If-None-Match: *).
    let k = format!("s3://mmembed-test/lock-{}", fastrand::u64(..));
    s.put(&k, Bytes::from("a"), "application/json", PutMode::Create)
        .await
        .unwrap();
    let e = s
        .put(&k, Bytes::from("b"), "application/json", PutMode::Create)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    let e = format!(
        "{:?} {}",
        s.read("s3://no-such-bucket-x/k", 10).await.unwrap_err(),
        ""
    );
    assert!(!e.contains("test-secret-never-printed"), "{e}");
}

#[tokio::test]
async fn gcs_on_the_emulator() {
    let Some(ep) = endpoint("MMEMBED_TEST_GCS") else {
        return;
    };
    let s = stores(Some(ep.clone()));
    round_trip(&s, "gs://mmembed-test").await;
    // 1.3 MB in 256 KiB pieces: a resumable upload of six, each answered
    // 308 with the bytes held but the last.
    let pieces = |endpoint: String| {
        Stores::new(StoreOptions {
            gcs_endpoint: Some(endpoint),
            upload_chunk: 256 << 10,
            initial_backoff: std::time::Duration::from_millis(10),
            ..StoreOptions::default()
        })
    };
    files_both_ways(&pieces(ep.clone()), "gs://mmembed-test", 1_300_000).await;
    // Through a proxy that answers every third request 503 (the session's
    // pieces too): each fault is followed by a question for the bytes held,
    // and the upload goes on from there.
    let proxy = mmembed_store::testkit::FaultProxy::start(
        &ep,
        mmembed_store::testkit::Faults {
            unavailable: Some((3, 1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    files_both_ways(&pieces(proxy.url.clone()), "gs://mmembed-test", 1_300_000).await;
    assert!(
        proxy
            .stats
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    let all = s.list("gs://mmembed-test/").await.unwrap();
    assert!(
        all.iter().all(|o| o.generation.is_some()),
        "GCS listings carry generations"
    );
}

#[tokio::test]
async fn azure_on_azurite() {
    let Some(ep) = endpoint("MMEMBED_TEST_AZURE") else {
        return;
    };
    azure_env(&ep);
    let s = stores(None);
    round_trip(&s, "az://mmembed-test").await;
    // 11 MiB in 5 MiB blocks (the smallest piece, S3's, applies to every
    // store but GCS): a block blob of three, committed at the end.
    let blocks = Stores::new(StoreOptions {
        upload_chunk: 1 << 20,
        ..StoreOptions::default()
    });
    files_both_ways(&blocks, "az://mmembed-test", (11 << 20) + 7).await;
    // Through a proxy that answers every third request 503: the blocks and
    // the block list are sent again.
    let proxy = mmembed_store::testkit::FaultProxy::start(
        &ep,
        mmembed_store::testkit::Faults {
            unavailable: Some((3, 1)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    azure_env(&proxy.url);
    let faulty = Stores::new(StoreOptions {
        upload_chunk: 1 << 20,
        initial_backoff: std::time::Duration::from_millis(10),
        ..StoreOptions::default()
    });
    files_both_ways(&faulty, "az://mmembed-test", (11 << 20) + 7).await;
    assert!(
        proxy
            .stats
            .unavailable
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    azure_env(&ep);
    // Create-if-absent is atomic (If-None-Match: *): the output lock.
    let k = format!("az://mmembed-test/lock-{}", fastrand::u64(..));
    s.put(&k, Bytes::from("a"), "application/json", PutMode::Create)
        .await
        .unwrap();
    let e = s
        .put(&k, Bytes::from("b"), "application/json", PutMode::Create)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    let e = s.read("az://no-such-container/k", 10).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    assert!(!format!("{e:?}").contains("Eby8vdM02x"), "{e:?}");
}
