"""Quiet, offline defaults for the libraries crossmodal drives, set before any of them is imported.

An explicit user setting always wins (``setdefault``): a user with internet can unset ``HF_HUB_OFFLINE`` to fetch
hub models. ``import crossmodal`` applies them, so every entry point (CLI, flows, a loaded pyfunc model, a training
worker process) gets them before Prefect, MLflow or transformers read their settings.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Prefect's client-side telemetry (3.9): on a terminal it also prints a first-run notice into the output.
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def set_env_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
