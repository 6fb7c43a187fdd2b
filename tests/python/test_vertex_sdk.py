"""The official Vertex AI SDK (google-cloud-aiplatform, from PyPI) against
`mmembed serve --model demo`, over REST and over gRPC.

The expected vectors come from the library itself (`mmembed embed` on the
same inputs), not from the server. Run by scripts/test.sh, which installs
the SDK into a venv; by hand:

    MMEMBED_BIN=target/debug/mmembed python -m pytest tests/python -q
"""

import json
import math
import os
import pathlib
import subprocess
import tempfile
import urllib.request

import grpc
import pytest
from google.api_core import exceptions, grpc_helpers
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform_v1
from google.cloud.aiplatform_v1.services.prediction_service.transports import (
    PredictionServiceGrpcTransport,
)
from google.protobuf import json_format, struct_pb2
import vertexai
from vertexai.vision_models import Image, MultiModalEmbeddingModel, Video, VideoSegmentConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("MMEMBED_BIN", str(ROOT / "target" / "debug" / "mmembed"))
CAT = ROOT / "models" / "fixtures" / "images" / "cat_451x300.png"
ROCKET = ROOT / "models" / "fixtures" / "images" / "rocket_640x427.jpg"
ASTRONAUT = ROOT / "models" / "fixtures" / "images" / "astronaut_small_120x90.png"
DIM = 64  # the demo model's native size


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def assert_close(got, want):
    assert len(got) == len(want)
    assert cosine(got, want) > 0.99999


@pytest.fixture(scope="session")
def server():
    """`mmembed serve` on a free loopback port, stopped with SIGTERM."""
    proc = subprocess.Popen(
        [BIN, "serve", "--model", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on http://"), line
    addr = line.removeprefix("listening on http://")
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://{addr}/health") as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        import time

        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("mmembed serve never became healthy")
    yield addr
    proc.terminate()
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="session")
def video(tmp_path_factory):
    """A 12 s slideshow: cat, rocket, astronaut, 4 s each."""
    d = tmp_path_factory.mktemp("video")
    for i, src in enumerate([CAT, ROCKET, ASTRONAUT]):
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
             "-vf", "scale=160:120", str(d / f"f{i:02}.png")],
            check=True,
        )
    out = d / "slideshow.mp4"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-framerate", "1/4",
         "-i", str(d / "f%02d.png"), "-vf", "fps=10,format=yuv420p", "-c:v", "libx264", str(out)],
        check=True,
    )
    return out


def library(*args):
    """What the library answers for the same inputs: `mmembed embed`, one JSON object per input."""
    out = subprocess.run(
        [BIN, "embed", "--model", "demo", *args], check=True, capture_output=True, text=True
    ).stdout
    return [json.loads(l) for l in out.splitlines()]


@pytest.fixture(scope="session")
def expected(video):
    text, image = library("--text", "a photo of a cat", "--image", str(CAT))
    (vid,) = library("--video", str(video), "--start", "0", "--end", "12", "--interval", "4")
    return {"text": text["embedding"], "image": image["embedding"], "video": vid["segments"]}


def check_model(model, video, expected):
    r = model.get_embeddings(
        image=Image(image_bytes=CAT.read_bytes()), contextual_text="a photo of a cat", dimension=DIM
    )
    assert_close(r.text_embedding, expected["text"])
    assert_close(r.image_embedding, expected["image"])

    r = model.get_embeddings(contextual_text="a photo of a cat")
    assert_close(r.text_embedding, expected["text"])
    assert r.image_embedding is None

    r = model.get_embeddings(
        video=Video(video_bytes=video.read_bytes()),
        video_segment_config=VideoSegmentConfig(start_offset_sec=0, end_offset_sec=12, interval_sec=4),
    )
    assert [(s.start_offset_sec, s.end_offset_sec) for s in r.video_embeddings] == [
        (0, 4), (4, 8), (8, 12)
    ]
    for got, want in zip(r.video_embeddings, expected["video"]):
        assert (got.start_offset_sec, got.end_offset_sec) == (want["start_sec"], want["end_sec"])
        assert_close(got.embedding, want["embedding"])

    with pytest.raises(exceptions.BadRequest, match="unsupported dimension 1408"):
        model.get_embeddings(contextual_text="a cat", dimension=1408)


def test_sdk_over_rest(server, video, expected):
    vertexai.init(
        project="test-project",
        location="us-central1",
        api_endpoint=f"http://{server}",
        api_transport="rest",
        credentials=AnonymousCredentials(),
    )
    model = MultiModalEmbeddingModel.from_pretrained("multimodalembedding@001")
    check_model(model, video, expected)


def test_sdk_over_grpc(server, video, expected, monkeypatch):
    # vertexai.init always opens a TLS channel; the server under test is
    # plaintext on loopback, so the SDK's channel factory hands it an
    # insecure channel (SERVE.md).
    monkeypatch.setattr(
        grpc_helpers, "create_channel", lambda target, *a, **kw: grpc.insecure_channel(target)
    )
    vertexai.init(
        project="test-project",
        location="us-central1",
        api_endpoint=server,
        api_transport="grpc",
        credentials=AnonymousCredentials(),
    )
    model = MultiModalEmbeddingModel.from_pretrained("multimodalembedding@001")
    check_model(model, video, expected)


def test_gapic_client_on_an_insecure_channel(server, expected):
    client = aiplatform_v1.PredictionServiceClient(
        transport=PredictionServiceGrpcTransport(channel=grpc.insecure_channel(server))
    )
    instance = json_format.ParseDict({"text": "a photo of a cat"}, struct_pb2.Value())
    params = json_format.ParseDict({"dimension": DIM}, struct_pb2.Value())
    endpoint = "projects/p/locations/us-central1/publishers/google/models/multimodalembedding@001"
    r = client.predict(endpoint=endpoint, instances=[instance, instance], parameters=params)
    assert len(r.predictions) == 2
    for p in r.predictions:
        assert_close(list(p["textEmbedding"]), expected["text"])
    with pytest.raises(exceptions.InvalidArgument, match="has no text, image or video"):
        client.predict(endpoint=endpoint, instances=[json_format.ParseDict({}, struct_pb2.Value())])
