"""crossmodal: image + text learning pipelines, from a manifest to a promoted fused model.

Stages (plain functions, no orchestration inside): ``validate`` -> ``extract`` ->
``train`` -> ``evaluate`` -> ``register``. ``flows/`` runs them with Prefect,
``dvc.yaml`` with DVC, and ``crossmodal`` (the CLI) with either.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Quiet, offline defaults for the stack. An explicit user setting always wins
# (setdefault): a user with internet can unset HF_HUB_OFFLINE to fetch hub models.
_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
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
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


set_env_defaults()
