"""The ``crossmodal`` command: one command per stage, ``run`` for the whole Prefect flow, registry and schedule.

    crossmodal run --manifest data/products/manifest.csv --text-column title
    crossmodal promote --version 3
    crossmodal rollback
    crossmodal schedule --cron "0 3 * * *" --timezone UTC
    crossmodal ui

Stage commands (``demo-data``, ``validate``, ``extract``, ``train``, ``evaluate``, ``register``) read and write
fixed paths so ``dvc.yaml`` can chain them. Every command reads ``params.yaml`` (``--params``); options override it.
Heavy libraries are imported inside the commands so ``crossmodal --help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from crossmodal.artifacts import IMAGE_FEATURES_FILE, METRICS_FILE, TEXT_FEATURES_FILE, VALIDATED_FILE
from crossmodal.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-modal (image + text) learning: validate, extract, train, compare, register, promote.")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read (defaults apply when absent).")]
ManifestOpt = Annotated[Path | None, typer.Option(help="Manifest (.csv, .jsonl or .parquet); default from params.")]
DataRootOpt = Annotated[Path | None, typer.Option(help="Folder image paths must stay inside (default: the "
                                                          "manifest's folder).")]
ColOpt = Annotated[str | None, typer.Option(help="Manifest column holding this field.")]
AllowMissingOpt = Annotated[str | None, typer.Option(
    "--allow-missing", help="Keep rows whose image or text is absent: none | image | text | either "
                            "(default validation.allow_missing: none, such rows are quarantined).")]
ModalityDropoutOpt = Annotated[float | None, typer.Option(
    "--modality-dropout", help="Chance per training row and modality of hiding it, so heads learn to predict "
                               "from one modality (default train.modality_dropout: 0).")]


def _missing_overrides(allow_missing: str | None = None, modality_dropout: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if allow_missing is not None:
        out["validation.allow_missing"] = allow_missing
    if modality_dropout is not None:
        out["train.modality_dropout"] = modality_dropout
    return out


FinetuneOpt = Annotated[bool | None, typer.Option(
    "--finetune/--no-finetune", help="Train the fine-tuned cross-attention head finetune_xattn (default: "
                                     "train.finetune.enabled in params; it also needs finetune_xattn in train.heads).")]


def _finetune_override(finetune: bool | None) -> dict[str, Any]:
    return {} if finetune is None else {"train.finetune.enabled": finetune}


ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Recompute every stage even when its inputs and settings are unchanged, and register the model "
                    "even when an identical one is registered (default: unchanged stages are served from the stage "
                    "cache under paths.cache, an identical model is not registered again).")]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs) -> Any:
    """Run ``fn``; a user-facing error becomes one clear message and exit code 2, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        _fail(str(err))


def _config(params: Path, manifest: Path | None = None, data_root: Path | None = None,
            columns: dict[str, str | None] | None = None, extra: dict[str, Any] | None = None):
    from crossmodal.config import load_config

    overrides: dict[str, Any] = dict(extra or {})
    if manifest is not None:
        overrides["data.manifest"] = str(manifest)
    if data_root is not None:
        overrides["data.data_root"] = str(data_root)
    for role, name in (columns or {}).items():
        if name:
            overrides[f"data.columns.{role}"] = name
    return _guard(load_config, params, overrides), overrides


def _columns(image, text, label, id_, split, group) -> dict[str, str | None]:
    return {"image": image, "text": text, "label": label, "id": id_, "split": split, "group": group}


@app.command("demo-data")
def demo_data(out: Annotated[Path, typer.Option(help="Folder for manifest.csv and images/.")] = Path("data/demo"),
              params: ParamsOpt = Path("params.yaml"),
              force: Annotated[bool, typer.Option(help="Regenerate even if the folder exists.")] = False) -> None:
    """Generate the embedded demo dataset (memes and captions: sarcasm needs both modalities)."""
    from crossmodal.data.demo import generate_demo

    cfg, _ = _config(params)
    manifest = out / "manifest.csv"
    if manifest.exists() and not force:
        typer.echo(f"demo dataset already at {manifest} (use --force to regenerate)")
        return
    path = generate_demo(out, cfg.demo)
    typer.echo(f"demo dataset written to {path}")


@app.command()
def validate(manifest: ManifestOpt = None, out: Annotated[Path, typer.Option(help="Output folder.")] = Path(
             "work/validated"), params: ParamsOpt = Path("params.yaml"), data_root: DataRootOpt = None,
             image_column: ColOpt = None, text_column: ColOpt = None, label_column: ColOpt = None,
             id_column: ColOpt = None, split_column: ColOpt = None, group_column: ColOpt = None,
             allow_missing: AllowMissingOpt = None) -> None:
    """Validate a manifest (Great Expectations + row checks); bad rows go to quarantine.csv."""
    from crossmodal.validation.validate import validate_manifest

    cols = _columns(image_column, text_column, label_column, id_column, split_column, group_column)
    cfg, _ = _config(params, manifest, data_root, cols, _missing_overrides(allow_missing))
    result = _guard(validate_manifest, cfg.data.manifest, cfg, out)
    typer.echo(f"rows: {result.rows_in} in = {result.rows_kept} kept + {result.rows_quarantined} quarantined "
               f"({result.quarantine_path})")


@app.command()
def extract(validated: Annotated[Path, typer.Option(help="Folder written by `validate`.")] = Path("work/validated"),
            out: Annotated[Path, typer.Option(help="Output folder.")] = Path("work/features"),
            params: ParamsOpt = Path("params.yaml")) -> None:
    """Extract image and text features with the pretrained encoders (cached by content)."""
    from crossmodal.features.extract import extract_features

    cfg, _ = _config(params)
    res = _guard(extract_features, validated / VALIDATED_FILE, cfg.encoders, cfg.paths.cache, out)
    typer.echo(f"features: image {res.image_path} (computed={res.computed['image']}), "
               f"text {res.text_path} (computed={res.computed['text']})")


@app.command()
def train(validated: Annotated[Path, typer.Option(help="Folder written by `validate`.")] = Path("work/validated"),
          features: Annotated[Path, typer.Option(help="Folder written by `extract`.")] = Path("work/features"),
          out: Annotated[Path, typer.Option(help="Output folder.")] = Path("work/models"),
          params: ParamsOpt = Path("params.yaml"), modality_dropout: ModalityDropoutOpt = None,
          finetune: FinetuneOpt = None) -> None:
    """Train every head named in params (train.heads) on the cached features, then the fine-tuned head."""
    from crossmodal.training.train import train_all

    cfg, _ = _config(params, extra={**_missing_overrides(modality_dropout=modality_dropout),
                                    **_finetune_override(finetune)})
    result = _guard(train_all, validated / VALIDATED_FILE, features / IMAGE_FEATURES_FILE, features / TEXT_FEATURES_FILE,
                    cfg.train, out, cfg.encoders, cfg.paths.cache)
    typer.echo(f"trained {', '.join(result.heads)} into {out}")


@app.command()
def evaluate(models: Annotated[Path, typer.Option(help="Folder written by `train`.")] = Path("work/models"),
             out: Annotated[Path, typer.Option(help="Reports folder.")] = Path("reports")) -> None:
    """Evaluate every trained head; writes metrics.json, plots and per-class reports."""
    from crossmodal.evaluation.evaluate import evaluate_all
    from crossmodal.evaluation.tables import comparison_table, robustness_table

    metrics = _guard(evaluate_all, models, out)
    typer.echo(comparison_table(metrics))
    typer.echo("robustness (test macro-F1 with a modality removed):\n" + robustness_table(metrics))


@app.command()
def register(manifest: ManifestOpt = None,
             validated: Annotated[Path, typer.Option(help="Folder written by `validate`.")] = Path("work/validated"),
             models: Annotated[Path, typer.Option(help="Folder written by `train`.")] = Path("work/models"),
             reports: Annotated[Path, typer.Option(help="Folder written by `evaluate`.")] = Path("reports"),
             summary: Annotated[Path | None, typer.Option(help="Summary JSON path.")] = None,
             params: ParamsOpt = Path("params.yaml"),
             force: Annotated[bool, typer.Option("--force", help="Register even when an identical model is "
                                                                  "registered already.")] = False) -> None:
    """Log the run to MLflow, register the best head, and run the champion/challenger gate.

    Nothing is logged or registered when the registry already holds an identical model (same fingerprint)."""
    from crossmodal.registry.publish import publish, render

    cfg, _ = _config(params, manifest)
    out = _guard(publish, cfg, cfg.data.manifest, validated, models, reports, summary or cfg.paths.summary,
                 force=force)
    typer.echo(render(out, json.loads((reports / METRICS_FILE).read_text())))


def _stages_line(stages: dict[str, dict]) -> str:
    return "stages: " + ", ".join(f"{name} {'cached' if rec.get('cached') else 'computed'} ({rec['seconds']:.1f} s)"
                                  for name, rec in stages.items())


def _run_flow(cfg_overrides: dict[str, Any], params: Path, summary: Path | None, force: bool = False) -> dict:
    from crossmodal.registry.publish import render
    from flows.training import run_training

    result = _guard(run_training, str(params), cfg_overrides, str(summary) if summary else None, force)
    metrics = json.loads((Path(result["work_dir"]) / "reports" / METRICS_FILE).read_text())
    typer.echo("\n" + render(result, metrics))
    if result.get("stages"):
        typer.echo(_stages_line(result["stages"]))
    typer.echo(f"summary: {summary or 'reports/summary.json'}")
    return result


@app.command()
def run(manifest: ManifestOpt = None, params: ParamsOpt = Path("params.yaml"), data_root: DataRootOpt = None,
        image_column: ColOpt = None, text_column: ColOpt = None, label_column: ColOpt = None,
        id_column: ColOpt = None, split_column: ColOpt = None, group_column: ColOpt = None,
        summary: Annotated[Path | None, typer.Option(help="Where to write the summary JSON "
                                                             "(default paths.summary: reports/summary.json).")] = None,
        heads: Annotated[str | None, typer.Option(help="Comma-separated heads to train (default: all).")] = None,
        model_name: Annotated[str | None, typer.Option(help="Registered model name (default mlflow.model_name); "
                                                               "use one per dataset or task.")] = None,
        experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default mlflow.experiment).")] = None,
        loss: Annotated[str | None, typer.Option(help="Training loss: cross_entropy or focal (train.loss).")] = None,
        focal_gamma: Annotated[float | None, typer.Option(help="Focal loss gamma (train.focal_gamma).")] = None,
        aux_loss_weight: Annotated[float | None, typer.Option(help="Weight of the auxiliary unimodal losses of "
                                                                      "fusion heads (train.aux_loss_weight).")] = None,
        ogm_ge: Annotated[bool | None, typer.Option("--ogm-ge/--no-ogm-ge", help="OGM-GE gradient modulation "
                                                       "of the dominant modality (train.ogm_ge.enabled).")] = None,
        ogm_alpha: Annotated[float | None, typer.Option(help="OGM-GE strength (train.ogm_ge.alpha).")] = None,
        stacking_meta: Annotated[str | None, typer.Option(help="Stacking meta-classifier: logistic or mlp "
                                                                  "(train.stacking.meta).")] = None,
        epochs: Annotated[int | None, typer.Option(help="Most epochs per head (train.max_epochs).")] = None,
        allow_missing: AllowMissingOpt = None, modality_dropout: ModalityDropoutOpt = None,
        finetune: FinetuneOpt = None, force: ForceOpt = False,
        ) -> None:
    """Run the whole pipeline as a Prefect flow: validate, extract, train all heads, evaluate, register, gate.

    Stages whose inputs, settings and code are unchanged are skipped (served from paths.cache), and an unchanged
    model is not registered again; --force recomputes everything."""
    cols = _columns(image_column, text_column, label_column, id_column, split_column, group_column)
    extra: dict[str, Any] = {**_missing_overrides(allow_missing, modality_dropout), **_finetune_override(finetune)}
    for key, value in (("train.loss", loss), ("train.focal_gamma", focal_gamma),
                       ("train.aux_loss_weight", aux_loss_weight), ("train.ogm_ge.enabled", ogm_ge),
                       ("train.ogm_ge.alpha", ogm_alpha), ("train.stacking.meta", stacking_meta),
                       ("train.max_epochs", epochs)):
        if value is not None:
            extra[key] = value
    if heads:
        extra["train.heads"] = [h.strip() for h in heads.split(",") if h.strip()]
    if model_name:
        extra["mlflow.model_name"] = model_name
    if experiment:
        extra["mlflow.experiment"] = experiment
    _, overrides = _config(params, manifest, data_root, cols, extra)  # validated here, before Prefect starts
    _run_flow(overrides, params, summary, force)


@app.command()
def demo(params: ParamsOpt = Path("params.yaml"),
         summary: Annotated[Path | None, typer.Option(help="Summary JSON path.")] = None,
         finetune: FinetuneOpt = None, force: ForceOpt = False) -> None:
    """Generate the demo dataset (once) and run the whole pipeline on it (unchanged stages are skipped)."""
    demo_dir = Path("data/demo")
    demo_data(out=demo_dir, params=params, force=False)  # validates params.yaml; reuses existing data
    _run_flow({"data.manifest": str(demo_dir / "manifest.csv"), **_finetune_override(finetune)}, params, summary,
              force)


@app.command()
def promote(version: Annotated[int, typer.Option(help="Model version to make champion.")],
            params: ParamsOpt = Path("params.yaml"),
            model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None) -> None:
    """Move the `champion` alias to a version by hand."""
    from crossmodal.registry import promotion, tracking

    cfg, _ = _config(params)
    tracking.configure(cfg.mlflow)
    name = model_name or cfg.mlflow.model_name
    _guard(promotion.promote, name, version)
    typer.echo(f"{name}: champion is now version {version}")


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml"),
             model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None) -> None:
    """Move the `champion` alias back to the previous champion."""
    from crossmodal.registry import promotion, tracking

    cfg, _ = _config(params)
    tracking.configure(cfg.mlflow)
    name = model_name or cfg.mlflow.model_name
    version = _guard(promotion.rollback, name)
    typer.echo(f"{name}: champion rolled back to version {version}")


@app.command()
def schedule(cron: Annotated[str, typer.Option(help='Cron expression, e.g. "0 3 * * *".')],
             timezone: Annotated[str, typer.Option(help="IANA timezone of the cron expression.")] = "UTC",
             params: ParamsOpt = Path("params.yaml"),
             name: Annotated[str, typer.Option(help="Deployment name.")] = "crossmodal-retrain") -> None:
    """Serve the training flow on a cron schedule (needs a Prefect server and PREFECT_API_URL)."""
    from flows.schedule import build_deployment, serve

    _guard(build_deployment, cron, timezone, str(params), None, name)  # validate before talking to the server
    typer.echo(f"serving crossmodal-training/{name} on '{cron}' ({timezone}); Ctrl-C to stop")
    _guard(serve, cron, timezone, str(params), None, name)


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
       params: ParamsOpt = Path("params.yaml")) -> None:
    """Open the MLflow UI on the project's store (http://127.0.0.1:PORT)."""
    from crossmodal.registry import tracking

    cfg, _ = _config(params)
    uri = tracking.resolve_tracking_uri(cfg.mlflow)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    typer.echo(" ".join(cmd))
    os.execv(sys.executable, cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
