//! The protobuf messages of the two RPCs we answer, declared by hand with
//! the field numbers of googleapis' `google/cloud/aiplatform/v1/`
//! `prediction_service.proto`, `model_garden_service.proto`,
//! `publisher_model.proto` and `model.proto` (`PredictSchemata`). Fields we
//! never read or set are left out: protobuf skips unknown fields, so the
//! wire stays compatible with Google's full messages.

#![allow(missing_docs)]

use std::collections::HashMap;

/// `google.cloud.aiplatform.v1.PredictRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PredictRequest {
    /// `projects/{p}/locations/{l}/publishers/google/models/{model}` (the
    /// `@` of a version arrives literally) or an endpoint name.
    #[prost(string, tag = "1")]
    pub endpoint: String,
    #[prost(message, repeated, tag = "2")]
    pub instances: Vec<prost_types::Value>,
    #[prost(message, optional, tag = "3")]
    pub parameters: Option<prost_types::Value>,
    #[prost(map = "string, string", tag = "4")]
    pub labels: HashMap<String, String>,
}

/// `google.cloud.aiplatform.v1.PredictResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PredictResponse {
    #[prost(message, repeated, tag = "1")]
    pub predictions: Vec<prost_types::Value>,
    #[prost(string, tag = "2")]
    pub deployed_model_id: String,
    #[prost(string, tag = "3")]
    pub model: String,
    #[prost(string, tag = "4")]
    pub model_display_name: String,
    #[prost(string, tag = "5")]
    pub model_version_id: String,
}

/// `google.cloud.aiplatform.v1.GetPublisherModelRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetPublisherModelRequest {
    /// `publishers/google/models/{model}`.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub language_code: String,
    #[prost(int32, tag = "3")]
    pub view: i32,
}

/// `google.cloud.aiplatform.v1.PredictSchemata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PredictSchemata {
    #[prost(string, tag = "1")]
    pub instance_schema_uri: String,
    #[prost(string, tag = "2")]
    pub parameters_schema_uri: String,
    #[prost(string, tag = "3")]
    pub prediction_schema_uri: String,
}

/// `google.cloud.aiplatform.v1.PublisherModel`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PublisherModel {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version_id: String,
    /// `OpenSourceCategory`: 0 unspecified, 1 proprietary.
    #[prost(int32, tag = "7")]
    pub open_source_category: i32,
    /// `LaunchStage`: 4 GA.
    #[prost(int32, tag = "29")]
    pub launch_stage: i32,
    #[prost(string, tag = "30")]
    pub publisher_model_template: String,
    #[prost(message, optional, tag = "31")]
    pub predict_schemata: Option<PredictSchemata>,
}

include!(concat!(
    env!("OUT_DIR"),
    "/google.cloud.aiplatform.v1.PredictionService.rs"
));
include!(concat!(
    env!("OUT_DIR"),
    "/google.cloud.aiplatform.v1.ModelGardenService.rs"
));
