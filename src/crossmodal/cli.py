"""The ``crossmodal`` command: one command per stage, ``run`` for the whole Prefect flow, registry and schedule.

    crossmodal run --manifest data/products/manifest.csv --text-column title
    crossmodal tune --manifest data/demo/manifest.csv --trials 20     # then: crossmodal run --params tuned.yaml
    crossmodal predict --manifest data/new/manifest.csv --out predictions.parquet
    crossmodal promote --version 3 --reason "fixes the night-time photos"
    crossmodal rollback
    crossmodal history
    crossmodal runs --limit 10
    crossmodal config show --set train.max_epochs=3
    crossmodal report --open
    crossmodal schedule --cron "0 3 * * *" --timezone UTC
    crossmodal ui

Stage commands (``demo-data``, ``validate``, ``extract``, ``train``, ``evaluate``, ``register``) read and write
fixed paths so ``dvc.yaml`` can chain them. Every command reads ``params.yaml`` (``--params``); options override it,
and ``--set KEY=VALUE`` (any dotted setting, the value read as YAML) overrides both.
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


SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="Set any setting by its dotted key, the value read as YAML; repeatable, wins "
                                       "over params.yaml and the other options: --set train.max_epochs=30 --set "
                                       "train.heads=[concat,gated] --set data.data_root=null. `crossmodal config "
                                       "show` lists every key.")]

# The per-knob options and the settings they set: aliases of --set KEY=VALUE, named as the source of a value.
_ALIASES = {"data.manifest": "--manifest", "data.data_root": "--data-root",
            **{f"data.columns.{role}": f"--{role}-column" for role in ("image", "text", "label", "id", "split",
                                                                       "group")},
            "validation.allow_missing": "--allow-missing", "train.modality_dropout": "--modality-dropout",
            "train.finetune.enabled": "--finetune/--no-finetune", "train.heads": "--heads",
            "train.loss": "--loss", "train.focal_gamma": "--focal-gamma", "train.aux_loss_weight": "--aux-loss-weight",
            "train.ogm_ge.enabled": "--ogm-ge/--no-ogm-ge", "train.ogm_ge.alpha": "--ogm-alpha",
            "train.stacking.meta": "--stacking-meta", "train.max_epochs": "--epochs",
            "mlflow.model_name": "--model-name", "mlflow.experiment": "--experiment"}


def _overrides(manifest: Path | None = None, data_root: Path | None = None,
               columns: dict[str, str | None] | None = None, extra: dict[str, Any] | None = None,
               sets: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The dotted overrides of the options and ``--set`` items (``--set`` last, so it wins), and each one's source."""
    from crossmodal.config import SET_SOURCE, parse_set

    overrides: dict[str, Any] = dict(extra or {})
    if manifest is not None:
        overrides["data.manifest"] = str(manifest)
    if data_root is not None:
        overrides["data.data_root"] = str(data_root)
    for role, name in (columns or {}).items():
        if name:
            overrides[f"data.columns.{role}"] = name
    sources = {key: f"option {_ALIASES.get(key, key)}" for key in overrides}
    for key, value in _guard(parse_set, sets).items():
        overrides[key] = value
        sources[key] = SET_SOURCE
    return overrides, sources


def _config(params: Path, manifest: Path | None = None, data_root: Path | None = None,
            columns: dict[str, str | None] | None = None, extra: dict[str, Any] | None = None,
            sets: list[str] | None = None):
    from crossmodal.config import load_config_with_sources

    overrides, sources = _overrides(manifest, data_root, columns, extra, sets)
    cfg, _ = _guard(load_config_with_sources, params, overrides, sources)
    return cfg, overrides


def _columns(image, text, label, id_, split, group) -> dict[str, str | None]:
    return {"image": image, "text": text, "label": label, "id": id_, "split": split, "group": group}


@app.command("demo-data")
def demo_data(out: Annotated[Path, typer.Option(help="Folder for manifest.csv and images/.")] = Path("data/demo"),
              params: ParamsOpt = Path("params.yaml"),
              force: Annotated[bool, typer.Option(help="Regenerate even if the folder exists.")] = False,
              set_: SetOpt = None) -> None:
    """Generate the embedded demo dataset (memes and captions: sarcasm needs both modalities)."""
    from crossmodal.data.demo import generate_demo

    cfg, _ = _config(params, sets=set_)
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
             allow_missing: AllowMissingOpt = None, set_: SetOpt = None) -> None:
    """Validate a manifest (Great Expectations + row checks); bad rows go to quarantine.csv."""
    from crossmodal.validation.validate import validate_manifest

    cols = _columns(image_column, text_column, label_column, id_column, split_column, group_column)
    cfg, _ = _config(params, manifest, data_root, cols, _missing_overrides(allow_missing), sets=set_)
    result = _guard(validate_manifest, cfg.data.manifest, cfg, out)
    typer.echo(f"rows: {result.rows_in} in = {result.rows_kept} kept + {result.rows_quarantined} quarantined "
               f"({result.quarantine_path})")


@app.command()
def extract(validated: Annotated[Path, typer.Option(help="Folder written by `validate`.")] = Path("work/validated"),
            out: Annotated[Path, typer.Option(help="Output folder.")] = Path("work/features"),
            params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Extract image and text features with the pretrained encoders; only items not yet in the store are encoded."""
    from crossmodal.features.extract import extract_features

    cfg, _ = _config(params, sets=set_)
    res = _guard(extract_features, validated / VALIDATED_FILE, cfg.encoders, cfg.paths.cache, out)
    for kind, path in (("image", res.image_path), ("text", res.text_path)):
        typer.echo(f"{kind} features: {path} ({res.encoded[kind]} distinct {kind}s encoded, "
                   f"{res.reused[kind]} from the store)")


DaskAddressOpt = Annotated[str | None, typer.Option(
    help="Run every task on the Dask cluster whose scheduler is at tcp://HOST:PORT (else $CROSSMODAL_DASK_ADDRESS, "
         "else orchestration.dask_address); the run's folders must be on storage every worker shares.")]


@app.command()
def train(validated: Annotated[Path, typer.Option(help="Folder written by `validate`.")] = Path("work/validated"),
          features: Annotated[Path, typer.Option(help="Folder written by `extract`.")] = Path("work/features"),
          out: Annotated[Path, typer.Option(help="Output folder.")] = Path("work/models"),
          params: ParamsOpt = Path("params.yaml"), modality_dropout: ModalityDropoutOpt = None,
          finetune: FinetuneOpt = None, dask_address: DaskAddressOpt = None, set_: SetOpt = None) -> None:
    """Train every head named in params (train.heads) on the cached features, each head a task of a Prefect flow
    on the task runner that orchestration chooses (as in `crossmodal run`)."""
    _, overrides = _config(params, extra={**_missing_overrides(modality_dropout=modality_dropout),
                                          **_finetune_override(finetune)}, sets=set_)

    def flow() -> dict:
        from flows.training import run_train

        return run_train(str(validated / VALIDATED_FILE), str(features / IMAGE_FEATURES_FILE),
                         str(features / TEXT_FEATURES_FILE), str(out), str(params), overrides, dask_address)

    result = _guard(flow)
    typer.echo(f"trained {', '.join(result['heads'])} into {out}")


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
                                                                  "registered already.")] = False,
             set_: SetOpt = None) -> None:
    """Log the run to MLflow, register the best head, and run the champion/challenger gate.

    Nothing is logged or registered when the registry already holds an identical model (same fingerprint)."""
    from crossmodal.registry.publish import publish, render

    cfg, _ = _config(params, manifest, sets=set_)
    out = _guard(publish, cfg, cfg.data.manifest, validated, models, reports, summary or cfg.paths.summary,
                 force=force)
    typer.echo(render(out, json.loads((reports / METRICS_FILE).read_text())))


PlainOpt = Annotated[bool, typer.Option("--plain", help="Plain text, no colours or live display (the default "
                                                          "when stdout is not a terminal).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Also show what the libraries log (Prefect, MLflow) and "
                                                              "their progress bars.")]


def _run_flow(cfg_overrides: dict[str, Any], params: Path, summary: Path | None, force: bool = False,
              plain: bool = False, verbose: bool = False, options: dict[str, str] | None = None,
              dask_address: str | None = None) -> dict:
    """Check the inputs, run the Prefect flow with its progress on screen, then the tables and closing lines.

    ``options``: the command's option for each input (``crossmodal.console.preflight``), named in an error."""
    import shutil
    import time

    from crossmodal.artifacts import PROGRESS_DIR
    from crossmodal.config import load_config
    from crossmodal.console.chatter import quiet_libraries
    from crossmodal.console.display import RunDisplay, head_plan
    from crossmodal.console.preflight import RUN_OPTIONS, check_inputs
    from crossmodal.console.report import show_run
    from crossmodal.console.terminal import Terminal

    cfg = _guard(load_config, params, cfg_overrides)
    _guard(check_inputs, cfg, options=RUN_OPTIONS if options is None else options)  # before any server starts
    term = Terminal(plain=plain, verbose=verbose)
    # Chosen here, before the flow makes its run folder, so the display can watch it from the start.
    progress_dir = Path(cfg.paths.work).resolve() / PROGRESS_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"

    def flow() -> dict:
        with quiet_libraries(term.warn, verbose=verbose):
            from flows.training import run_training

            with RunDisplay(progress_dir, term, head_plan(cfg)):
                return run_training(str(params), cfg_overrides, str(summary) if summary else None, force,
                                    progress_dir=str(progress_dir), progress_bars=verbose,
                                    dask_address=dask_address)

    try:
        result = _guard(flow)  # a user error inside the flow: printed once, after the display has stopped
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    metrics_path = Path(result["work_dir"]) / "reports" / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    show_run(term, result, metrics, str(summary or cfg.paths.summary))
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
        finetune: FinetuneOpt = None, force: ForceOpt = False, plain: PlainOpt = False, verbose: VerboseOpt = False,
        dask_address: DaskAddressOpt = None, set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow: validate, extract, train all heads, evaluate, register, gate.

    Stages whose inputs, settings and code are unchanged are skipped (served from paths.cache), and an unchanged
    model is not registered again; --force recomputes everything. The terminal shows each stage, the extraction
    and every head's epochs as they happen, then the comparison table, the gate's verdict and report.html."""
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
    _, overrides = _config(params, manifest, data_root, cols, extra, sets=set_)  # checked before Prefect starts
    _run_flow(overrides, params, summary, force, plain, verbose, dask_address=dask_address)


@app.command()
def tune(manifest: ManifestOpt = None, params: ParamsOpt = Path("params.yaml"), data_root: DataRootOpt = None,
         image_column: ColOpt = None, text_column: ColOpt = None, label_column: ColOpt = None,
         id_column: ColOpt = None, split_column: ColOpt = None, group_column: ColOpt = None,
         trials: Annotated[int, typer.Option(min=1, help="Trials in all, the heads taking turns; each head's "
                                                         "first is its current settings.")] = 20,
         timeout: Annotated[float | None, typer.Option(min=1, help="Seconds of search after which no trial "
                                                                   "starts (those running finish).")] = None,
         heads: Annotated[str | None, typer.Option(help="Comma-separated heads to tune (default: the loop-trained "
                                                        "heads of train.heads and the two unimodal ones).")] = None,
         out: Annotated[Path, typer.Option(help="The params file to write: the configuration read, with the best "
                                                "settings per head as train.head_params.")] = Path("tuned.yaml"),
         epochs: Annotated[int | None, typer.Option(help="Most epochs per trial (train.max_epochs).")] = None,
         plain: PlainOpt = False, verbose: VerboseOpt = False, dask_address: DaskAddressOpt = None,
         set_: SetOpt = None) -> None:
    """Search each frozen-feature head's hidden size, dropout, learning rate, weight decay, batch size, modality
    dropout and patience (Optuna TPE, median pruning) on validation macro-F1; every trial a task, as in `run`.

    Writes --out, which `crossmodal run --params tuned.yaml` reads; the search is an MLflow run with one nested run
    per trial (experiment <mlflow.experiment>-tune)."""
    import shutil
    import time

    from crossmodal.artifacts import PROGRESS_DIR
    from crossmodal.config import load_config
    from crossmodal.console.chatter import quiet_libraries
    from crossmodal.console.preflight import RUN_OPTIONS, check_inputs
    from crossmodal.console.terminal import Terminal
    from crossmodal.console.tuning import TrialLines, tune_rows

    cols = _columns(image_column, text_column, label_column, id_column, split_column, group_column)
    _, overrides = _config(params, manifest, data_root, cols, {} if epochs is None else {"train.max_epochs": epochs},
                           sets=set_)
    cfg = _guard(load_config, params, overrides)
    _guard(check_inputs, cfg, options=RUN_OPTIONS)  # before any server starts
    if heads is not None:
        from crossmodal.training.tuning import check_heads

        names = _guard(check_heads, [h.strip() for h in heads.split(",") if h.strip()])
    else:
        names = None
    term = Terminal(plain=plain, verbose=verbose)
    stamp = f"tune-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    progress_dir = Path(cfg.paths.work).resolve() / PROGRESS_DIR / stamp

    def flow() -> dict:
        with quiet_libraries(term.warn, verbose=verbose):
            from flows.tuning import run_tune

            with TrialLines(progress_dir, term):
                return run_tune(str(params), overrides, str(out.resolve()), trials, timeout, names,
                                str(progress_dir), dask_address)

    try:
        result = _guard(flow)
    finally:
        shutil.rmtree(progress_dir, ignore_errors=True)
    _print_table(*tune_rows(result))
    typer.echo(f"{sum(h['trials'] for h in result['heads'].values())} trials in {result['search_seconds']:.0f} s; "
               f"wrote {out} (crossmodal run --params {out}); MLflow run {result['mlflow']['run_id']} in experiment "
               f"{result['mlflow']['experiment']}")


@app.command()
def demo(params: ParamsOpt = Path("params.yaml"),
         summary: Annotated[Path | None, typer.Option(help="Summary JSON path.")] = None,
         finetune: FinetuneOpt = None, force: ForceOpt = False, plain: PlainOpt = False,
         verbose: VerboseOpt = False, set_: SetOpt = None) -> None:
    """Generate the demo dataset (once) and run the whole pipeline on it (unchanged stages are skipped)."""
    demo_dir = Path("data/demo")
    demo_data(out=demo_dir, params=params, force=False, set_=set_)  # validates params.yaml; reuses existing data
    sets, _ = _overrides(sets=set_)
    _run_flow({"data.manifest": str(demo_dir / "manifest.csv"), **_finetune_override(finetune), **sets}, params,
              summary, force, plain, verbose, options={})  # demo has no input options: errors name the params keys


@app.command()
def predict(manifest: Annotated[Path, typer.Option(help="Manifest of the rows to predict (.csv, .jsonl or .parquet); "
                                                        "a label column is optional.")],
            out: Annotated[Path, typer.Option(help="Predictions (parquet: id, label, prob_<class>).")] = Path(
                "predictions.parquet"),
            summary: Annotated[Path | None, typer.Option(help="Summary JSON (default predict_summary.json next to "
                                                              "--out; refused rows go to refused.csv next to "
                                                              "--out).")] = None,
            model_name: Annotated[str | None, typer.Option(help="Registered model name (default "
                                                                "mlflow.model_name).")] = None,
            version: Annotated[int | None, typer.Option(help="Model version (default: the champion).")] = None,
            attribution: Annotated[bool, typer.Option("--attribution", help="Add attr_image, attr_text (and gates) "
                                                                            "per row.")] = False,
            data_root: DataRootOpt = None, image_column: ColOpt = None, text_column: ColOpt = None,
            id_column: ColOpt = None, label_column: ColOpt = None, split_column: ColOpt = None,
            group_column: ColOpt = None, allow_missing: AllowMissingOpt = None, params: ParamsOpt = Path("params.yaml"),
            chunk_rows: Annotated[int, typer.Option(min=1, help="Rows read, embedded and written at a time.")] = 256,
            plain: PlainOpt = False, verbose: VerboseOpt = False, set_: SetOpt = None,
            ) -> None:
    """Predict a manifest with the champion (or --version), refuse bad rows with a reason, check for drift.

    Takes the column options of `run` (split and group columns are carried into the refused file, not used)."""
    from contextlib import nullcontext

    from crossmodal.console.chatter import quiet_libraries
    from crossmodal.console.preflight import RUN_OPTIONS, check_inputs
    from crossmodal.console.report import show_prediction
    from crossmodal.console.terminal import Terminal

    cols = _columns(image_column, text_column, label_column, id_column, split_column, group_column)
    cfg, _ = _config(params, manifest, data_root, cols, _missing_overrides(allow_missing), sets=set_)
    # Before MLflow loads: the manifest and its image and text columns (a label column is optional here).
    _guard(check_inputs, cfg, manifest, RUN_OPTIONS, ("image", "text"))
    term = Terminal(plain=plain, verbose=verbose)

    def score() -> str:
        with quiet_libraries(term.warn, ("mlflow",), verbose=verbose):
            from crossmodal.pipeline.predict import predict_manifest, render

            with term.console.status(f"predicting {manifest} ...") if term.live else nullcontext():
                return render(predict_manifest(cfg, manifest, out, summary_path=summary, model_name=model_name,
                                               version=version, attribution=attribution, chunk_rows=chunk_rows,
                                               progress=verbose))

    show_prediction(term, _guard(score))


@app.command()
def promote(version: Annotated[int, typer.Option(help="Model version to make champion.")],
            params: ParamsOpt = Path("params.yaml"),
            model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
            reason: Annotated[str, typer.Option(help="Why, for the champion's history.")] = "by hand",
            set_: SetOpt = None) -> None:
    """Move the `champion` alias to a version by hand; the move and its reason go to the history."""
    from crossmodal.registry import promotion, tracking

    cfg, _ = _config(params, sets=set_)
    uri = tracking.configure(cfg.mlflow)
    name = model_name or cfg.mlflow.model_name
    _guard(promotion.promote, name, version, reason, uri, cfg.promotion.lock_timeout_s)
    typer.echo(f"{name}: champion is now version {version} ({reason})")


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml"),
             model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
             reason: Annotated[str, typer.Option(help="Why, for the champion's history.")] = "rolled back by hand",
             set_: SetOpt = None) -> None:
    """Move the `champion` alias back to the champion before the current one (twice: two moves back)."""
    from crossmodal.registry import promotion, tracking

    cfg, _ = _config(params, sets=set_)
    uri = tracking.configure(cfg.mlflow)
    name = model_name or cfg.mlflow.model_name
    version = _guard(promotion.rollback, name, reason, uri, cfg.promotion.lock_timeout_s)
    typer.echo(f"{name}: champion rolled back to version {version}")


@app.command()
def history(params: ParamsOpt = Path("params.yaml"),
            model_name: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of the entries.")] = False,
            set_: SetOpt = None) -> None:
    """Print every move of the `champion` alias: version, previous, action, reason, when and by whom."""
    from crossmodal.registry import tracking
    from crossmodal.registry.history import format_history, read_history

    cfg, _ = _config(params, sets=set_)
    tracking.configure(cfg.mlflow)
    name = model_name or cfg.mlflow.model_name
    entries = _guard(read_history, name)
    if as_json:
        typer.echo(json.dumps(entries, indent=2, ensure_ascii=False))
    elif entries:
        typer.echo(format_history(entries))
    else:
        typer.echo(f"{name}: champion has never moved")


@app.command()
def schedule(cron: Annotated[str, typer.Option(help='Cron expression, e.g. "0 3 * * *".')],
             timezone: Annotated[str, typer.Option(help="IANA timezone of the cron expression.")] = "UTC",
             params: ParamsOpt = Path("params.yaml"),
             name: Annotated[str, typer.Option(help="Deployment name.")] = "crossmodal-retrain",
             set_: SetOpt = None) -> None:
    """Serve the training flow on a cron schedule (needs a Prefect server and PREFECT_API_URL); --set values are
    applied to every scheduled run."""
    from flows.schedule import build_deployment, serve

    _, overrides = _config(params, sets=set_)
    overrides = overrides or None
    _guard(build_deployment, cron, timezone, str(params), overrides, name)  # validate before talking to the server
    typer.echo(f"serving crossmodal-training/{name} on '{cron}' ({timezone}); Ctrl-C to stop")
    _guard(serve, cron, timezone, str(params), overrides, name)


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
       params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Open the MLflow UI on the project's store (http://127.0.0.1:PORT)."""
    from crossmodal.registry import tracking

    cfg, _ = _config(params, sets=set_)
    uri = tracking.resolve_tracking_uri(cfg.mlflow)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    typer.echo(" ".join(cmd))
    os.execv(sys.executable, cmd)


def _report_dirs(summary: dict[str, Any], where: Path) -> tuple[Path, Path, Path]:
    """The validated, models and reports folders of the run a summary describes (a flow run's and the DVC
    stages' alike: models/ sits next to validated/)."""
    from crossmodal.errors import ReportError

    if summary.get("work_dir"):
        run_dir = Path(summary["work_dir"])
        return run_dir / "validated", run_dir / "models", run_dir / "reports"
    validated_file = (summary.get("rows") or {}).get("validated_file")
    if not validated_file:
        raise ReportError(f"{where} does not say where the run's files are (no rows.validated_file); run the "
                          "pipeline again (`crossmodal run`) to write a current summary")
    validated = Path(validated_file).parent
    reports = Path(summary["report"]).parent if summary.get("report") else validated.parent / "reports"
    return validated, validated.parent / "models", reports


def _rebuild_report(dirs: tuple, out: Path, summary: dict[str, Any] | None) -> Path:
    from crossmodal.errors import ReportError
    from crossmodal.evaluation.report import build_report

    gone = [str(d) for d in dirs if not Path(d).is_dir()]
    if gone:
        raise ReportError(f"the run's folder(s) {', '.join(gone)} are gone, so its report cannot be rebuilt; run "
                          "the pipeline again (`crossmodal run`)")
    return build_report(*dirs, out, summary)


def _fetch_report(cfg, run_id: str) -> Path:
    """The run's report.html artifact, downloaded to <paths.reports>/report-<id>.html; rebuilt from the run's
    folders (recorded in a tag at publish time) when the artifact is missing and the folders are still there."""
    import shutil
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from crossmodal.artifacts import REPORT_FILE
    from crossmodal.errors import ReportError
    from crossmodal.registry import tracking
    from crossmodal.registry.publish import REPORT_INPUTS_TAG

    uri = tracking.configure(cfg.mlflow)
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ReportError(f"no MLflow run {run_id!r} in {tracking.redact_uri(uri)}; check the run id (the MLflow "
                          "UI: `crossmodal ui`)") from None
    out = Path(cfg.paths.reports) / f"report-{run_id}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(a.path == REPORT_FILE for a in client.list_artifacts(run_id)):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(client.download_artifacts(run_id, REPORT_FILE, tmp), out)
        return out
    inputs = run.data.tags.get(REPORT_INPUTS_TAG)
    if not inputs:
        raise ReportError(f"run {run_id} has no {REPORT_FILE} artifact and does not record where its files were "
                          "(it predates reports, or was not a pipeline run); run the pipeline again to get one")
    dirs = json.loads(inputs)
    latest = Path(cfg.paths.summary)
    summary = json.loads(latest.read_text()) if latest.is_file() else None
    if (summary or {}).get("mlflow", {}).get("run_id") != run_id:
        summary = None  # the summary on disk is another run's: its gate decision is not this run's
    return _rebuild_report((dirs["validated"], dirs["models"], dirs["reports"]), out, summary)


@app.command()
def report(run_id: Annotated[str | None, typer.Option("--run-id", help="MLflow run whose report.html to fetch (to "
                                                      "<paths.reports>/report-<id>.html; rebuilt when the artifact is "
                                                      "missing and the run's folders remain). Default: rebuild the "
                                                      "latest run's report from paths.summary.")] = None,
           open_report: Annotated[bool, typer.Option("--open", help="Open the report in the web browser.")] = False,
           params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Rebuild the latest run's report.html (or fetch a run's from MLflow) and print its path."""
    from crossmodal.artifacts import REPORT_FILE

    cfg, _ = _config(params, sets=set_)
    if run_id:
        path = _guard(_fetch_report, cfg, run_id)
    else:
        summary_path = Path(cfg.paths.summary)
        if not summary_path.is_file():
            _fail(f"{summary_path} not found: no run to report on; run the pipeline (`crossmodal run`) or pass "
                  "--run-id")
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as err:
            _fail(f"{summary_path} is not valid JSON ({err}); run the pipeline again (`crossmodal run`)")
        dirs = _guard(_report_dirs, summary, summary_path)
        path = _guard(_rebuild_report, dirs, dirs[2] / REPORT_FILE, summary)
    path = Path(path).resolve()
    typer.echo(str(path))
    if open_report:
        import webbrowser

        webbrowser.open(path.as_uri())


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """A table: Rich's on a terminal; plain aligned text, never wrapped, when the output goes to a file or pipe."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    tty = console.is_terminal
    if not tty:  # a pipe gets 80 columns from Rich: a wide table would wrap mid-cell
        console = Console(width=100_000, no_color=True, highlight=False, emoji=False, markup=False)
    table = Table(box=box.SIMPLE_HEAD if tty else None, show_edge=False, pad_edge=False,
                  header_style="bold" if tty else "")
    for name in header:
        table.add_column(name, no_wrap=not tty, overflow="fold")
    for row in rows:
        table.add_row(*row)
    if tty:
        console.print(table)
    else:
        with console.capture() as captured:
            console.print(table)
        typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _runs_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells of :func:`crossmodal.registry.runs.recent_runs`' records; ``data`` falls back to the manifest's
    folder, the name a logged dataset gets (a run whose model was unchanged logs none)."""
    rows = []
    for r in records:
        version = r["version"] or "-"
        if r["version"] and r["unchanged"]:
            version += " (unchanged)"
        status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
        rows.append([(r["started"] or "-").replace("T", " ").replace("+00:00", "Z"), r["run_id"],
                     r["dataset"] or (Path(r["manifest"]).parent.name if r["manifest"] else "-"), r["best_head"] or "-",
                     "-" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}", version,
                     "yes" if r["champion"] else "", status])
    return rows


@app.command("runs")
def runs(limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
         as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of the runs.")] = False,
         params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """List the experiment's recent pipeline runs: data, best head, test macro-F1, registered version, champion."""
    from crossmodal.registry.runs import recent_runs

    cfg, _ = _config(params, sets=set_)
    records = _guard(recent_runs, cfg.mlflow, limit)
    if as_json:
        typer.echo(json.dumps(records, indent=2, ensure_ascii=False))
    elif not records:
        typer.echo(f"no pipeline runs in experiment {cfg.mlflow.experiment} yet")
    else:
        _print_table(["started (UTC)", "run", "data", "best head", "macro-F1", "version", "champion", "status"],
                     _runs_rows(records))


config_app = typer.Typer(no_args_is_help=True, help="The effective configuration: every setting and where its value "
                                                    "came from.")
app.add_typer(config_app, name="config")


def _redacted(value: Any) -> Any:
    from crossmodal.registry.tracking import redact_uri

    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_uri(value) if isinstance(value, str) else value


def _config_yaml(values: dict[str, Any], sources: dict[str, str], params: Path) -> str:
    """The configuration as nested YAML (pasteable into params.yaml), each value's source as a comment."""
    from crossmodal.config import format_value, setting_keys

    lines: list[tuple[str, str | None]] = []
    opened: list[str] = []
    for key in setting_keys():
        *parents, leaf = key.split(".")
        depth = 0
        while depth < min(len(opened), len(parents)) and opened[depth] == parents[depth]:
            depth += 1
        for level in range(depth, len(parents)):
            lines.append(("  " * level + parents[level] + ":", None))
        opened = parents
        node: Any = values
        for part in key.split("."):
            node = node[part]
        lines.append((f"{'  ' * len(parents)}{leaf}: {format_value(node)}", sources[key]))
    width = max(len(text) for text, _ in lines if len(text) <= 70)  # a long list should not push every comment out
    body = [text if source is None else f"{text.ljust(width)}  # {source}" for text, source in lines]
    where = params if params.exists() else f"{params}, absent: defaults apply"
    return "\n".join([f"# the effective configuration ({where}); after each value, where it came from", *body])


@config_app.command("show")
def config_show(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print {\"params\", \"config\", \"sources\"} "
                                                                     "as JSON.")] = False) -> None:
    """Print every setting's effective value and where it came from: default, the params file or --set."""
    from crossmodal.config import load_config_with_sources

    overrides, sources = _overrides(sets=set_)
    cfg, origin = _guard(load_config_with_sources, params, overrides, sources)
    values = _redacted(cfg.model_dump(mode="json"))  # credentials in a tracking URI stay off the terminal
    if as_json:
        typer.echo(json.dumps({"params": str(params) if params.exists() else None, "config": values,
                               "sources": origin}, indent=2, ensure_ascii=False))
    else:
        typer.echo(_config_yaml(values, origin, params))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
