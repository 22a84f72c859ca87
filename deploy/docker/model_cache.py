#!/usr/bin/env python3
"""The shared model cache of the teacher pods: fill it, or wait until it is filled.

    opd-model-cache fill [--config /etc/opd/opd.toml]   download every teacher model, then mark it ready
    opd-model-cache wait [--config /etc/opd/opd.toml]   block until every teacher model is marked ready

The models are the config's `[teacher] model` and each `[tasks.*] teacher_model` that is a hub id (a path
is not downloaded). `fill` (the Job `model-download`) removes a model's marker, runs `snapshot_download` into
HF_HOME and, only once every file the hub lists for the model is in the snapshot, writes the marker
`$HF_HOME/opd-ready/<org>--<name>` again: a download cut short leaves no marker, so a partly written
snapshot is never taken for a cached model. `wait` (the teachers' init
container) polls for the markers and logs what it still waits for, so a teacher pod stays in `Init` until
the Job has finished instead of failing and restarting without its model. A cache filled by hand needs the
markers too: `touch $HF_HOME/opd-ready/<org>--<name>` after the download. `wait` waits for every teacher
model of the config, not only its own Deployment's: the Job fills them all in one go.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

DEFAULT_CONFIG = "/etc/opd/opd.toml"


def teacher_models(config: dict) -> list[str]:
    """The hub ids of every teacher model the config names, each once, in order."""
    models = [config.get("teacher", {}).get("model", "")]
    models += [task.get("teacher_model", "") for task in config.get("tasks", {}).values()]
    return list(dict.fromkeys(m for m in models if m and not m.startswith(("/", ".", "~"))))


def ready_dir(hf_home: str | None = None) -> Path:
    return Path(hf_home or os.environ.get("HF_HOME", "/cache/huggingface")) / "opd-ready"


def marker(model: str, hf_home: str | None = None) -> Path:
    return ready_dir(hf_home) / model.replace("/", "--")


def fill(
    models: list[str],
    download: Callable[[str], str],
    list_files: Callable[[str], list[str]],
    hf_home: str | None = None,
) -> None:
    """Download each model (snapshot_download fetches only the files not yet cached) and mark it ready once
    every file the hub lists for it is in the returned snapshot. The old mark goes first: a rerun after the
    hub's `main` moved points the cache at a new, partly fetched snapshot until the download returns."""
    ready_dir(hf_home).mkdir(parents=True, exist_ok=True)
    for model in models:
        marker(model, hf_home).unlink(missing_ok=True)
        print(f"{model}: downloading into the model cache", flush=True)
        path = download(model)
        # snapshot_download may hand back what is cached when the hub cannot be reached; the listing needs
        # the hub, so a mark always means "complete as the hub lists it now".
        absent = [f for f in list_files(model) if not (Path(path) / f).exists()]
        if absent:
            raise RuntimeError(
                f"{model}: the snapshot at {path} lacks {len(absent)} files, e.g. {absent[:3]}"
            )
        marker(model, hf_home).write_text(f"{path}\n")
        print(f"{model}: cached at {path}", flush=True)


def missing(models: list[str], hf_home: str | None = None) -> list[str]:
    return [m for m in models if not marker(m, hf_home).is_file()]


def wait(
    models: list[str],
    hf_home: str | None = None,
    poll_s: float = 10.0,
    log_every_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Block until every model is marked ready; returns the seconds waited (counted in polls)."""
    waited, logged = 0.0, -log_every_s
    while todo := missing(models, hf_home):
        if waited - logged >= log_every_s:
            print(
                f"waiting {waited:.0f} s for the model-download Job: {', '.join(todo)} not cached", flush=True
            )
            logged = waited
        sleep(poll_s)
        waited += poll_s
    print(f"model cache ready: {', '.join(models) or 'no hub models'}", flush=True)
    return waited


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd-model-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["fill", "wait"])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--poll-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    with open(args.config, "rb") as fh:
        models = teacher_models(tomllib.load(fh))
    if args.action == "fill":
        from huggingface_hub import list_repo_files, snapshot_download

        fill(models, snapshot_download, list_repo_files)
    else:
        wait(models, poll_s=args.poll_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
