"""The small-scale reproduction in a quick configuration: every stage runs through its real command, and
each learns beyond chance: its loss below what a uniform predictor gets, and on held-out images the
oracle rows above the same evaluation with random weights. The paper's orderings are measured by the
full run (docs/reproduction.md), not here."""

from __future__ import annotations

import json
import math

import pytest

from ovseg_ray.data.world import SEEN
from ovseg_ray.workflows.reproduce import ROWS, ReproduceConfig, StepTimes, reproduce


def test_a_finished_steps_time_survives_a_rerun_and_each_step_is_saved_at_once(tmp_path):
    path = str(tmp_path / "timings.json")
    times = StepTimes(path)
    times.record("pretrain-clip", 651.04)
    assert json.loads((tmp_path / "timings.json").read_text()) == {"pretrain-clip": 651.0}  # before any later step
    again = StepTimes(path)  # a re-run: the finished step is reported in no time
    again.record("pretrain-clip", 0.02)
    again.record("mine", 103.0)
    assert json.loads((tmp_path / "timings.json").read_text()) == {"pretrain-clip": 651.0, "mine": 103.0}


def _history(out, row: str) -> list[dict]:
    return json.loads((out / "runs" / row / "final" / "summary.json").read_text())["history"]


def _chance(out, row: str) -> dict:
    """The row's evaluation again through the real ``eval`` command, with seeded random weights
    (``model.weights: none``): what the stage scores before it learns anything."""
    from ovseg_ray.cli import main

    config = json.loads((out / "eval" / f"{row}.yaml").read_text())  # reproduce writes JSON, which is YAML
    config["out"], config["model"]["weights"] = str(out / "chance" / row), "none"
    path = out / "chance" / f"{row}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    assert main(["eval", "--config", str(path)]) == 0
    return json.loads((out / "chance" / row / "results.json").read_text())["benchmarks"]["world"]["metrics"]


# Part of the default run: about five minutes on this 2-core machine (283 s on 2026-12-03, with the
# two chance evaluations and the re-run), mostly Ray starting processes for each of its 16 commands.
# The sizes are the cheapest of the runs measured in which both oracle rows beat random weights
# (docs/reproduction.md, "The quick configuration").
@pytest.mark.slow
@pytest.mark.reproduce
def test_quick_reproduction_every_stage_learns_beyond_chance(ray_session, tmp_path):
    config = ReproduceConfig(out=str(tmp_path / "r"), seed=3, images=48, eval_images=16, clip_images=48, clip_epochs=10,
                             clip_batch=8, maskformer_steps=300, maskformer_batch=4, adapt_epochs=2, adapt_batch=16,
                             figure_images=1, cpus=0.5, preprocess_cpus=0.25)
    summary = reproduce(config)
    out = tmp_path / "r"

    clip = _history(out, "clip")  # symmetric InfoNCE: a uniform predictor scores ln(batch)
    print("pretrain-clip loss per epoch:", [round(h["loss"], 3) for h in clip])
    assert clip[-1]["loss"] < math.log(config.clip_batch) < clip[0]["loss"] + 0.5

    maskformer = _history(out, "maskformer")  # cross-entropy over the seen classes + no object
    print("train-maskformer ce per window:", [round(h["ce"], 3) for h in maskformer])
    assert maskformer[-1]["ce"] < math.log(len(SEEN) + 1)

    mined = json.loads((out / "mined" / "summary.json").read_text())
    assert mined["complete"] and mined["images_with_pairs"] == config.images and mined["unique_nouns"] >= 20

    for row in ("mpt", "ft", "ft-mpt", "gt-ft"):
        losses = [h["loss"] for h in _history(out, row)]
        print(f"train-clip {row} loss per epoch:", [round(v, 3) for v in losses])
        assert losses[-1] < losses[0]

    scores = summary["mIoU"]
    assert set(scores) == set(ROWS)
    print("mIoU (all):", {row: round(s["all"], 2) for row, s in scores.items()})
    # On the held-out images, against the same evaluation with random weights: the pretrained CLIP
    # names ground-truth regions (oracle masks), the MaskFormer's masks cover them (oracle labels).
    # A random MaskFormer's blobs, each given its best class, already score well above 100/72.
    for row in ("oracle-masks", "oracle-labels"):
        chance = _chance(out, row)["mIoU"]
        print(f"{row}: trained {scores[row]['all']:.2f}, random weights {chance:.2f}")
        assert scores[row]["all"] > chance
    for name in ("results.md", "results.json", "figure.png", "model_card.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "Table 3" in report and "Table 2" in report and "Oracle analysis" in report

    again = reproduce(config)  # everything is there: nothing is redone, the same numbers come back
    assert again["mIoU"] == scores
    assert again["timings"]["pretrain-clip"] == summary["timings"]["pretrain-clip"] > 1  # the first run's cost
