"""Text embeddings: 14-template ensemble against open_clip directly, the LRU cache, bad names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_ray.models.clip import clip_tokenizer, create_clip
from ovseg_ray.models.text import VILD_TEMPLATES, TextEmbedder, read_class_file


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    torch.manual_seed(0)
    return create_clip("ovseg-tiny-vit"), clip_tokenizer("ovseg-tiny-vit")


def test_fourteen_vild_templates():
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    assert all(t.count("{}") == 1 for t in VILD_TEMPLATES)


def test_ensemble_matches_open_clip_by_hand(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    embedder = TextEmbedder(clip, tokenizer)
    got = embedder(["sky", "red circle"])
    for row, name in enumerate(["sky", "red circle"]):
        with torch.no_grad():
            per_template = clip.encode_text(tokenizer([t.format(name) for t in VILD_TEMPLATES]))
        per_template = per_template / per_template.norm(dim=-1, keepdim=True)
        mean = per_template.mean(dim=0)
        assert torch.allclose(got[row], mean / mean.norm(), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_cache_is_per_name_and_lru(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    embedder = TextEmbedder(clip, tokenizer, templates=("a photo of a {}.",), cache_size=2)
    first = embedder(["cat", "dog"])
    assert (embedder.misses, embedder.hits) == (2, 0)
    again = embedder(["dog", " cat "])  # names are stripped
    assert (embedder.misses, embedder.hits) == (2, 2)
    assert torch.equal(again, first.flip(0))
    embedder(["bird"])  # evicts the least recently used name ("dog")
    embedder(["cat"])
    assert embedder.misses == 3
    embedder(["dog"])
    assert embedder.misses == 4
    with torch.no_grad():
        direct = F.normalize(clip.encode_text(tokenizer(["a photo of a dog."])), dim=-1)[0]
    assert torch.allclose(embedder(["dog"])[0], direct, atol=1e-6)


def test_alone_gives_each_uncached_name_its_own_forward(clip_and_tokenizer, monkeypatch):
    """Mining embeds nouns alone, so an embedding never depends on the names asked for with it."""
    clip, tokenizer = clip_and_tokenizer
    embedder = TextEmbedder(clip, tokenizer, templates=("a photo of a {}.", "a {}."))
    batches = []
    encode = clip.encode_text
    monkeypatch.setattr(clip, "encode_text", lambda tokens: batches.append(len(tokens)) or encode(tokens))
    embedder(["cat"])
    alone = embedder(["cat", "dog", "bird", "dog"], alone=True)
    assert batches == [2, 2, 2]  # cat once (then cached), dog and bird one forward each
    embedder(["tree", "wall"])
    assert batches[3:] == [4]  # shared forward by default
    fresh = torch.cat([TextEmbedder(clip, tokenizer, templates=embedder.templates)([n]) for n in ["cat", "dog", "bird"]])
    assert torch.equal(alone[:3], fresh) and torch.equal(alone[3], alone[1])


def test_text_tower_has_no_gradient(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    assert not TextEmbedder(clip, tokenizer)(["tree"]).requires_grad


@pytest.mark.parametrize("names, message", [([], "empty"), (["sky", "  "], "#1 is empty"),
                                             (["x" * 201], "characters long")])
def test_bad_class_names_are_named(clip_and_tokenizer, names, message):
    clip, tokenizer = clip_and_tokenizer
    with pytest.raises(ValueError, match=message):
        TextEmbedder(clip, tokenizer)(names)


def test_class_file_one_name_per_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(" sky \n\nred circle\n  \nwall\n")
    assert read_class_file(str(path)) == ["sky", "red circle", "wall"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=f"class file {path} has no class names"):
        read_class_file(str(path))
