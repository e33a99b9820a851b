"""The HTTP service: real Ray Serve on the shared Ray session, real HTTP on 127.0.0.1, real S3 (moto).

One application (tiny preset; 1 ingress, 1 mask-proposal and 2 region-classifier replicas with
fractional CPUs) is deployed for the module and shut down at its end. Results are compared with the
library's own two-stage inference (``Segmenter.segment``) run in this process.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg_ray.data import storage
from ovseg_ray.config import ConfigError
from ovseg_ray.data.images import ImageDecodeError, decode_image, decode_label_png, encode_png, load_image
from ovseg_ray.serving.api import (
    RequestError,
    SegmentResponse,
    decode_checked,
    parse_segment_request,
    render_json,
)
from ovseg_ray.serving.uris import uri_allowed
from ovseg_ray.serving.multipart import MultipartError, parse_multipart
from ovseg_ray.serving.config import Limits, ModelSettings, ServeConfig, load_serve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["sky", "grass", "water", "sand", "ball", "car", "boat", "kite"]
DEFAULTS = {"lambda": 0.7, "mask_threshold": 0.4, "outputs": ["label_png"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def library(tiny_model):
    from ovseg_ray.inference import Segmenter

    return Segmenter(tiny_model)


@pytest.fixture(scope="module")
def images(synth_dataset):
    paths = sorted(str(p) for p in (synth_dataset / "images").glob("*.jpg"))[:4]
    return [SimpleNamespace(path=p, data=open(p, "rb").read(), array=load_image(p)) for p in paths]


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves a folder on 127.0.0.1 and remembers every path asked for."""

    def log_message(self, *args) -> None:
        type(self).requested.append(self.path)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, images):
    """An HTTP server with /public/scene.jpg and /private/secret.jpg; ``requested`` lists what was asked."""
    root = tmp_path_factory.mktemp("http_root")
    for folder, name in (("public", "scene.jpg"), ("private", "secret.jpg")):
        (root / folder).mkdir()
        (root / folder / name).write_bytes(images[0].data)
    handler = type("Files", (_Files,), {"requested": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", requested=handler.requested)
    server.shutdown()


def _service_config(uri_dir, image_server, **changes) -> ServeConfig:
    data = {
        "http": {"port": _free_port()},
        "limits": {"max_pixels": 300_000, "max_request_bytes": 2_000_000, "max_classes": 50,
                   "max_name_chars": 60,
                   "image_uri_prefixes": ["s3://", str(uri_dir), f"{image_server.url}/public/"]},
        "batching": {"max_batch_requests": 8, "batch_wait_timeout_s": 0.05},
        "default_outputs": ["label_png"],
        "ingress": {"num_replicas": 1, "num_cpus": 0.25},
        "proposer": {"num_replicas": 1, "num_cpus": 0.25},
        "classifier": {"num_replicas": 2, "num_cpus": 0.25},
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    return ServeConfig.model_validate(data)


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory, image_server):
    from ray import serve

    from ovseg_ray.serving import deploy

    uri_dir = tmp_path_factory.mktemp("served_images")
    config = _service_config(uri_dir, image_server)
    cpus_before = ray_session.available_resources().get("CPU", 0)
    url = deploy(config)
    with httpx.Client(base_url=url, timeout=120) as http:
        yield SimpleNamespace(url=url, config=config, uri_dir=uri_dir, http=http, image_server=image_server)
    serve.shutdown()
    deadline = time.time() + 60  # the replicas' CPUs go back to the tests that follow
    while ray_session.available_resources().get("CPU", 0) < cpus_before and time.time() < deadline:
        time.sleep(0.5)
    assert ray_session.available_resources().get("CPU", 0) >= cpus_before


def _labels(body: dict) -> np.ndarray:
    return decode_label_png(base64.b64decode(body["outputs"]["label_png"])).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# acceptance 1: a running app answers POST /v1/segment like the library does


def test_multipart_segment_equals_library_with_png_overlay_and_rle(service, images, library):
    image = images[0]
    response = service.http.post(
        "/v1/segment",
        files={"image": ("scene.jpg", image.data, "image/jpeg")},
        data={"classes": ",".join(CLASSES), "outputs": "label_png,overlay_png,rle"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    SegmentResponse.model_validate(body)
    expected = library.segment(image.array, CLASSES)
    height, width = image.array.shape[:2]

    labels = _labels(body)
    assert labels.shape == (height, width)
    np.testing.assert_array_equal(labels, expected.labels)
    assert body["classes"] == CLASSES
    assert body["pixel_fractions"] == pytest.approx(expected.pixel_fractions())
    assert (body["num_proposals"], body["num_valid_regions"]) == (expected.num_proposals, expected.num_valid_regions)

    rles = body["outputs"]["rle"]
    present = {CLASSES[i] for i in np.unique(expected.labels)}
    assert set(rles) == present
    for name, rle in rles.items():
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), expected.labels == CLASSES.index(name))

    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["outputs"]["overlay_png"]))))
    assert overlay.shape[0] >= height and overlay.shape[1] > width  # legend on the right

    timings = body["timings"]
    for stage in ("decode_s", "proposals_s", "text_s", "regions_s", "region_forward_s", "fusion_s",
                  "outputs_s", "total_s"):
        assert timings[stage] >= 0, stage
    assert timings["total_s"] >= timings["regions_s"]
    assert body["region_batch"]["regions"] >= expected.num_valid_regions >= 1


@pytest.mark.parametrize("lam, threshold", [(0.0, None), (1.0, 0.6), (0.35, 0.2)])
def test_json_base64_with_lambda_and_threshold_equals_library(service, images, library, lam, threshold):
    image = images[1]
    payload = {"image_base64": base64.b64encode(image.data).decode(), "classes": CLASSES[:5], "lambda": lam}
    if threshold is not None:
        payload["mask_threshold"] = threshold
    response = service.http.post("/v1/segment", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = library.segment(image.array, CLASSES[:5], lam=lam, mask_threshold=threshold)
    np.testing.assert_array_equal(_labels(body), expected.labels)
    assert body["lambda"] == lam and body["mask_threshold"] == (threshold or 0.4)
    if lam == 0.0:  # MaskFormer only: the CLIP stage is skipped
        assert body["num_valid_regions"] == 0 and body["region_batch"]["requests"] == 0
        assert "regions_s" not in body["timings"]


@pytest.mark.parametrize("classes", [["boat"], CLASSES[:4]])
def test_demo_mode_equals_the_library_demo(service, images, library, classes):
    """``"mode": "demo"``: the official demo inference, as ``Segmenter.segment(mode="demo")``."""
    image = images[3]
    response = service.http.post("/v1/segment", files={"image": ("x.jpg", image.data, "image/jpeg")},
                                 data={"classes": ",".join(classes), "mode": "demo"})
    assert response.status_code == 200, response.text
    body = response.json()
    SegmentResponse.model_validate(body)
    expected = library.segment(image.array, classes, mode="demo")
    labels = _labels(body)
    unlabelled = expected.labels == -1
    np.testing.assert_array_equal(labels[~unlabelled], expected.labels[~unlabelled])
    assert (labels[unlabelled] == 255).all()
    assert body["classes"] == expected.classes and body["mode"] == "demo"
    assert (body["lambda"], body["mask_threshold"]) == (1.0, 0.35)
    assert body["unlabelled_fraction"] == pytest.approx(expected.unlabelled_fraction())
    refused = service.http.post("/v1/segment", json={"image_base64": base64.b64encode(image.data).decode(),
                                                     "classes": classes, "mode": "demo", "lambda": 0.5})
    assert refused.status_code == 422 and "demo" in refused.json()["detail"]


def test_image_uri_from_s3_and_allowed_local_dir(service, images, library, s3_bucket, tmp_path):
    image = images[2]
    expected = library.segment(image.array, CLASSES).labels
    uri = f"{s3_bucket}/photos/scene.jpg"
    storage.write_bytes(uri, image.data)
    local = os.path.join(str(service.uri_dir), "scene.jpg")
    storage.write_bytes(local, image.data)
    for source in (uri, local):
        response = service.http.post("/v1/segment", json={"image_uri": source, "classes": CLASSES})
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(_labels(response.json()), expected)

    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(image.data)
    sneaky = os.path.join(str(service.uri_dir), "..", os.path.basename(tmp_path), "elsewhere.jpg")
    for forbidden in (str(outside), sneaky, "http://127.0.0.1:1/x.jpg", "file:///etc/passwd"):
        response = service.http.post("/v1/segment", json={"image_uri": forbidden, "classes": CLASSES})
        assert response.status_code == 403 and "allowed prefix" in response.json()["detail"], forbidden
    response = service.http.post("/v1/segment", json={"image_uri": f"{s3_bucket}/missing.jpg", "classes": CLASSES})
    assert response.status_code == 400 and "missing.jpg" in response.json()["detail"]
    for unreadable in (s3_bucket, f"{s3_bucket}/photos", "s3://Bad_Bucket!/x.jpg"):  # bucket, "folder", bad name
        response = service.http.post("/v1/segment", json={"image_uri": unreadable, "classes": CLASSES})
        assert response.status_code == 400 and unreadable in response.json()["detail"], unreadable


def test_image_uri_cannot_escape_an_allowed_prefix(service, images, library):
    """Issue 15.2: dot segments (also percent-encoded) never reach the HTTP client, which would resolve them."""
    server = service.image_server
    response = service.http.post("/v1/segment", json={"image_uri": f"{server.url}/public/scene.jpg", "classes": CLASSES})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(_labels(response.json()), library.segment(images[0].array, CLASSES).labels)
    assert server.requested and all(path.startswith("/public/") for path in server.requested)
    escapes = ["/public/../private/secret.jpg", "/public/%2e%2e/private/secret.jpg", "/public/./../private/secret.jpg",
               "/public/.%2E/private/secret.jpg", "/public/%252e%252e/private/secret.jpg",
               "/public/..%5cprivate/secret.jpg", "/public/%2E%2E%2Fprivate/secret.jpg"]
    for path in escapes:
        response = service.http.post("/v1/segment", json={"image_uri": server.url + path, "classes": CLASSES})
        assert response.status_code == 403 and "'.' or '..' path segment" in response.json()["detail"], path
    for outside in ("/private/secret.jpg", "/publicity/scene.jpg", "/public%2f../private/secret.jpg"):
        response = service.http.post("/v1/segment", json={"image_uri": server.url + outside, "classes": CLASSES})
        assert response.status_code == 403, outside
    assert not [path for path in server.requested if not path.startswith("/public/")]


# ------------------------------------------------------------------------------------------------
# acceptance 3: bad input gets its 4xx with a message; the service keeps working


def _huge_png() -> bytes:
    """1000 x 1000 pixels (over the 300 000 limit) in a few kilobytes."""
    return encode_png(np.zeros((1000, 1000), dtype=np.uint8))


def _bad_requests(image_data: bytes) -> list[tuple[str, dict, int, str]]:
    def upload(data: bytes, **fields) -> dict:
        return {"files": {"image": ("x.jpg", data)}, "data": {"classes": "sky,car", **fields}}

    b64 = base64.b64encode(image_data).decode()
    return [
        ("not an image", upload(b"this is not an image"), 400, "not a recognised image format"),
        ("truncated jpeg", upload(image_data[: len(image_data) // 2]), 400, "cannot decode"),
        ("empty file", upload(b""), 400, "empty"),
        ("too many pixels", upload(_huge_png()), 413, "1000x1000 = 1000000 pixels; the limit is 300000"),
        ("body too large", upload(os.urandom(2_100_000)), 413, "limit is 2000000 bytes"),
        ("empty class list", upload(image_data, classes=""), 422, "class list is empty"),
        ("too many classes", upload(image_data, classes=",".join(f"c{i}" for i in range(51))), 422,
         "too many classes: 51 given, the limit is 50"),
        ("over-long name", upload(image_data, classes="sky," + "x" * 61), 422, "class name #1 is 61 characters"),
        ("empty name", upload(image_data, classes="sky,,car"), 422, "class name #1 is empty"),
        ("broken JSON list", upload(image_data, classes='["sky", "car"'), 422, "not valid JSON"),
        ("repeated name", upload(image_data, classes="sky,car, sky"), 422,
         "class name #2 ('sky') repeats class name #0"),
        ("lambda out of range", upload(image_data, **{"lambda": "1.5"}), 422, "lambda"),
        ("threshold out of range", upload(image_data, mask_threshold="0"), 422, "mask_threshold"),
        ("threshold not a number", upload(image_data, mask_threshold="high"), 422, "mask_threshold"),
        ("unknown output", upload(image_data, outputs="jpeg"), 422, "outputs"),
        ("no image field", {"data": {"classes": "sky"}, "files": {"picture": ("x.jpg", image_data)}}, 422,
         "unknown form field(s) picture"),
        ("two images", {"files": [("image", ("a.jpg", image_data)), ("image", ("b.jpg", image_data))],
                        "data": {"classes": "sky"}}, 422, "exactly one 'image' file field, got 2"),
        ("classes missing", {"files": {"image": ("x.jpg", image_data)}}, 422, "classes"),
        ("bad base64", {"json": {"image_base64": "%%%not-base64", "classes": ["sky"]}}, 400, "not valid base64"),
        ("no image in json", {"json": {"classes": ["sky"]}}, 422, "exactly one of image_base64 and image_uri"),
        ("two images in json", {"json": {"classes": ["sky"], "image_base64": b64, "image_uri": "s3://b/k"}}, 422,
         "exactly one"),
        ("classes not a list", {"json": {"image_base64": b64, "classes": "sky"}}, 422, "classes"),
        ("unknown json field", {"json": {"image_base64": b64, "classes": ["sky"], "colour": 1}}, 422, "colour"),
        ("empty json list", {"json": {"image_base64": b64, "classes": []}}, 422, "class list is empty"),
        ("malformed json", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "not valid JSON"),
        ("json not an object", {"json": ["sky"]}, 422, "must be an object"),
        ("json nested too deeply", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
         400, "nested too deeply"),
        ("plain text body", {"content": b"sky", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported content type 'text/plain'"),
        ("multipart without boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
         400, "boundary"),
        # issue 15.1: text no response can carry, or no path can hold, is refused up front, naming the field
        ("lone surrogate in a class name", _raw_json('{"image_base64": "%s", "classes": ["sky", "\\ud800"]}' % b64),
         422, "classes.1: Value error, must be valid Unicode text"),
        ("NUL in image_uri", _raw_json('{"image_uri": "s3://b/a\\u0000b.jpg", "classes": ["sky"]}'), 422,
         "image_uri: Value error, must not contain NUL"),
        ("lone surrogate in image_uri", _raw_json('{"image_uri": "s3://b/\\udc80.jpg", "classes": ["sky"]}'), 422,
         "image_uri: Value error, must be valid Unicode text"),
        ("null image source", {"json": {"image_base64": b64, "image_uri": None, "classes": ["sky"]}}, 422,
         "image_uri: Input should be a valid string"),
        ("non-UTF-8 file name", _raw_multipart((b'name="image"; filename="\xff.jpg"', b"not an image"),
                                               (b'name="classes"', b"sky")), 400, "cannot decode \ufffd.jpg"),
        ("non-UTF-8 field name", _raw_multipart((b'name="image"', image_data), (b'name="cl\xffsses"', b"sky")), 422,
         "unknown form field(s) cl\ufffdsses"),
    ]


def _raw_json(text: str) -> dict:
    """A JSON body as written (``\\ud800`` escapes survive: Python's json.loads turns them into lone surrogates)."""
    return {"content": text.encode("ascii"), "headers": {"content-type": "application/json"}}


def _raw_multipart(*parts: tuple[bytes, bytes]) -> dict:
    """A multipart body of (Content-Disposition parameters, data) parts, bytes as given."""
    body = b"".join(b"--XyZ\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + data + b"\r\n"
                    for disposition, data in parts) + b"--XyZ--\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=XyZ"}}


def test_bad_inputs_get_4xx_with_a_message_and_the_service_keeps_working(service, images, library):
    before = service.http.get("/v1/info").json()["requests_by_status"]
    cases = _bad_requests(images[0].data)
    for name, request, status, message in cases:
        response = service.http.post("/v1/segment", **request)
        assert response.status_code == status, (name, response.text)
        assert message in response.json()["detail"], (name, response.json())

    response = service.http.post("/v1/segment", files={"image": ("x.jpg", images[0].data)}, data={"classes": "sky,car"})
    assert response.status_code == 200
    np.testing.assert_array_equal(_labels(response.json()), library.segment(images[0].array, ["sky", "car"]).labels)
    after = service.http.get("/v1/info").json()["requests_by_status"]
    assert "500" not in after
    added = sum(after.values()) - sum(before.values())
    assert added == len(cases) + 1
    assert int(after["422"]) - int(before.get("422", 0)) == sum(1 for case in cases if case[2] == 422)


def test_a_body_json_cannot_carry_is_a_counted_json_500():
    """What the ingress sends and counts: an unencodable body is a JSON 500, never an exception after the work."""
    for body in ({"classes": ["\ud800"]}, {"fraction": float("nan")}):
        status, content = render_json(200, body)
        assert status == 500 and "could not be encoded" in json.loads(content)["detail"]
    assert render_json(422, {"detail": "nom de classe « ciel »"}) == (422, '{"detail": "nom de classe « ciel »"}'.encode())
    assert RequestError(400, "cannot decode \udcff.jpg").message == "cannot decode \\udcff.jpg"


# ------------------------------------------------------------------------------------------------
# acceptance 2 and 4: replica counts, cross-request region batches, 200 requests from 8 clients


def test_replica_counts_and_region_batches_under_load(service, images, library):
    from ray import serve

    deployments = serve.status().applications[service.config.app_name].deployments
    running = {name: d.replica_states.get("RUNNING", 0) for name, d in deployments.items()}
    assert running == {"OVSegIngress": 1, "MaskProposer": 1, "RegionClassifier": 2}
    assert service.http.get("/v1/info").json()["replicas"]["RegionClassifier"]["running"] == 2

    vocabularies = [CLASSES, CLASSES[:3], ["red ball", "blue sky", "green grass"], CLASSES[::-1]]
    jobs = [(i % len(images), i % len(vocabularies)) for i in range(200)]
    expected = {
        (m, v): library.segment(images[m].array, vocabularies[v]).labels for m, v in set(jobs)
    }

    def client(worker: int) -> list[tuple[int, int, int, dict]]:
        done = []
        with httpx.Client(base_url=service.url, timeout=120) as http:
            for m, v in jobs[worker::8]:
                response = http.post("/v1/segment", files={"image": ("x.jpg", images[m].data)},
                                     data={"classes": json.dumps(vocabularies[v])})
                done.append((m, v, response.status_code, response.json()))
        return done

    with ThreadPoolExecutor(8) as pool:
        results = [r for part in pool.map(client, range(8)) for r in part]

    assert len(results) == 200
    failures = [(status, body) for _, _, status, body in results if status != 200]
    assert not failures, failures[:3]
    for m, v, _, body in results:
        np.testing.assert_array_equal(_labels(body), expected[(m, v)])
    batch_sizes = [body["region_batch"]["requests"] for *_, body in results]
    assert max(batch_sizes) > 1, batch_sizes
    observed = service.http.get("/v1/info").json()["region_batching"]
    assert observed["max_observed_batch_requests"] > 1
    assert observed["max_observed_batch_requests"] <= service.config.batching.max_batch_requests
    assert sum(observed["observed_batch_requests"].values()) >= 200


def _running_replicas(app_name: str) -> dict[str, list[str]]:
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][app_name]["deployments"]
    return {name: sorted(r["replica_id"] for r in d["replicas"] if r["state"] == "RUNNING")
            for name, d in deployments.items()}


def test_redeploy_keeps_the_replicas_of_unchanged_stages(service, images, library):
    """Issue 15.4: an identical config changes nothing; one stage's replica count changes only that stage."""
    from ovseg_ray.serving import deploy

    before = _running_replicas(service.config.app_name)
    assert [len(before[name]) for name in ("OVSegIngress", "MaskProposer", "RegionClassifier")] == [1, 1, 2]
    assert deploy(service.config) == service.url
    assert _running_replicas(service.config.app_name) == before
    one = service.config.classifier.model_copy(update={"num_replicas": 1})
    deploy(service.config.model_copy(update={"classifier": one}))
    after = _running_replicas(service.config.app_name)
    assert {k: after[k] for k in ("OVSegIngress", "MaskProposer")} == {k: before[k] for k in ("OVSegIngress", "MaskProposer")}
    assert len(after["RegionClassifier"]) == 1 and set(after["RegionClassifier"]) < set(before["RegionClassifier"])
    deploy(service.config)  # two classifiers again for the tests that follow
    assert len(_running_replicas(service.config.app_name)["RegionClassifier"]) == 2
    response = service.http.post("/v1/segment", files={"image": ("x.jpg", images[1].data)}, data={"classes": "sky,car"})
    np.testing.assert_array_equal(_labels(response.json()), library.segment(images[1].array, ["sky", "car"]).labels)


def test_serve_refuses_replicas_that_the_ray_it_runs_on_cannot_hold(service, capsys):
    """Issue 15.3: on a Ray that cannot grow, refuse up front (needed vs available, the flags that lower it)."""
    from ray import serve

    from ovseg_ray.cli import main

    argv = ["serve", "--app-name", "too-big", "--route-prefix", "/too-big", "--http.port", str(service.config.http.port),
            "--ingress.num-cpus", "1", "--proposer.num-cpus", "1", "--classifier.num-cpus", "0.5",
            "--classifier.num-replicas", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("the service's replicas (ingress 1 x 1 CPU, proposer 1 x 1 CPU, classifier 2 x 0.5 CPU) need 3 CPUs "
            "(the cluster has 2) to start: lower --ingress.num-cpus") in err
    assert "too-big" not in serve.status().applications


# ------------------------------------------------------------------------------------------------
# info, docs, client


def test_health_info_and_openapi_docs(service):
    assert service.http.get("/healthz").json() == {"status": "ok"}
    info = service.http.get("/v1/info").json()
    assert info["model"]["preset"] == "tiny" and info["model"]["num_queries"] == 16
    assert info["model"]["defaults"] == {"lambda": 0.7, "mask_threshold": 0.4}
    assert info["limits"]["max_pixels"] == 300_000 and info["limits"]["max_classes"] == 50
    assert set(info["replicas"]) == {"OVSegIngress", "MaskProposer", "RegionClassifier"}
    docs = service.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = service.http.get("/openapi.json").json()
    content = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert {"200", "400", "413", "422", "500"} <= set(spec["paths"]["/v1/segment"]["post"]["responses"])


def test_openapi_schema_says_what_the_service_accepts(service, images):
    """Issue 15.5: the JSON schema refuses what the service refuses (no class, too many, no or two images)."""
    import jsonschema

    spec = service.http.get("/openapi.json").json()
    schema = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    classes = schema["properties"]["classes"]
    assert (classes["minItems"], classes["maxItems"], classes["items"]["maxLength"]) == (1, 50, 60)  # this service's limits
    form = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "classes"] and form["properties"]["classes"]["minLength"] == 1
    b64 = base64.b64encode(images[0].data).decode()
    bodies = [{"classes": ["sky"], "image_base64": b64}, {"classes": [], "image_base64": b64}, {"classes": ["sky"]},
              {"classes": ["sky"], "image_base64": b64, "image_uri": "s3://b/k.jpg"},
              {"classes": [f"c{i}" for i in range(51)], "image_base64": b64}, {"classes": ["sky", "sky"], "image_base64": b64},
              {"classes": ["  "], "image_base64": b64}, {"classes": ["sky"], "image_base64": b64, "colour": 1}]
    validator = jsonschema.Draft202012Validator(schema)
    for body in bodies:
        status = service.http.post("/v1/segment", json=body).status_code
        assert validator.is_valid(body) == (status == 200), (body, status)


def test_python_client(service, images, library, s3_bucket):
    from ovseg_ray.serving.client import OVSegClient, OVSegError, overlay_image

    image = images[3]
    expected = library.segment(image.array, CLASSES).labels
    uri = f"{s3_bucket}/client.jpg"
    storage.write_bytes(uri, image.data)
    with OVSegClient(service.url) as client:
        assert client.health()
        for source in (image.path, image.array, image.data, uri):
            result = client.segment(source, CLASSES, outputs=["label_png", "rle", "overlay_png"])
            np.testing.assert_array_equal(result.labels, expected)
            for index, name in enumerate(CLASSES):
                np.testing.assert_array_equal(result.mask(name), expected == index)
            assert overlay_image(result).shape[0] == image.array.shape[0]
        rle_only = client.segment(image.path, CLASSES, lam=0.0, outputs=["rle"])
        assert rle_only.labels is None
        np.testing.assert_array_equal(rle_only.mask(CLASSES[0]),
                                      library.segment(image.array, CLASSES, lam=0.0).labels == 0)
        with pytest.raises(OVSegError) as error:
            client.segment(image.path, [])
        assert error.value.status_code == 422 and "empty" in error.value.detail
        with pytest.raises(OVSegError) as error:
            client.segment(image.path, CLASSES, mask_threshold=1.5)
        assert error.value.status_code == 422 and "mask_threshold" in error.value.detail


# ------------------------------------------------------------------------------------------------
# pieces without Ray: stages, request parsing, config


def test_stages_with_cross_request_batch_equal_library(library, images):
    from ovseg_ray.serving.stages import ProposalStage, RegionStage, load_segmenter

    settings = ModelSettings(preset="tiny")
    proposals = ProposalStage(load_segmenter(settings, "proposals"))
    regions = RegionStage(load_segmenter(settings, "regions"), max_regions_per_forward=20)
    assert proposals.segmenter.model.clip.visual is None and regions.segmenter.model.maskformer is None
    for lam, threshold in [(0.7, 0.4), (1.0, 0.6)]:
        pending = [proposals.propose(img.array, CLASSES, lam, threshold) for img in images]
        results = regions.embed_batch([p.region_request for p in pending])  # four requests, one batch
        for img, waiting, result in zip(images, pending, results):
            assert result.batch_requests == len(images)
            masks = waiting.region_request.masks()
            assert masks.dtype.is_floating_point is False
            assert masks.shape == waiting.proposals.mask_logits.shape
            np.testing.assert_array_equal(masks.numpy(), waiting.proposals.binary_masks(threshold).numpy())
            output = proposals.finish(waiting, result)
            np.testing.assert_array_equal(output.labels, library.segment(img.array, CLASSES, lam, threshold).labels)


def test_multipart_parser_keeps_binary_content_exactly():
    payload = b"\r\n--not-the-boundary\r\n\x00\xff" + os.urandom(5000) + b"\r\n\r\n--"
    request = httpx.Request(
        "POST", "http://x/", files={"image": ("a b\".png", payload, "image/png")},
        data={"classes": ["sky", "red car, parked"], "lambda": "0.5"},
    )
    body = request.read()
    parts = parse_multipart(body, request.headers["content-type"])
    by_name = {}
    for part in parts:
        by_name.setdefault(part.name, []).append(part)
    assert by_name["image"][0].data == payload
    assert [p.data for p in by_name["classes"]] == [b"sky", b"red car, parked"]
    parsed = parse_segment_request(body, request.headers["content-type"], Limits(), DEFAULTS)
    assert parsed.classes == ["sky", "red car, parked"] and parsed.lam == 0.5 and parsed.image_bytes == payload
    assert parsed.outputs == ["label_png"] and parsed.mask_threshold == 0.4
    with pytest.raises(MultipartError, match="no closing boundary") as error:
        parse_multipart(body[: len(body) // 2], request.headers["content-type"])
    assert error.value.status == 400
    with pytest.raises(RequestError, match="no closing boundary") as error:
        parse_segment_request(body[:-10], request.headers["content-type"], Limits(), DEFAULTS)
    assert error.value.status == 400


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_corrupted_images_are_400_or_decode_never_another_error(images):
    """Fuzzed JPEG/PNG/BMP/TIFF (BMP and TIFF headers made Pillow raise MemoryError / OverflowError)."""
    rng = np.random.default_rng(0)
    small = images[0].array[:48, :64]
    sources = [images[0].data, encode_png(images[0].array), encode_png(images[0].array[..., 0]),
               _encoded(small, "BMP"), _encoded(small, "TIFF")]
    for data in sources:
        for _ in range(60):
            corrupt = bytearray(data)
            cut = int(rng.integers(8, len(corrupt)))
            for position in rng.integers(0, len(corrupt), size=int(rng.integers(1, 20))):
                corrupt[position] = int(rng.integers(0, 256))
            try:
                decoded = decode_checked(bytes(corrupt[: cut if rng.random() < 0.5 else len(corrupt)]), "x", 10**7)
            except RequestError as exc:
                assert exc.status in (400, 413) and exc.message
            else:
                assert decoded.dtype == np.uint8 and decoded.ndim == 3
            try:  # the library decoder used by mining, evaluation and segment-batch: one named error
                decode_image(bytes(corrupt), "fuzzed")
            except ImageDecodeError as exc:
                assert "fuzzed" in str(exc)


def test_uri_prefixes(tmp_path):
    allowed = ["s3://images/", "s3://media/public", str(tmp_path)]
    assert uri_allowed("s3://images/a.jpg", allowed) and not uri_allowed("s3://other/a.jpg", allowed)
    assert uri_allowed("s3://media/public/a.jpg", allowed)
    assert not uri_allowed("s3://media/public-private/a.jpg", allowed)
    assert not uri_allowed("s3://images-private/a.jpg", ["s3://images"])
    assert uri_allowed("s3://x/a.jpg", ["s3://"])  # every bucket, when that is really meant
    assert uri_allowed(str(tmp_path / "a.jpg"), allowed)
    assert not uri_allowed(str(tmp_path / ".." / "a.jpg"), allowed)
    assert not uri_allowed(str(tmp_path) + "-sibling/a.jpg", allowed)
    assert not uri_allowed("gs://images/a.jpg", allowed) and not uri_allowed("s3://images/a.jpg", [])
    # issue 15.2: normalised and percent-decoded before the check, for every scheme; dot segments refused
    web = ["http://host/public/", "s3://media/public"]
    assert uri_allowed("http://host/public/a.jpg", web) and uri_allowed("HTTP://HOST/public/a%20b.jpg", web)
    for escape in ("http://host/public/../private/a.jpg", "http://host/public/%2e%2e/private/a.jpg",
                   "http://host/public/./../private/a.jpg", "http://host/public/.%2E/private/a.jpg",
                   "http://host/public/%252e%252e/private/a.jpg", "http://host/public/..%5Cprivate/a.jpg",
                   "http://host/public/..\\private/a.jpg", "s3://media/public/../private/a.jpg",
                   "s3://media/public/%2e%2e/private/a.jpg", "http://host/public/.", "http://host/publicity/a.jpg",
                   "http://host/public%2F..%2Fprivate/a.jpg", "http://other/public/a.jpg", "https://host/public/a.jpg"):
        assert not uri_allowed(escape, web), escape
    assert not uri_allowed(str(tmp_path / "a\x00.jpg"), allowed) and not uri_allowed("\udc80", allowed)


def test_serve_config_validation_names_the_field(tmp_path):
    from ovseg_ray.models.text import MAX_NAME_CHARS
    from ovseg_ray.outputs import OUTPUT_KINDS
    from ovseg_ray.serving.config import MAX_NAME_CHARS as MIRRORED
    from ovseg_ray.serving.config import OutputKind

    assert set(OutputKind.__args__) == set(OUTPUT_KINDS) and MIRRORED == MAX_NAME_CHARS
    cases = [
        ({"classifier": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}}, "classifier"),
        ({"proposer": {"autoscaling": {"min_replicas": 5, "max_replicas": 2}}}, "proposer.autoscaling"),
        ({"classifier": {"max_ongoing_requests": 4}}, "batching.max_batch_requests (16)"),
        ({"limits": {"max_classes": 0}}, "limits.max_classes"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"ingress": {"num_gpus": -1}}, "ingress.num_gpus"),
        ({"default_outputs": ["jpeg"]}, "default_outputs"),
        ({"batchng": {}}, "batchng"),
    ]
    for data, field in cases:
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
            load_serve_config(str(path))
    from ovseg_ray.serving.app import deployment_options

    options = deployment_options("classifier", ServeConfig().classifier)  # no GPU in the session's Ray
    assert options["ray_actor_options"]["num_gpus"] == 0 and options["num_replicas"] == 1
    with pytest.raises(ValueError, match="no GPUs"):
        deployment_options("classifier", ServeConfig(classifier={"num_gpus": 0.5}).classifier)


def test_application_builder_takes_nested_or_dotted_args():
    """``serve run ovseg_ray.serving:app_builder limits.max-classes=5 ...`` and a deploy file's nested args."""
    from ray.serve.deployment import Application

    from ovseg_ray.serving import app_builder
    from ovseg_ray.serving.app import app
    from ovseg_ray.serving.config import config_from_app_args

    config = config_from_app_args({"model": {"preset": "tiny", "seed": 3}, "model.seed": "4", "limits.max-classes": "5",
                                   "limits.image-uri-prefixes": "s3://a/,s3://b/", "batching.max_batch_requests": "64"})
    assert (config.model.preset, config.model.seed, config.limits.max_classes) == ("tiny", 4, 5)
    assert config.limits.image_uri_prefixes == ["s3://a/", "s3://b/"]  # the classifier's options come from the file
    with pytest.raises(ConfigError, match=r"application args: invalid config:\n  limits.max_classes"):
        config_from_app_args({"limits.max-classes": "0"})
    assert isinstance(app_builder({"model.preset": "tiny"}), Application) and isinstance(app, Application)


def test_cluster_serve_config_is_a_valid_serve_deploy_file(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    path = os.path.join(REPO, "cluster", "serve_config.yaml")
    data = yaml.safe_load(open(path))
    schema = ServeDeploySchema.model_validate(data)
    assert schema.applications[0].import_path == "ovseg_ray.serving:app_builder"
    config = load_serve_config(path)
    assert config.http.port == 8000 and config.http.host == "0.0.0.0"
    proposer, classifier = config.proposer.autoscaling, config.classifier.autoscaling
    assert proposer is not None and classifier is not None and proposer != classifier
    assert config.proposer.num_gpus == 0.5 and config.classifier.num_gpus == 0.5

    assert config.ingress.num_replicas == 2 and config.ingress.max_queued_requests == 256

    # what `ovseg-ray serve` deploys is this file's own form, read back the same
    from ovseg_ray.serving.config import STAGE_DEPLOYMENTS, application_entry

    entry = application_entry(config, {stage: getattr(config, stage).num_gpus for stage in STAGE_DEPLOYMENTS})
    written = tmp_path / "written.yaml"
    written.write_text(yaml.safe_dump({**data, "applications": [entry]}))
    assert load_serve_config(str(written)) == config

    cases = [({"name": "RegionClassifier", "num_replicas": 3, "user_config": {}}, "RegionClassifier: user_config"),
             ({"name": "RegionClassifier", "ray_actor_options": {"memory": 1}}, "ray_actor_options.memory"),
             ({"name": "Classifier"}, "unknown deployment 'Classifier'")]
    for deployment, message in cases:
        data["applications"][0]["deployments"] = [deployment]
        written.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            load_serve_config(str(written))
    data["applications"][0]["deployments"] = [{"name": "RegionClassifier", "num_replicas": 3}]
    data["applications"][0]["args"]["classifier"] = {"num_replicas": 2}
    written.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="the classifier stage is set twice"):
        load_serve_config(str(written))


def test_cli_serve_reports_config_errors(tmp_path, capsys):
    from ovseg_ray.cli import main

    bad = tmp_path / "serve.yaml"
    bad.write_text("classifier:\n  num_replicas: 0\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "classifier.num_replicas" in capsys.readouterr().err
    assert main(["serve", "--limits.max-pixels", "-5"]) == 2
    assert "limits.max_pixels" in capsys.readouterr().err
    assert main(["serve", "--config", os.path.join(REPO, "cluster", "serve_config.yaml"), "--http.port", "1"]) == 2
    assert "cannot override a serve deploy file" in capsys.readouterr().err
