"""crossmodal: image + text learning pipelines, from a manifest to a promoted fused model.

Stages (plain functions, no orchestration inside): ``validation`` -> ``features`` -> ``training`` ->
``evaluation`` -> ``registry``; ``serving`` is the model users call, ``pipeline`` the stage cache. ``flows/`` runs
the stages with Prefect, ``dvc.yaml`` with DVC, and ``crossmodal`` (the CLI) with either.
"""

from __future__ import annotations

from crossmodal import environment

__version__ = "0.1.0"

environment.set_env_defaults()
