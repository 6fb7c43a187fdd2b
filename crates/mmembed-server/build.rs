//! Generates the tonic server and client code for the two Vertex RPCs we
//! answer, from a Rust description (tonic-build's `manual` mode): the
//! messages are hand-declared prost structs in `src/pb.rs`, so the build
//! needs neither protoc nor googleapis' .proto files (hundreds of files for
//! two messages each way).

use tonic_build::manual::{Builder, Method, Service};

fn method(name: &str, route: &str, input: &str, output: &str) -> Method {
    Method::builder()
        .name(name)
        .route_name(route)
        .input_type(input)
        .output_type(output)
        .codec_path("tonic_prost::ProstCodec")
        .build()
}

fn main() {
    let prediction = Service::builder()
        .name("PredictionService")
        .package("google.cloud.aiplatform.v1")
        .method(method(
            "predict",
            "Predict",
            "crate::pb::PredictRequest",
            "crate::pb::PredictResponse",
        ))
        .build();
    let garden = Service::builder()
        .name("ModelGardenService")
        .package("google.cloud.aiplatform.v1")
        .method(method(
            "get_publisher_model",
            "GetPublisherModel",
            "crate::pb::GetPublisherModelRequest",
            "crate::pb::PublisherModel",
        ))
        .build();
    Builder::new()
        .build_transport(false)
        .compile(&[prediction, garden]);
    println!("cargo:rerun-if-changed=build.rs");
}
