"""Class names to CLIP text embeddings: template ensemble, frozen text tower, LRU cache per name.

Mining, training, serving and evaluation all embed names through :class:`TextEmbedder`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# The 14 ViLD prompt templates used by OVSeg (paper appendix).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)
BARE_TEMPLATE: tuple[str, ...] = ("{}",)
#: Template sets by the name configs use (``templates`` / ``text_templates``).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"vild": VILD_TEMPLATES, "bare": BARE_TEMPLATE}
MAX_NAME_CHARS = 200


def clean_class_names(names: Sequence[str]) -> list[str]:
    """Strip names and refuse an empty list, empty names and over-long names, naming the culprit."""
    if isinstance(names, str):
        raise TypeError("class names must be a list of strings, not one string")
    cleaned = [str(name).strip() for name in names]
    if not cleaned:
        raise ValueError("the class list is empty: give at least one class name")
    for index, name in enumerate(cleaned):
        if not name:
            raise ValueError(f"class name #{index} is empty")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"class name #{index} is {len(name)} characters long (limit {MAX_NAME_CHARS})")
    return cleaned


def distinct_class_names(names: Sequence[str]) -> list[str]:
    """A vocabulary someone gives (``--classes``, a class file, a config, a request), cleaned, with no
    name twice: outputs are keyed by name (pixel fractions, RLEs), so a repeated name would make them
    contradict the label map. Segment, segment-batch and the service all follow this one rule."""
    cleaned = clean_class_names(names)
    first: dict[str, int] = {}
    for index, name in enumerate(cleaned):
        if name in first:
            raise ValueError(f"class name #{index} ({name!r}) repeats class name #{first[name]}")
        first[name] = index
    return cleaned


def read_class_file(uri: str) -> list[str]:
    """Class names from a file (path or s3://), one per line, blank lines skipped; then cleaned, each once."""
    from ..data import storage

    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"class file {uri} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class file {uri} has no class names")
    return distinct_class_names(names)


class TextEmbedder:
    """Embeds class names with a frozen CLIP text tower.

    Each template embedding is L2-normalised, the templates are averaged and the mean renormalised.
    Results are kept in an LRU cache keyed by name (call :meth:`clear` after changing weights).
    Names are embedded in shared forwards by default; ``alone=True`` gives each its own forward,
    so that its embedding never depends on which other names were asked for with it (batched
    matmuls round differently with the batch's size, which moves embeddings by about 1e-7).
    """

    def __init__(
        self,
        clip_model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        templates: Sequence[str] = VILD_TEMPLATES,
        cache_size: int = 8192,
        batch_size: int = 256,
    ):
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every text template must contain '{}'")
        self.clip_model = clip_model
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def device(self) -> torch.device:
        return next(self.clip_model.parameters()).device

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    @torch.no_grad()
    def _embed_uncached(self, names: list[str]) -> torch.Tensor:
        prompts = [template.format(name) for name in names for template in self.templates]
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            chunks.append(F.normalize(self.clip_model.encode_text(tokens).float(), dim=-1))
        per_template = torch.cat(chunks).view(len(names), len(self.templates), -1)
        return F.normalize(per_template.mean(dim=1), dim=-1)

    def __call__(self, names: Sequence[str], alone: bool = False) -> torch.Tensor:
        """(N, D) unit-norm embeddings, on the model's device, in the order of ``names``.

        ``alone``: names not yet cached are embedded one per forward (see the class docstring).
        """
        names = clean_class_names(names)
        with self._lock:
            missing = list(dict.fromkeys(n for n in names if n not in self._cache))
            self.hits += len(names) - len(missing)
            self.misses += len(missing)
            if missing:
                groups = [[name] for name in missing] if alone else [missing]
                for group in groups:
                    for name, embedding in zip(group, self._embed_uncached(group)):
                        self._cache[name] = embedding
            for name in names:
                self._cache.move_to_end(name)
            result = torch.stack([self._cache[name] for name in names])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return result
