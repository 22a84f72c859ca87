"""`opd` command line: a thin dispatcher; each command's module owns its config and `main(argv)`.

opd teacher serve      gRPC teacher service            services/teacher/server.py
opd rollout serve      HTTP rollout service            services/rollout/server.py
opd rollout work       rollout worker -> Redis         services/worker/main.py
opd train              trainer                         trainer/train.py
opd up                 whole pipeline locally          launcher/pipeline.py
opd toy prepare        toy task data + models          experiments/toy/prepare.py
opd toy prepare-multi  two-task toy (math + agent)     experiments/toy/multitask.py
opd experiment NAME    paper experiments               experiments/paper.py
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("teacher", "serve"): ("services.teacher.server", "run the teacher gRPC service"),
    ("rollout", "serve"): ("services.rollout.server", "run the rollout HTTP service"),
    ("rollout", "work"): ("services.worker.main", "run a rollout worker (prompts -> Redis)"),
    ("train",): ("trainer.train", "run the trainer"),
    ("up",): ("launcher.pipeline", "run the whole pipeline locally"),
    ("toy", "prepare"): ("experiments.toy.prepare", "make the toy task's data and models"),
    ("toy", "prepare-multi"): ("experiments.toy.multitask", "make the two-task toy's data and models"),
    ("experiment",): ("experiments.paper", "run a paper experiment"),
}


def usage() -> str:
    lines = ["usage: opd COMMAND [options]   (opd COMMAND --help for options)", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<20} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module = importlib.import_module(COMMANDS[key][0])
            return int(module.main(argv[n:]) or 0)
    print(usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


def run() -> None:
    """Process entry point: `main`, then exit without interpreter teardown.

    After a service has drained and stopped cleanly, native threads that gRPC and vLLM leave behind can
    abort() in their destructors during interpreter finalisation (seen: "terminate called without an active
    exception", exit -6), which would turn a clean stop into a crash for supervisors and probes. Everything
    the process owns is closed by then, so the exit skips finalisation after flushing logs and streams.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
