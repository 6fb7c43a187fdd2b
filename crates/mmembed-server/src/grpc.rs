//! gRPC: `PredictionService/Predict` and `ModelGardenService/GetPublisherModel`,
//! served by the same router as REST (HTTP/2 on the same port). Instances
//! arrive as `google.protobuf.Value`s, are turned into JSON values and go
//! through the same parser as REST bodies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use tonic::{Request, Response, Status};

use crate::error::{ApiError, Code};
use crate::pb::model_garden_service_server::{ModelGardenService, ModelGardenServiceServer};
use crate::pb::prediction_service_server::{PredictionService, PredictionServiceServer};
use crate::pb::{
    GetPublisherModelRequest, PredictRequest, PredictResponse, PredictSchemata, PublisherModel,
};
use crate::{App, INSTANCE_SCHEMA_URI, wire};

#[derive(Clone)]
struct Grpc(Arc<App>);

/// The gRPC services as an axum router (paths `/google.cloud.aiplatform.v1.…`).
pub(crate) fn routes(app: Arc<App>) -> axum::Router {
    let limit = app.cfg.max_body_bytes;
    let g = Grpc(app);
    tonic::service::Routes::new(
        PredictionServiceServer::new(g.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(ModelGardenServiceServer::new(g).max_decoding_message_size(limit))
    .into_axum_router()
}

/// `google.protobuf.Value` to JSON. Non-finite numbers (which JSON cannot
/// hold) become null, which the parser then refuses where a number belongs.
pub(crate) fn to_json(v: prost_types::Value) -> Value {
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => Number::from_f64(n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StructValue(s)) => Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(to_json).collect()),
    }
}

/// JSON to `google.protobuf.Value`.
pub(crate) fn from_json(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(from_json).collect(),
        }),
        Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .into_iter()
                .map(|(k, v)| (k, from_json(v)))
                .collect::<BTreeMap<_, _>>(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// `grpc-timeout`: an integer and a unit (H, M, S, m, u, n), per the gRPC
/// HTTP/2 protocol spec.
pub(crate) fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Grpc {
    fn key<T>(req: &Request<T>) -> Option<String> {
        let md = |name: &str| req.metadata().get(name).and_then(|v| v.to_str().ok());
        crate::header_key(md("authorization"), md("x-goog-api-key")).map(str::to_string)
    }

    fn finish<T>(
        &self,
        route: &'static str,
        t0: Instant,
        r: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let code = r.as_ref().map_or_else(|e| e.code.http(), |_| 200);
        self.0.metrics.observe(route, code, t0.elapsed());
        tracing::info!(
            route,
            status = code,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "grpc"
        );
        r.map(Response::new).map_err(|e| e.to_status())
    }

    async fn predict_inner(
        &self,
        req: Request<PredictRequest>,
    ) -> Result<PredictResponse, ApiError> {
        let app = &self.0;
        app.check_key(Self::key(&req).as_deref())?;
        let client_deadline = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let deadline = app.deadline(client_deadline);
        let msg = req.into_inner();
        // `projects/P/locations/L/publishers/google/models/MODEL` names a
        // publisher model (checked); `…/endpoints/ID` a deployment (any id).
        if let Some((_, model)) = msg.endpoint.split_once("/publishers/google/models/") {
            app.check_model(model)?;
        } else if !msg.endpoint.contains("/endpoints/") {
            return Err(ApiError::invalid(format!(
                "`endpoint` must be projects/P/locations/L/publishers/google/models/MODEL or \
                 projects/P/locations/L/endpoints/ID, got `{}`",
                msg.endpoint.chars().take(200).collect::<String>()
            )));
        }
        let instances: Vec<Value> = msg.instances.into_iter().map(to_json).collect();
        let parameters = msg.parameters.map(to_json);
        let reqs = wire::parse_predict(&instances, parameters.as_ref(), app.cfg.max_instances)?;
        drop(instances);
        let predictions = app.predict(reqs, deadline).await?;
        Ok(PredictResponse {
            predictions: predictions.into_iter().map(from_json).collect(),
            deployed_model_id: app.cfg.deployed_model_id.clone(),
            ..PredictResponse::default()
        })
    }
}

#[tonic::async_trait]
impl PredictionService for Grpc {
    async fn predict(
        &self,
        req: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let t0 = Instant::now();
        let r = self.predict_inner(req).await;
        self.finish("grpc_predict", t0, r)
    }
}

#[tonic::async_trait]
impl ModelGardenService for Grpc {
    async fn get_publisher_model(
        &self,
        req: Request<GetPublisherModelRequest>,
    ) -> Result<Response<PublisherModel>, Status> {
        let t0 = Instant::now();
        let r = (|| {
            self.0.check_key(Self::key(&req).as_deref())?;
            let name = &req.get_ref().name;
            let model = name
                .strip_prefix("publishers/google/models/")
                .ok_or_else(|| {
                    ApiError::new(
                        Code::NotFound,
                        format!("`{name}` is not a publishers/google/models/MODEL name"),
                    )
                })?;
            let (name, version_id, template) = self.0.publisher_model(model)?;
            Ok(PublisherModel {
                name,
                version_id,
                open_source_category: 1, // PROPRIETARY
                launch_stage: 4,         // GA
                publisher_model_template: template,
                predict_schemata: Some(PredictSchemata {
                    instance_schema_uri: INSTANCE_SCHEMA_URI.into(),
                    ..PredictSchemata::default()
                }),
            })
        })();
        self.finish("grpc_get_publisher_model", t0, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_round_trip_and_timeouts_parse() {
        let v = json!({"a": [1.5, "x", null, true, {"b": []}]});
        assert_eq!(to_json(from_json(v.clone())), v);
        let nan = prost_types::Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert_eq!(to_json(nan), Value::Null);
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "5", "m", "5x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
