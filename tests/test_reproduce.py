"""The small-scale reproduction in a quick configuration: every stage runs through its real command, and
each learns beyond chance (its loss below what a uniform predictor gets, the oracle above a chance
labelling). The paper's orderings are measured by the full run (docs/reproduction.md), not here."""

from __future__ import annotations

import json
import math

import pytest

from ovseg_ray.data.world import CLASSES, SEEN
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


# Opt-in (``pytest -m reproduce``): on this 2-core machine it takes about ten minutes (625 s on
# 2026-12-03, mostly Ray starting processes for each of its 16 commands), which the suite's time
# budget cannot hold yet (see docs/reproduction.md).
@pytest.mark.slow
@pytest.mark.reproduce
def test_quick_reproduction_every_stage_learns_beyond_chance(ray_session, tmp_path):
    config = ReproduceConfig(out=str(tmp_path / "r"), seed=3, images=48, eval_images=6, clip_epochs=6, clip_batch=24,
                             maskformer_steps=60, maskformer_batch=4, adapt_epochs=2, adapt_batch=16, figure_images=1,
                             cpus=0.5, preprocess_cpus=0.25)
    summary = reproduce(config)
    out = tmp_path / "r"

    clip = _history(out, "clip")  # symmetric InfoNCE: a uniform predictor scores ln(batch)
    print("pretrain-clip loss per epoch:", [round(h["loss"], 3) for h in clip])
    assert clip[-1]["loss"] < math.log(config.clip_batch) < clip[0]["loss"] + 0.5

    maskformer = _history(out, "maskformer")  # cross-entropy over the seen classes + no object
    print("train-maskformer ce per window:", [round(h["ce"], 3) for h in maskformer])
    assert maskformer[-1]["ce"] < math.log(len(SEEN) + 1) < maskformer[0]["ce"]

    mined = json.loads((out / "mined" / "summary.json").read_text())
    assert mined["complete"] and mined["images_with_pairs"] == config.images and mined["unique_nouns"] >= 20

    for row in ("mpt", "ft", "ft-mpt", "gt-ft"):
        losses = [h["loss"] for h in _history(out, row)]
        print(f"train-clip {row} loss per epoch:", [round(v, 3) for v in losses])
        assert losses[-1] < losses[0]

    scores = summary["mIoU"]
    assert set(scores) == set(ROWS)
    chance = 100 / len(CLASSES)
    print("mIoU (all):", {row: round(s["all"], 1) for row, s in scores.items()})
    assert scores["oracle-labels"]["all"] > chance  # trained proposals, each given its true class
    for name in ("results.md", "results.json", "figure.png", "model_card.md"):
        assert (out / name).stat().st_size > 0
    report = (out / "results.md").read_text()
    assert "Table 3" in report and "Table 2" in report and "Oracle analysis" in report

    again = reproduce(config)  # everything is there: nothing is redone, the same numbers come back
    assert again["mIoU"] == scores
    assert again["timings"]["pretrain-clip"] == summary["timings"]["pretrain-clip"] > 1  # the first run's cost
