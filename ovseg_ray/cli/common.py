"""Arguments and checks shared by several commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pydantic import BaseModel

from ..config import add_config_arguments


def add_config_command(subparsers, name: str, help: str, description: str, config: type[BaseModel],
                       run: Callable[[argparse.Namespace], int], ray_address: bool = False) -> None:
    """A command whose flags are the fields of ``config`` (plus ``--config FILE``), optionally ``--address``."""
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    if ray_address:
        parser.add_argument("--address", default=None,
                            help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on this machine)")
    add_config_arguments(parser, config)
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", help='comma-separated class names, e.g. "sky,grass,red circle"')
    parser.add_argument("--classes-file", help="file (path or s3://) with one class name per line")
    parser.add_argument("--preset", default="tiny",
                        help="model preset: tiny (ships weights trained on the open world), r101c-vitb16, swinb-vitl14 (default tiny), "
                             "or a model config .json such as a training run's final/model_config.json")
    parser.add_argument("--weights", default="default",
                        help="whole-model checkpoint, path or s3:// URI: our layout or an OVSeg release .pth; "
                             "default: the preset's shipped weights (tiny's; random for the others); none: "
                             "seeded random weights")
    parser.add_argument("--clip-weights", default=None,
                        help="CLIP-only weights (OpenAI ViT-*.pt, OpenCLIP checkpoint or `ovseg-ray convert "
                             "--preset P` output) that replace the model's CLIP after --weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def read_class_names(classes: str | None, classes_file: str | None) -> list[str]:
    """Class names from ``--classes`` or ``--classes-file`` (one per line, blank lines skipped; or a .json
    class list, ``{"classes": [...]}``)."""
    from ..models.text import clean_class_names, distinct_class_names, read_class_file

    if classes and classes_file:
        raise ValueError("give either --classes or --classes-file, not both")
    if classes_file and classes_file.endswith(".json"):  # a class list such as the world's classes/all.json
        from ..data.benchmarks import read_class_names as read_class_list

        return clean_class_names(read_class_list(classes_file))
    if classes_file:
        return read_class_file(classes_file)
    if classes is None:
        raise ValueError("no classes given: use --classes or --classes-file")
    return distinct_class_names([c for c in classes.split(",")] if classes.strip() else [])


#: Set by Ray's job supervisor for a submitted job's entrypoint (``ray job submit``, a KubeRay RayJob).
RAY_JOB_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def refuse_relative_paths_in_job(paths: dict[str, str | list[str] | None]) -> None:
    """Inside a Ray job, refuse relative local output/storage paths (``{field: path or paths}``).

    A submitted job runs in Ray's temporary copy of ``--working-dir`` (``runtime_resources/
    working_dir_files/_ray_pkg_*``), which Ray deletes after the job, and each node resolves a relative
    path on its own disk: what is written there is lost. Outside a job a relative path is the usual
    path from the current directory.
    """
    if RAY_JOB_MARKER not in os.environ:
        return
    from ..data import storage

    for field, value in paths.items():
        for path in [value] if isinstance(value, str) else value or []:
            if not storage.is_remote(path) and not os.path.isabs(str(path).removeprefix("file://")):
                raise ValueError(
                    f"{field} {path!r} is a relative path, and this runs inside a Ray job: it would land in the "
                    f"job's temporary working directory ({os.getcwd()}), which Ray deletes afterwards, on each "
                    f"node's own disk; give an absolute path on storage every node shares, or an s3:// URI")


def run_training(args: argparse.Namespace, config, train: Callable):
    """Join or start Ray and run a Ray Train command's ``train(config)``; its summary, or None after a
    one-line error when training failed for good (a re-run resumes from the last checkpoint). Inside a
    Ray job a relative ``run.storage_path`` (every command's default) is refused first."""
    from ray.train import TrainingFailedError

    from ..raycluster import init_ray

    refuse_relative_paths_in_job({"run.storage_path": config.run.storage_path})
    init_ray(args.address)
    try:
        return train(config)
    except TrainingFailedError as exc:
        print(f"error: training failed after {config.run.max_failures} retries: {exc}; re-run the same "
              f"command to resume from the last checkpoint", file=sys.stderr)
        return None
