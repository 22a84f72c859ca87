"""Logging setup shared by every process: one format, level from OPD_LOG_LEVEL."""

from __future__ import annotations

import logging
import os


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=os.environ.get("OPD_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
    )
    return logging.getLogger(name)
