"""A small Python client for the OVSeg HTTP service (``ovseg-ray serve``).

    from ovseg_ray.serving.client import OVSegClient

    with OVSegClient("http://127.0.0.1:8000") as client:
        result = client.segment("street.jpg", ["road", "car", "tree", "sky"], outputs=["label_png", "rle"])
        print(result.pixel_fractions)
        car = result.mask("car")  # (H, W) bool
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from ..data import storage
from ..data.images import decode_label_png, encode_png


class OVSegError(RuntimeError):
    """The service refused the request (4xx) or failed (5xx); ``detail`` is its message."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


@dataclass
class Segmentation:
    """A decoded ``POST /v1/segment`` response."""

    classes: list[str]
    pixel_fractions: dict[str, float]
    timings: dict[str, float]
    labels: np.ndarray | None = None  # (H, W) class index per pixel, when label_png was requested
    overlay_png: bytes | None = None
    rle: dict[str, dict] | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def mask(self, name: str) -> np.ndarray:
        """(H, W) bool mask of class ``name`` (from the label map, else from its RLE)."""
        if name not in self.classes:
            raise KeyError(f"{name!r} is not one of the requested classes")
        if self.labels is not None:
            return self.labels == self.classes.index(name)
        if self.rle is not None:
            from pycocotools import mask as mask_utils

            if name not in self.rle:
                return np.zeros((self.raw["height"], self.raw["width"]), dtype=bool)
            rle = {"size": self.rle[name]["size"], "counts": self.rle[name]["counts"].encode("ascii")}
            return mask_utils.decode(rle).astype(bool)
        raise ValueError("request label_png or rle to get masks")


def _image_payload(image: str | os.PathLike | bytes | np.ndarray) -> tuple[str, bytes] | str:
    """(filename, bytes) to upload, or a remote URI for the server to read itself."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        return "image.png", encode_png(np.ascontiguousarray(image))
    if isinstance(image, bytes | bytearray):
        return "image", bytes(image)
    uri = os.fspath(image)
    if storage.is_remote(uri):
        return uri
    return os.path.basename(uri), storage.read_bytes(uri)


class OVSegClient:
    """Talks to one service URL; reuses its HTTP connection (close it, or use ``with``)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 120.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> OVSegClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> dict:
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = {"detail": response.text}
        if response.status_code >= 400:
            raise OVSegError(response.status_code, str(body.get("detail", body)))
        return body

    def health(self) -> bool:
        return self._check(self._http.get("/healthz")).get("status") == "ok"

    def info(self) -> dict:
        return self._check(self._http.get("/v1/info"))

    def segment(
        self,
        image: str | os.PathLike | bytes | np.ndarray,
        classes: Sequence[str],
        lam: float | None = None,
        mask_threshold: float | None = None,
        outputs: Sequence[str] = ("label_png",),
    ) -> Segmentation:
        """Segment ``image`` (a path, an ``s3://`` URI the server reads, encoded bytes, or an RGB array)."""
        if isinstance(classes, str):
            raise TypeError("classes must be a list of names, not one string")
        payload = _image_payload(image)
        params: dict = {"classes": list(classes), "outputs": list(outputs)}
        if lam is not None:
            params["lambda"] = lam
        if mask_threshold is not None:
            params["mask_threshold"] = mask_threshold
        if isinstance(payload, str):
            response = self._http.post("/v1/segment", json={**params, "image_uri": payload})
        else:
            form = {
                "classes": json.dumps(params["classes"]),
                "outputs": ",".join(params["outputs"]),
                **{k: str(v) for k, v in params.items() if k in ("lambda", "mask_threshold")},
            }
            response = self._http.post("/v1/segment", data=form, files={"image": payload})
        return self._decode(self._check(response))

    @staticmethod
    def _decode(body: dict) -> Segmentation:
        outputs = body.get("outputs", {})
        labels = None
        if "label_png" in outputs:
            labels = decode_label_png(base64.b64decode(outputs["label_png"]), "label_png").astype(np.int32)
        overlay = base64.b64decode(outputs["overlay_png"]) if "overlay_png" in outputs else None
        return Segmentation(
            classes=body["classes"],
            pixel_fractions=body["pixel_fractions"],
            timings=body.get("timings", {}),
            labels=labels,
            overlay_png=overlay,
            rle=outputs.get("rle"),
            raw=body,
        )


def overlay_image(segmentation: Segmentation) -> np.ndarray:
    """The overlay PNG as an (H, W', 3) uint8 array (the legend widens it)."""
    from PIL import Image

    if segmentation.overlay_png is None:
        raise ValueError("request overlay_png to get the overlay")
    with Image.open(io.BytesIO(segmentation.overlay_png)) as img:
        return np.asarray(img.convert("RGB"))
