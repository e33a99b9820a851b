"""Read the tensors of a checkpoint file (local path or ``s3://``) without running code from it.

Containers understood:

- safetensors (any layout; ``__metadata__`` is kept);
- torch files (zip or legacy) read with ``torch.load(weights_only=True)``, numpy arrays allowed as
  plain data; a pickle that needs anything else is refused unless the caller opts in with
  ``trust_pickle`` (only ``ovseg-ray convert --trust-pickle`` does);
- TorchScript archives (OpenAI's ``ViT-B-16.pt``): the tensor records are read from the archive's
  ``data.pkl`` with an unpickler that admits only tensor-rebuilding functions and inert placeholders
  for TorchScript classes. The archive's code is never compiled or run (no ``torch.jit.load``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file

from ..data import storage
from .errors import CheckpointError

# Where the state dict sits inside common checkpoint wrappers, outermost first.
WRAPPER_KEYS = ("state_dict", "model", "module")


@dataclass
class RawCheckpoint:
    """The flat tensor mapping found in a file, plus where it came from."""

    source: str
    container: str  # "safetensors", "torch", "torchscript" or "pickle (trusted)"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def read_tensors(uri: str, trust_pickle: bool = False) -> RawCheckpoint:
    """Every tensor of the checkpoint at ``uri`` (see module docstring for what is accepted)."""
    uri = str(uri)
    local = not storage.is_remote(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if local:
        if not os.path.exists(uri):
            raise FileNotFoundError(f"file not found: {uri}")
        if os.path.isdir(uri):
            raise IsADirectoryError(f"expected a checkpoint file, found a directory: {uri}")
        with open(uri, "rb") as handle:
            head = handle.read(64)
        data = None
    else:
        data = storage.read_bytes(uri)
        head = data[:64]
    size = os.path.getsize(uri) if local else len(data)
    if _is_safetensors_header(head, size):
        return _read_safetensors(uri, data)
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") > size - 8:
        raise CheckpointError(f"cannot read safetensors file {uri}: its header says it is longer than the "
                              f"{size} bytes there (truncated?)")
    kind = _not_a_checkpoint(head, size)
    if kind:
        raise CheckpointError(f"{uri} is not a checkpoint: it is {kind} ({size} bytes). Expected a safetensors "
                              f"file, a torch checkpoint (.pt/.pth, zip or pickle) or an OpenAI TorchScript archive")
    zipped = head.startswith(b"PK\x03\x04")
    if zipped:
        try:
            archive = zipfile.ZipFile(uri if local else io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from None
        if _is_torchscript(archive):
            return RawCheckpoint(uri, "torchscript", read_torchscript_tensors(archive, uri))
    return _read_torch(uri, data, trust_pickle, zipped)


# First bytes of files that are often given by mistake, and what they are.
_FILE_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                    b"RIFF": "a RIFF file (WebP image, WAV sound)", b"\x1f\x8b": "a gzip archive",
                    b"\x89HDF": "an HDF5 file", b"%PDF": "a PDF document", b"BZh": "a bzip2 archive",
                    b"\xfd7zXZ": "an xz archive", b"7z\xbc\xaf": "a 7-zip archive"}


def _not_a_checkpoint(head: bytes, size: int) -> str | None:
    """What the file is when its first bytes rule out every container read here (zip, or the binary
    pickle of a legacy ``torch.save``); None when it may be a checkpoint."""
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return None
    for signature, kind in _FILE_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # perhaps cut inside a character: try without the last bytes
        text = head[:-3].decode("utf-8", "ignore")
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "a text file"
    return f"no format read here (it starts with {head[:8].hex(' ')})"


def _is_safetensors_header(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _read_safetensors(uri: str, data: bytes | None) -> RawCheckpoint:
    try:
        if data is None:
            with open(uri, "rb") as handle:
                header = _safetensors_header(handle)
            tensors = load_safetensors_file(uri)
        else:
            header = _safetensors_header(io.BytesIO(data))  # BytesIO shares a bytes buffer: no copy
            tensors = load_safetensors_bytes(data)
    except Exception as exc:  # a truncated or corrupt file: say which one
        raise CheckpointError(f"cannot read safetensors file {uri}: {exc}") from None
    return RawCheckpoint(uri, "safetensors", dict(tensors), dict(header.get("__metadata__", {}) or {}))


def _safetensors_header(handle) -> dict:
    """The JSON header of a safetensors stream positioned at its start."""
    return json.loads(handle.read(int.from_bytes(handle.read(8), "little")))


def safetensors_metadata(uri: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header ({} for other formats)."""
    fs, path = storage.filesystem(uri)
    size = fs.size(path)
    with fs.open(path, "rb") as handle:
        if not _is_safetensors_header(handle.read(10), size):
            return {}
        handle.seek(0)
        try:
            header = _safetensors_header(handle)
        except ValueError as exc:
            raise CheckpointError(f"cannot read safetensors file {uri}: corrupt header ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata or {})


def _numpy_safe_globals() -> list:
    """Numpy array reconstruction, admitted as plain data (what torch's docs recommend)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [reconstruct, np.ndarray, np.dtype, *dtype_classes]


def _read_torch(uri: str, data: bytes | None, trust_pickle: bool, zipped: bool) -> RawCheckpoint:
    source = uri if data is None else io.BytesIO(data)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            # a local zip file is memory-mapped: tensors are paged in as they are copied into the model
            obj = torch.load(source, map_location="cpu", weights_only=True, mmap=zipped and data is None)
        container = "torch"
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            reason = _first_line_with(str(exc), "GLOBAL") or str(exc).splitlines()[0]
            raise CheckpointError(
                f"{uri} is a pickle that needs more than tensors to load ({reason.strip()}). Unpickling it "
                f"fully could run arbitrary code, so it is refused. If you trust where it came from, convert "
                f"it once: `ovseg-ray convert {uri} OUT.safetensors --trust-pickle`, then use OUT.safetensors."
            ) from None
        source = uri if data is None else io.BytesIO(data)
        obj = torch.load(source, map_location="cpu", weights_only=False)
        container = "pickle (trusted)"
    except Exception as exc:  # truncated or foreign files fail in many ways: name the file and the reason
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise CheckpointError(f"cannot read checkpoint {uri}: {lines[0]}") from None
    return RawCheckpoint(uri, container, find_state_dict(obj, uri))


def _first_line_with(text: str, needle: str) -> str:
    return next((line for line in text.splitlines() if needle in line), "")


def find_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping in ``obj``: itself, or under ``state_dict`` / ``model`` / ``module``."""
    while isinstance(obj, Mapping):
        inner = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"no state dict found in checkpoint {source} (found a {type(obj).__name__})")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value.copy(order="C"))
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
    if not tensors:
        raise CheckpointError(f"no tensors found in checkpoint {source}")
    return tensors


# ---- TorchScript archives -------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class ScriptObject:
    """Inert stand-in for a TorchScript class instance: it only keeps the pickled attributes."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, Mapping) else {}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


def _identity(value, *args):
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    """Admits tensor records and placeholders only; any other global is an error naming it."""

    ALLOWED = {
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch.jit._pickle", "restore_type_tag"): _identity,
        ("torch.jit._pickle", "build_intlist"): list,
        ("torch.jit._pickle", "build_doublelist"): list,
        ("torch.jit._pickle", "build_boollist"): list,
        ("torch.jit._pickle", "build_tensorlist"): list,
        ("torch.jit._pickle", "build_tensor_from_id"): _identity,
    }

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise CheckpointError(f"TorchScript archive {self.source} refers to {module}.{name}, which is not a "
                              f"tensor record; refusing to read it")

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        """A tensor record, checked to lie inside its storage before it is viewed."""
        size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
        if len(size) != len(stride) or storage_offset < 0 or min(size + stride, default=0) < 0:
            raise CheckpointError(f"TorchScript archive {self.source}: a tensor record has a malformed shape "
                                  f"{list(size)} / stride {list(stride)} / offset {storage_offset}")
        end = storage_offset + (sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(size) else 0)
        if end > storage.numel():
            raise CheckpointError(f"TorchScript archive {self.source}: a tensor record of shape {list(size)} at "
                                  f"offset {storage_offset} reaches value {end} of a storage record holding "
                                  f"{storage.numel()} (corrupt archive?)")
        return storage.as_strided(size, stride, storage_offset)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"TorchScript archive {self.source}: unexpected record {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
            if flat.numel() < numel:
                raise CheckpointError(f"TorchScript archive {self.source}: record {key} is truncated")
            self.storages[key] = flat
        return self.storages[key]


def read_torchscript_tensors(archive: zipfile.ZipFile, source: str) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript module archive, named like its ``state_dict``."""
    data_name = next((n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")), None)
    if data_name is None:
        raise CheckpointError(f"TorchScript archive {source} has no data.pkl (unsupported, older format)")
    prefix = data_name[: -len("data.pkl")]
    try:
        root = _TorchScriptUnpickler(archive.read(data_name), archive, prefix, source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged archive fails in many ways: name it and the reason
        raise CheckpointError(f"cannot read TorchScript archive {source}: {type(exc).__name__}: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    _flatten(root, "", tensors)
    if not tensors:
        raise CheckpointError(f"no tensors found in TorchScript archive {source}")
    return tensors


def _flatten(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(node, ScriptObject):
        for name, value in getattr(node, "attributes", {}).items():
            _flatten(value, f"{prefix}{name}.", out)
    elif isinstance(node, torch.Tensor):
        out[prefix[:-1]] = node
