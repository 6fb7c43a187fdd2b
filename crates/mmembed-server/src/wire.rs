//! The `multimodalembedding@001` predict body, server side: instances and
//! parameters in, predictions out (shared/VERTEX.md, SERVE.md). The same
//! functions serve REST (JSON) and gRPC (`google.protobuf.Value`, converted
//! to JSON values first), so both transports accept exactly the same
//! requests.
//!
//! The client side of this format lives in `mmembed-vertex` (it builds
//! requests and reads answers: the other direction, with other checks);
//! what the two share, the segment semantics and validation, is
//! `mmembed-core`'s.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use mmembed_core::{EmbedRequest, Embeddings, Media, MediaSource, VideoInput, VideoSegmentConfig};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Standard base64, padded or not (clients differ).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parses a REST body: `{"instances": [...], "parameters": {...}}`.
///
/// Never panics, whatever the bytes (fuzzed: `fuzz/fuzz_targets/predict_body.rs`).
///
/// ```
/// let body = br#"{"instances": [{"text": "a cat"}], "parameters": {"dimension": 512.0}}"#;
/// let reqs = mmembed_server::wire::parse_predict_body(body, 8).unwrap();
/// assert_eq!(reqs[0].text.as_deref(), Some("a cat"));
/// assert_eq!(reqs[0].dimension, Some(512));
/// ```
pub fn parse_predict_body(
    body: &[u8],
    max_instances: usize,
) -> Result<Vec<EmbedRequest>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Invalid JSON payload received: {e}")))?;
    let Value::Object(mut top) = v else {
        return Err(ApiError::invalid(
            "the body must be a JSON object with `instances` (and optional `parameters`)",
        ));
    };
    let instances = match top.remove("instances") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("`instances` must be a list")),
        None => return Err(ApiError::invalid("the body has no `instances` list")),
    };
    let parameters = top.remove("parameters");
    parse_predict(&instances, parameters.as_ref(), max_instances)
}

/// Parses instances and parameters (REST and gRPC alike) into requests,
/// one per instance, in order.
pub fn parse_predict(
    instances: &[Value],
    parameters: Option<&Value>,
    max_instances: usize,
) -> Result<Vec<EmbedRequest>, ApiError> {
    if instances.is_empty() {
        return Err(ApiError::invalid("`instances` is empty; send at least one"));
    }
    if instances.len() > max_instances {
        return Err(ApiError::invalid(format!(
            "{} instances in one request; this server takes at most {max_instances} \
             (--max-instances)",
            instances.len()
        )));
    }
    let dimension = parse_parameters(parameters)?;
    instances
        .iter()
        .enumerate()
        .map(|(i, v)| {
            parse_instance(v, dimension)
                .map_err(|m| ApiError::invalid(m).at_instance(i, instances.len()))
        })
        .collect()
}

fn parse_parameters(p: Option<&Value>) -> Result<Option<u32>, ApiError> {
    let obj = match p {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(ApiError::invalid("`parameters` must be an object")),
    };
    for k in obj.keys() {
        if k != "dimension" {
            return Err(ApiError::invalid(format!(
                "unknown parameter `{k}`; the only parameter is `dimension`"
            )));
        }
    }
    match obj.get("dimension") {
        None | Some(Value::Null) => Ok(None),
        Some(d) => whole(d, "parameters.dimension")
            .map(Some)
            .map_err(ApiError::invalid),
    }
}

/// A whole, non-negative number that fits a u32. Numbers arrive as doubles
/// (`512.0`: protobuf `Value`s have only doubles), so whole floats count.
fn whole(v: &Value, field: &str) -> Result<u32, String> {
    let Some(f) = v.as_f64() else {
        return Err(format!("`{field}` must be a number, got {}", kind(v)));
    };
    if !(f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= f64::from(u32::MAX)) {
        return Err(format!("`{field}` must be a whole number >= 0, got {f}"));
    }
    Ok(f as u32)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("`{field}` must be an object, got {}", kind(v)))
}

fn no_unknown(obj: &Map<String, Value>, field: &str, known: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown field `{field}.{k}`; expected one of {}",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// Refuses a request with an instance whose video asks for more than
/// `max_sec` seconds (`endOffsetSec - startOffsetSec`, Vertex's defaults
/// filled in: a missing start or end makes a span of at most 120 s), before
/// anything is decoded: each second asked for costs a decode per sample
/// time, whatever the video's real length (a crafted header can claim any).
///
/// ```
/// let body = br#"{"instances": [{"video": {"gcsUri": "gs://b/v.mp4",
///     "videoSegmentConfig": {"startOffsetSec": 0, "endOffsetSec": 600}}}]}"#;
/// let reqs = mmembed_server::wire::parse_predict_body(body, 8).unwrap();
/// let e = mmembed_server::wire::check_video_spans(&reqs, 120).unwrap_err();
/// assert!(e.to_string().contains("600 s of video"), "{e}");
/// assert!(mmembed_server::wire::check_video_spans(&reqs, 600).is_ok());
/// ```
pub fn check_video_spans(reqs: &[EmbedRequest], max_sec: u32) -> Result<(), ApiError> {
    for (i, r) in reqs.iter().enumerate() {
        let Some(v) = &r.video else { continue };
        let range = v
            .segment_config
            .unwrap_or_default()
            .range()
            .map_err(|e| ApiError::invalid(e.to_string()).at_instance(i, reqs.len()))?;
        let span = range.end_sec - range.start_sec;
        if span > max_sec {
            return Err(ApiError::invalid(format!(
                "videoSegmentConfig asks for {span} s of video ({} s to {} s); this server \
                 analyses at most {max_sec} s per instance, as Vertex analyses 120 s per \
                 request (--max-video-seconds): send the rest in further requests",
                range.start_sec, range.end_sec
            ))
            .at_instance(i, reqs.len()));
        }
    }
    Ok(())
}

fn parse_instance(v: &Value, dimension: Option<u32>) -> Result<EmbedRequest, String> {
    let obj = object(v, "instance")?;
    no_unknown(obj, "instance", &["text", "image", "video"])?;
    let text = match obj.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(format!("`text` must be a string, got {}", kind(other))),
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(i) => Some(media(object(i, "image")?, "image", &[])?),
    };
    let video = match obj.get("video") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let o = object(v, "video")?;
            let media = media(o, "video", &["videoSegmentConfig"])?;
            let segment_config = match o.get("videoSegmentConfig") {
                None | Some(Value::Null) => None,
                Some(c) => Some(segment_config(object(c, "video.videoSegmentConfig")?)?),
            };
            Some(VideoInput {
                media,
                segment_config,
            })
        }
    };
    let req = EmbedRequest {
        text,
        image,
        video,
        dimension,
    };
    // The checks every backend makes (at least one input, no dimension with
    // a video, interval >= 4, start < end), with the same messages.
    req.validate().map_err(|e| e.to_string())?;
    Ok(req)
}

fn media(obj: &Map<String, Value>, field: &str, extra: &[&str]) -> Result<Media, String> {
    let mut known = vec!["bytesBase64Encoded", "gcsUri", "mimeType"];
    known.extend_from_slice(extra);
    no_unknown(obj, field, &known)?;
    let string = |k: &str| -> Result<Option<&str>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(format!(
                "`{field}.{k}` must be a string, got {}",
                kind(other)
            )),
        }
    };
    let source = match (string("bytesBase64Encoded")?, string("gcsUri")?) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "`{field}` has both `bytesBase64Encoded` and `gcsUri`; give one"
            ));
        }
        (None, None) => {
            return Err(format!("`{field}` needs `bytesBase64Encoded` or `gcsUri`"));
        }
        (Some(b64), None) => MediaSource::Bytes(
            BASE64
                .decode(b64.trim_end())
                .map_err(|e| format!("`{field}.bytesBase64Encoded` is not base64: {e}"))?
                .into(),
        ),
        // Only Cloud Storage URIs, as Vertex: never a local path or a
        // file:// URI, so no caller can make the server read its own disk.
        (None, Some(uri)) if uri.starts_with("gs://") && uri.len() > 5 => {
            MediaSource::Uri(uri.to_string())
        }
        (None, Some(uri)) => {
            return Err(format!(
                "`{field}.gcsUri` must be a gs://bucket/object URI, got `{}`",
                uri.chars().take(200).collect::<String>()
            ));
        }
    };
    Ok(Media {
        source,
        mime_type: string("mimeType")?.map(str::to_string),
    })
}

fn segment_config(obj: &Map<String, Value>) -> Result<VideoSegmentConfig, String> {
    const KNOWN: [&str; 3] = ["startOffsetSec", "endOffsetSec", "intervalSec"];
    no_unknown(obj, "video.videoSegmentConfig", &KNOWN)?;
    let get = |k: &str| -> Result<Option<u32>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => whole(v, &format!("video.videoSegmentConfig.{k}")).map(Some),
        }
    };
    Ok(VideoSegmentConfig {
        start_offset_sec: get("startOffsetSec")?,
        end_offset_sec: get("endOffsetSec")?,
        interval_sec: get("intervalSec")?,
    })
}

/// One prediction: `textEmbedding`, `imageEmbedding`, `videoEmbeddings`
/// (with `startOffsetSec`/`endOffsetSec` per segment), for what the request
/// had. A video segment that could not be decoded fails the instance (the
/// Vertex shape has no per-segment error), naming the segment.
pub fn prediction(e: &Embeddings) -> Result<Value, String> {
    let mut p = Map::new();
    if let Some(t) = &e.text {
        p.insert("textEmbedding".into(), json!(t));
    }
    if let Some(i) = &e.image {
        p.insert("imageEmbedding".into(), json!(i));
    }
    if !e.video.is_empty() {
        let mut segs = Vec::with_capacity(e.video.len());
        for s in &e.video {
            if let Some(err) = &s.error {
                return Err(format!(
                    "video segment [{}, {}) s has no embedding: {err}",
                    s.start_sec, s.end_sec
                ));
            }
            segs.push(json!({
                "startOffsetSec": s.start_sec,
                "endOffsetSec": s.end_sec,
                "embedding": s.embedding,
            }));
        }
        p.insert("videoEmbeddings".into(), Value::Array(segs));
    }
    Ok(Value::Object(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<EmbedRequest>, String> {
        parse_predict_body(body.as_bytes(), 4).map_err(|e| e.message)
    }

    #[test]
    fn the_sdk_bodies_parse() {
        // As google-cloud-aiplatform sends them (SERVE.md): floats, one instance.
        let r = parse(
            r#"{"instances": [{"text": "a cat", "image": {"bytesBase64Encoded": "iVBORw=="}}],
                "parameters": {"dimension": 512.0}}"#,
        )
        .unwrap();
        assert_eq!(r[0].text.as_deref(), Some("a cat"));
        assert_eq!(
            r[0].image.as_ref().unwrap().source,
            MediaSource::Bytes(vec![0x89, b'P', b'N', b'G'].into())
        );
        assert_eq!(r[0].dimension, Some(512));
        let r = parse(
            r#"{"instances": [{"video": {"gcsUri": "gs://b/v.mp4",
                "videoSegmentConfig": {"startOffsetSec": 0.0, "endOffsetSec": 32.0, "intervalSec": 16.0}}}],
                "parameters": {}}"#,
        )
        .unwrap();
        let v = r[0].video.as_ref().unwrap();
        assert_eq!(v.media.source, MediaSource::Uri("gs://b/v.mp4".into()));
        assert_eq!(
            v.segment_config,
            Some(VideoSegmentConfig::new(0, 32, 16).unwrap())
        );
        // Several instances, in order; unpadded base64.
        let r = parse(
            r#"{"instances": [{"text": "a"}, {"image": {"bytesBase64Encoded": "iVBORw"}}, {"text": "c"}]}"#,
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].text.as_deref(), Some("c"));
    }

    #[test]
    fn bad_bodies_get_messages_naming_the_field() {
        let cases = [
            ("", "Invalid JSON payload"),
            ("[1]", "JSON object"),
            (r#"{"instances": {}}"#, "must be a list"),
            (r#"{"instances": []}"#, "is empty"),
            (
                r#"{"instances": [{"text":"a"},{"text":"a"},{"text":"a"},{"text":"a"},{"text":"a"}]}"#,
                "at most 4",
            ),
            (r#"{"instances": [{}]}"#, "has no text, image or video"),
            (
                r#"{"instances": [{"txt": "a"}]}"#,
                "unknown field `instance.txt`",
            ),
            (r#"{"instances": [{"text": 3}]}"#, "`text` must be a string"),
            (
                r#"{"instances": [{"image": {}}]}"#,
                "needs `bytesBase64Encoded` or `gcsUri`",
            ),
            (
                r#"{"instances": [{"image": {"bytesBase64Encoded": "@@"}}]}"#,
                "is not base64",
            ),
            (
                r#"{"instances": [{"image": {"gcsUri": "file:///etc/passwd"}}]}"#,
                "must be a gs://bucket/object URI",
            ),
            (
                r#"{"instances": [{"text": "a"}], "parameters": {"dimension": 512.5}}"#,
                "whole number",
            ),
            (
                r#"{"instances": [{"text": "a"}], "parameters": {"dimensions": 512}}"#,
                "unknown parameter `dimensions`",
            ),
            (
                r#"{"instances": [{"video": {"bytesBase64Encoded": "AAAA",
                   "videoSegmentConfig": {"intervalSec": 2}}}]}"#,
                "below the minimum of 4 s",
            ),
            (
                r#"{"instances": [{"video": {"bytesBase64Encoded": "AAAA"}}], "parameters": {"dimension": 128}}"#,
                "cannot be set together with a video",
            ),
            (
                r#"{"instances": [{"text": "a"}, {"text": " "}]}"#,
                "instances[1]: invalid input `text`",
            ),
        ];
        for (body, want) in cases {
            let got = parse(body).unwrap_err();
            assert!(got.contains(want), "{body}: {got:?} lacks {want:?}");
        }
    }

    #[test]
    fn predictions_have_the_vertex_shape() {
        let e = Embeddings {
            text: Some(vec![0.5]),
            image: None,
            video: vec![mmembed_core::SegmentEmbedding {
                start_sec: 0.0,
                end_sec: 4.0,
                embedding: vec![1.0],
                error: None,
            }],
            dimension: 1,
            space: mmembed_core::SpaceId::new("s"),
            model: "m".into(),
            backend: "b".into(),
        };
        assert_eq!(
            prediction(&e).unwrap(),
            json!({"textEmbedding": [0.5], "videoEmbeddings": [
                {"startOffsetSec": 0.0, "endOffsetSec": 4.0, "embedding": [1.0]}]})
        );
        let mut broken = e.clone();
        broken.video[0].error = Some("corrupt".into());
        assert!(prediction(&broken).unwrap_err().contains("[0, 4) s"));
    }
}
