//! The JSON of `multimodalembedding@001:predict` (see shared VERTEX.md).

use mmembed_core::VideoSegmentConfig;
use serde::{Deserialize, Deserializer, Serialize};

/// Image or video bytes, inline or in Cloud Storage.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MediaJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_base64_encoded: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcs_uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VideoJson {
    #[serde(flatten)]
    pub media: MediaJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video_segment_config: Option<VideoSegmentConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Instance {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<MediaJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoJson>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Parameters {
    pub dimension: u32,
}

/// One request: exactly one instance (the service's documented form), with
/// `parameters` at the top level as the worked examples and the SDK send it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PredictRequest {
    pub instances: [Instance; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

// protobuf Value numbers arrive as JSON doubles ("16.0"); accept any number.
fn f64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        F(f64),
        S(String),
    }
    match N::deserialize(d)? {
        N::F(f) => Ok(f),
        N::S(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SegmentJson {
    #[serde(default, deserialize_with = "f64_lenient")]
    pub start_offset_sec: f64,
    #[serde(deserialize_with = "f64_lenient")]
    pub end_offset_sec: f64,
    pub embedding: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Prediction {
    pub text_embedding: Option<Vec<f32>>,
    pub image_embedding: Option<Vec<f32>>,
    #[serde(default)]
    pub video_embeddings: Vec<SegmentJson>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct PredictResponse {
    pub predictions: Vec<Prediction>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_has_the_documented_shape() {
        let r = PredictRequest {
            instances: [Instance {
                text: Some("a cat".into()),
                image: Some(MediaJson {
                    bytes_base64_encoded: Some("AAA=".into()),
                    gcs_uri: None,
                    mime_type: Some("image/png".into()),
                }),
                video: Some(VideoJson {
                    media: MediaJson {
                        bytes_base64_encoded: None,
                        gcs_uri: Some("gs://b/v.mp4".into()),
                        mime_type: None,
                    },
                    video_segment_config: Some(VideoSegmentConfig::new(0, 60, 10).unwrap()),
                }),
            }],
            parameters: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"instances": [{
                "text": "a cat",
                "image": {"bytesBase64Encoded": "AAA=", "mimeType": "image/png"},
                "video": {"gcsUri": "gs://b/v.mp4",
                          "videoSegmentConfig": {"startOffsetSec": 0, "endOffsetSec": 60, "intervalSec": 10}}
            }]})
        );
    }

    #[test]
    fn response_numbers_are_parsed_leniently() {
        let r: PredictResponse = serde_json::from_str(
            r#"{"predictions": [{"videoEmbeddings": [
                {"startOffsetSec": 0, "endOffsetSec": 16.0, "embedding": [0.5, 1]},
                {"endOffsetSec": "32", "embedding": [1e-3]}]}],
               "deployedModelId": "123"}"#,
        )
        .unwrap();
        let s = &r.predictions[0].video_embeddings;
        assert_eq!((s[0].start_offset_sec, s[0].end_offset_sec), (0.0, 16.0));
        assert_eq!(s[0].embedding, vec![0.5, 1.0]);
        assert_eq!(s[1].end_offset_sec, 32.0);
    }
}
