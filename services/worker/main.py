"""`opd rollout work`: one rollout worker process (prompts -> rollout service -> teacher -> Redis)."""

from __future__ import annotations

import logging

from opd_teacher_client import TeacherClient

from services.common.config import report_config_errors
from services.common.logs import setup_logging
from services.common.redis_keys import connect
from services.rollout.client import RolloutClient
from services.worker.config import load_config
from services.worker.loop import RolloutWorker


@report_config_errors("opd rollout work")
def main(argv: list[str] | None = None) -> int:
    cfg = load_config(argv)
    setup_logging("worker")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the progress
    rollout = RolloutClient(
        cfg.rollout_url,
        token=cfg.rollout_token,
        timeout_s=cfg.rollout_timeout_s,
        retries=cfg.rollout_resends,
        tls_ca_file=cfg.rollout_tls_ca_file,
    )
    teacher = TeacherClient(
        cfg.teacher,
        token=cfg.teacher_token,
        timeout_s=cfg.teacher_timeout_s,
        tls_ca_file=cfg.teacher_tls_ca_file,
    )
    with rollout, teacher:
        worker = RolloutWorker(cfg, rollout, teacher, connect(cfg.redis_url))
        worker.install_signal_handlers()
        worker.run()
    return 0
