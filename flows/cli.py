"""The ``mmp`` command line (contract in DESIGN.md / docs/cli.md).

Exit code 0 on success; bad input gets one line naming the file or key and the reason, exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

# -h as well as --help; help text printed as written (rich markup would eat "[dark,blurry]").
_CTX = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmplatform: image-text data → model",
                  context_settings=_CTX, rich_markup_mode=None)
data_app = typer.Typer(no_args_is_help=True, help="dataset commands", context_settings=_CTX, rich_markup_mode=None)
app.add_typer(data_app, name="data")
annotate_app = typer.Typer(no_args_is_help=True, help="annotation round trip with Label Studio", context_settings=_CTX,
                           rich_markup_mode=None)
app.add_typer(annotate_app, name="annotate")
study_app = typer.Typer(no_args_is_help=True, help="studies over trained models", context_settings=_CTX,
                        rich_markup_mode=None)
app.add_typer(study_app, name="study")
FORMATS = "coco | jsonl | csv | webdataset | imagefolder | labelstudio | synthetic"

SetOpt = Annotated[list[str] | None, typer.Option("-S", "--set", help="section.key=value, for this run")]
WaitOpt = Annotated[bool, typer.Option(help="when another run holds this workspace, wait for it instead of exiting")]
ForceOpt = Annotated[bool, typer.Option(help="replace OUT even when it is not a dataset mmp wrote (its files are "
                                             "deleted)")]


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _prefect_env(workdir: Path) -> None:
    # Prefect reads its settings at import: keep its local API database inside the workspace.
    os.environ.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # The temporary local API migrates its SQLite database on first start; on a fresh 2-core machine (cold
    # imports, no bytecode yet) that took longer than Prefect's 20 s default and the run failed before any stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _run_flow(which: str, workdir: Path, overrides: list[str], wait: bool = False) -> None:
    from mmplatform.config import ConfigError, load_params

    params_file = workdir / "params.yaml"
    try:
        load_params(params_file, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if not (workdir / "dvc.yaml").is_file():
        _fail(f"{workdir}: no dvc.yaml here; run mmp from the project root or pass --workdir")
    _prefect_env(workdir)
    from prefect.exceptions import ExternalSignal

    from flows.retrain import StageFailed, WorkspaceBusy, data_flow, retrain, run_overrides, train_flow, workspace_lock

    signal.signal(signal.SIGTERM, _terminated)  # outside Prefect's engine too, SIGTERM ends the run as Ctrl-C does
    try:
        with workspace_lock(workdir, wait=wait):
            if which == "retrain":
                _report(retrain(str(workdir), overrides))
            else:
                with run_overrides(workdir, overrides):
                    (data_flow if which == "data" else train_flow)(str(workdir))
    except (StageFailed, WorkspaceBusy) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        if "ephemeral Prefect API" not in str(exc):
            raise
        waited = os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]
        _fail(f"Prefect's local API did not start within {waited} s (a busy machine?): run again, raise "
              "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start a "
              "server (`prefect server start`) and set PREFECT_API_URL")
    except (KeyboardInterrupt, ExternalSignal):
        typer.echo("error: stopped by a signal: the running stage was stopped with its processes; the next mmp run "
                   "runs it and the stages after it again", err=True)
        raise typer.Exit(130) from None


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _report(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    t = Table(title="retrain")
    t.add_column("stage")
    t.add_column("status")
    for r in summary.get("stages", []):
        t.add_row(r["stage"], "ran" if r["ran"] else "skipped (unchanged)")
    console.print(t)
    m = summary.get("metrics") or {}
    keys = ["t2i_recall@1", "t2i_recall@5", "i2t_recall@5", "cider_d_xe", "cider_d_rl", "bleu4_xe", "bleu4_rl"]
    console.print("metrics: " + ", ".join(f"{k}={m[k]:.4f}" for k in keys if k in m))
    reg = summary.get("registry") or {}
    if reg:
        console.print(f"registry: {reg.get('model_name')} v{reg.get('version')}: {reg.get('reason')}")
    wd = os.environ.get("MMP_WORKSPACE", ".")
    where = "make ui" if Path(wd).resolve() == Path.cwd() else f"mmp ui --workdir {wd}"
    console.print(f"MLflow parent run: {summary.get('mlflow_parent_run_id')} (open it with `{where}`, experiment "
                  "mmplatform)")


@app.command()
def run(set_: SetOpt = None, workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path("."),
        wait: WaitOpt = False) -> None:
    """Run the whole retraining flow (data → train → RL → evaluate → register) on embedded defaults."""
    _run_flow("retrain", workdir.resolve(), set_ or [], wait)


@app.command("flow")
def flow_cmd(name: Annotated[str, typer.Argument(help="data | train | retrain")], set_: SetOpt = None,
             workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path("."), wait: WaitOpt = False) -> None:
    """Run one flow."""
    if name not in ("data", "train", "retrain"):
        _fail(f"flow {name!r}: expected data, train or retrain")
    _run_flow(name, workdir.resolve(), set_ or [], wait)


@app.command("tune")
def tune_cmd(set_: SetOpt = None, workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path("."),
             wait: WaitOpt = False) -> None:
    """Ray Tune sweep (`dvc repro tune`): params.yaml's tune section over its train section; the best config
    goes to params/tuned_train.yaml, each trial to an MLflow child run. -S applies to this run only."""
    from mmplatform.config import ConfigError, load_params

    wd = workdir.resolve()
    try:
        load_params(wd / "params.yaml", set_ or [])
    except ConfigError as exc:
        _fail(str(exc))
    if not (wd / "dvc.yaml").is_file():
        _fail(f"{wd}: no dvc.yaml here; run mmp from the project root or pass --workdir")
    _prefect_env(wd)
    from flows.retrain import WorkspaceBusy, run_overrides, stage_env, workspace_lock

    try:
        with workspace_lock(wd, wait=wait), run_overrides(wd, set_ or []):
            rc = subprocess.call([sys.executable, "-m", "dvc", "repro", "tune"], cwd=wd, env=stage_env(wd, None))
    except WorkspaceBusy as exc:
        _fail(str(exc))
    if rc != 0:
        _fail("stage tune failed (its log is above)")
    best = wd / "reports/tune/best.json"
    if best.is_file():
        typer.echo(best.read_text().strip())


@app.command()
def serve(cron: Annotated[str, typer.Option(help="cron schedule")] = "0 3 * * 0",
          workdir: Annotated[Path, typer.Option(help="DVC workspace")] = Path(".")) -> None:
    """Serve the retrain flow as a Prefect deployment on a cron schedule (needs a Prefect API)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)  # Prefect's own check, before anything is registered
    except ValidationError as exc:
        _fail(f"--cron {cron!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')} (five fields: minute "
              "hour day-of-month month day-of-week)")
    wd = workdir.resolve()
    _prefect_env(wd)
    from flows.retrain import retrain

    retrain.serve(name="scheduled-retrain", cron=cron, parameters={"workdir": str(wd)})


@data_app.command("ingest")
def data_ingest(fmt: Annotated[str, typer.Option("--format", help=FORMATS)],
                out: Annotated[Path, typer.Option(help="output dataset directory")],
                path: Annotated[Path | None, typer.Option(
                    help="COCO JSON, JSONL/CSV manifest, .tar shard / folder / {000..009} pattern, imagefolder"
                         " folder, or Label Studio export")] = None,
                images: Annotated[Path | None, typer.Option(help="image root")] = None,
                force: ForceOpt = False) -> None:
    """Ingest a source into a canonical dataset; bad records go to OUT/quarantine with a reason."""
    from pydantic import ValidationError

    from mmplatform.config import ConfigError, IngestParams, one_line
    from mmplatform.data import stages

    _logging()
    try:
        src = {"format": fmt, "path": str(path) if path else None, "images": str(images) if images else None}
        p = IngestParams.model_validate({"sources": [src]})
    except ValidationError as exc:
        _fail(f"--format {fmt}: {one_line(exc, 'source').split(': ', 2)[-1]}")
    if fmt != "synthetic" and path is None:
        _fail(f"--format {fmt}: needs --path")
    if path is not None and "{" not in str(path) and not path.exists():
        _fail(f"{path}: not found")
    try:
        stats = stages.ingest(p, out, force=force)
    except (ConfigError, ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats))


@data_app.command("clean")
def data_clean(inp: Annotated[Path, typer.Argument(help="input dataset")],
               out: Annotated[Path, typer.Argument(help="output dataset")],
               set_: Annotated[list[str] | None, typer.Option(
                   "-S", "--set", help="clean param, e.g. -S drop_issues=[dark,blurry] -S engine=local")] = None,
               params: Annotated[Path | None, typer.Option(help="take the clean section of this params.yaml")] = None,
               report: Annotated[bool, typer.Option(help="write OUT/report.html")] = True,
               align_with: Annotated[str | None, typer.Option(
                   help="models:/NAME@ALIAS: score captions against their images with this model and drop the "
                        "worst (clean.alignment); off unless given, since a model that never saw this data "
                        "cannot judge it")] = None,
               force: ForceOpt = False) -> None:
    """Clean a dataset: kept → OUT, dropped → OUT/quarantine (with reason); OUT/report.html."""
    from mmplatform.config import ConfigError, load_params, validate
    from mmplatform.data import stages

    _logging()
    overrides = [f"clean.{kv}" for kv in (set_ or [])] + [f"clean.report={str(report).lower()}"]
    try:
        p = load_params(params, overrides).clean if params else validate(
            _overrides_only(overrides), "-S").clean
    except ConfigError as exc:
        _fail(str(exc))
    if not (inp / "manifest.json").is_file():
        _fail(f"{inp}: not a dataset (no manifest.json)")
    if align_with is not None:
        name, _, alias = align_with.removeprefix("models:/").partition("@")
        if not align_with.startswith("models:/") or not name or not alias:
            _fail(f"--align-with {align_with!r}: expected models:/NAME@ALIAS")
        p = p.model_copy(update={"alignment": p.alignment.model_copy(update={"model_name": name, "alias": alias})})
    else:
        logging.getLogger("mmp").info("clean: alignment filter off (give --align-with models:/NAME@ALIAS to use one)")
        p = p.model_copy(update={"alignment": p.alignment.model_copy(update={"mode": "off"})})
    try:
        stats = stages.clean(inp, out, p, same_domain_only=False, force=force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats, default=str))


def _overrides_only(overrides: list[str]) -> dict:
    from mmplatform.config import apply_overrides

    return apply_overrides({}, overrides)


@data_app.command("report")
def data_report(path: Annotated[Path, typer.Argument(help="dataset directory")],
                html: Annotated[Path | None, typer.Option(help="write the HTML report here")] = None) -> None:
    """Counts per split, issue type and quarantine reason; caption statistics; optional HTML report."""
    from mmplatform.data.report import build_report, summary_metrics, write_html

    if not (path / "manifest.json").is_file():
        _fail(f"{path}: not a dataset (no manifest.json)")
    try:
        report = build_report(path)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(summary_metrics(report), indent=2))
    if html:
        write_html(report, html)
        typer.echo(f"wrote {html}", err=True)


@annotate_app.command("export-labelstudio")
def annotate_export(dataset: Annotated[Path, typer.Argument(help="dataset directory")],
                    file: Annotated[Path, typer.Argument(help="Label Studio tasks JSON to write")],
                    split: Annotated[str | None, typer.Option(help="only this split")] = None,
                    predictions: Annotated[bool, typer.Option(
                        help="pre-annotate with the champion captioner when there is one")] = True,
                    local_files: Annotated[bool, typer.Option(
                        help="write images to images/ beside FILE and reference them as Label Studio local"
                             " files, instead of inlining them as data URIs")] = False) -> None:
    """Write Label Studio import tasks (images inline, existing captions, champion predictions)."""
    from mmplatform.data import labelstudio
    from mmplatform.data.dataset import read_dataset

    _logging()
    if not (dataset / "manifest.json").is_file():
        _fail(f"{dataset}: not a dataset (no manifest.json)")
    records = read_dataset(dataset, split=split)
    predict, version = None, ""
    if predictions:
        from mmplatform.champion import champion_captioner

        found = champion_captioner()
        if found is None:
            logging.getLogger("mmp").info("no champion model: tasks are written without predictions")
        else:
            predict, version = found
    n = labelstudio.export_tasks(records, file, predict_captions=predict, model_version=version,
                                 image_mode="local-files" if local_files else "data-uri")
    typer.echo(json.dumps({"tasks": n, "file": str(file), "predictions": bool(predict), "model_version": version}))


@annotate_app.command("import-labelstudio")
def annotate_import(file: Annotated[Path, typer.Argument(help="Label Studio JSON export")],
                    dataset: Annotated[Path, typer.Argument(help="dataset to merge the annotations into")],
                    out: Annotated[Path | None, typer.Option(help="write the merged dataset here (default: DATASET)")]
                    = None, force: ForceOpt = False) -> None:
    """Merge a Label Studio export into a dataset: captions of every annotator, consensus VQA answers,
    agreement; disagreements go to OUT/review.jsonl."""
    from mmplatform.data import labelstudio
    from mmplatform.data.dataset import read_dataset, read_manifest, read_quarantine, write_dataset

    _logging()
    if not file.is_file():
        _fail(f"{file}: not found")
    if not (dataset / "manifest.json").is_file():
        _fail(f"{dataset}: not a dataset (no manifest.json)")
    records = read_dataset(dataset)
    quarantine = read_quarantine(dataset)
    try:
        merged, stats, review = labelstudio.merge_annotations(records, [file])
    except ValueError as exc:
        _fail(str(exc))
    try:
        write_dataset(out or dataset, merged, stage=read_manifest(dataset).get("stage", "annotate"),
                      params={"labelstudio_import": str(file)}, quarantine=quarantine,
                      extra={"annotation_stats": stats}, files={"review.jsonl": labelstudio.review_jsonl(review)},
                      force=force)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(json.dumps(stats, default=str))


@app.command()
def demo(workdir: Annotated[Path, typer.Option(help="the demo's own workspace (created if missing)")] = Path("demo"),
         wait: WaitOpt = False) -> None:
    """The whole retraining flow on the demo profile (params/demo.yaml: small data, small model, a few minutes)
    in a workspace of its own: your params, data and registry are not touched."""
    from flows.workspace import demo_profile, make_workspace

    wd = workdir.resolve()
    try:
        make_workspace(wd, demo_profile())
    except ValueError as exc:
        _fail(str(exc))
    _run_flow("retrain", wd, [], wait)


@app.command()
def ui(port: int = 5000, workdir: Annotated[Path, typer.Option(help="workspace whose store to show")] = Path(".")
       ) -> None:
    """Open the MLflow UI on the embedded store (sqlite:///mlflow.db, artifacts in mlartifacts/)."""
    from mmplatform import tracking

    os.environ.setdefault("MMP_WORKSPACE", str(workdir.resolve()))

    uri = tracking.tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


@study_app.command("stability")
def study_stability(
        algorithms: Annotated[str, typer.Option(help="comma-separated: scst,ppo,grpo")] = "scst,ppo,grpo",
        seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
        set_: SetOpt = None,
        workdir: Annotated[Path, typer.Option(help="DVC workspace with models/base")] = Path("."),
        out: Annotated[Path, typer.Option(help="where stability.json / .md go")] = Path("reports/rl_study")) -> None:
    """RL stability study: each algorithm x seed from models/base, params.yaml's rl_finetune section for each
    algorithm (-S rl_finetune.steps=80 applies to all); one MLflow parent run, a child run per (algorithm, seed)."""
    from mmplatform.config import ConfigError, apply_overrides, read_raw, validate
    from mmplatform.rl import runner
    from mmplatform.rl.study import stability_study

    wd = workdir.resolve()
    try:
        algos = [a.strip() for a in algorithms.split(",") if a.strip()]
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers")
    configs = {}
    try:
        for algo in algos:
            raw = apply_overrides(read_raw(wd / "params.yaml"), [*(set_ or []), f"rl_finetune.algorithm={algo}"])
            configs[algo] = validate(raw, str(wd / "params.yaml")).rl_finetune
    except ConfigError as exc:
        _fail(str(exc))
    if not (wd / "models/base/model_config.json").is_file():
        _fail(f"{wd / 'models/base'}: no trained model here; run `mmp run` first")
    _logging()
    os.environ["MMP_WORKSPACE"] = str(wd)
    result = stability_study(configs, seed_list, base_dir=wd / "models/base", data_dir=wd / "data/processed/clean",
                             out_dir=wd / out if not out.is_absolute() else out, cache_dir=wd / ".cache/mmp",
                             runner_for=runner)
    typer.echo(json.dumps(result["summary"], indent=2))


@study_app.command("fusion")
def study_fusion(
        fusions: Annotated[str, typer.Option(help="comma-separated fusion strategies")] =
        "concat,gated,cross_attention,multimodal_transformer",
        seeds: Annotated[str, typer.Option(help="comma-separated RL seeds per fusion")] = "0,1",
        algorithm: Annotated[str, typer.Option(help="scst, ppo or grpo")] = "grpo",
        train_epochs: Annotated[int, typer.Option(help="epochs of each base model")] = 3,
        train_images: Annotated[int, typer.Option(help="training images of each base model (0: all)")] = 2000,
        rl_steps: Annotated[int, typer.Option(help="RL steps per run")] = 60,
        set_: SetOpt = None,
        workdir: Annotated[Path, typer.Option(help="DVC workspace with data/processed")] = Path("."),
        out: Annotated[Path, typer.Option(help="where fusion.json / .md / .png go")] = Path("reports/rl_study")
) -> None:
    """Fusion-strategy study: a base model per fusion (params.yaml's train section, -S applies), then RL of its
    answer decoder on generative VQA (exact-match reward) per seed; reward, episode length, stability and
    compute per fusion, in one MLflow parent run."""
    from mmplatform.config import ConfigError, apply_overrides, read_raw, validate
    from mmplatform.models.fusion import FUSION_KINDS
    from mmplatform.rl import runner
    from mmplatform.rl.fusion_study import fusion_study

    wd = workdir.resolve()
    kinds = [f.strip() for f in fusions.split(",") if f.strip()]
    unknown = [f for f in kinds if f not in FUSION_KINDS]
    if unknown or not kinds:
        _fail(f"--fusions {fusions!r}: expected some of {', '.join(FUSION_KINDS)}")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds {seeds!r}: expected comma-separated integers")
    # The study's own settings first, so that -S can still change any of them.
    study = [f"rl_finetune.algorithm={algorithm}", "rl_finetune.task=vqa", "rl_finetune.max_length=4",
             "rl_finetune.reward={vqa_exact_match: 1.0}", f"rl_finetune.steps={rl_steps}",
             f"train.epochs={train_epochs}"]
    try:
        raw = read_raw(wd / "params.yaml")
        if not (raw.get("train", {}).get("loss_weights", {}).get("vqa_generative") or 0) > 0:
            study.append("train.loss_weights.vqa_generative=0.5")  # trains the answer decoder the study tunes
        params = validate(apply_overrides(raw, [*study, *(set_ or [])]), str(wd / "params.yaml"))
    except ConfigError as exc:
        _fail(str(exc))
    train_dir, val_dir = wd / "data/processed/augmented", wd / "data/processed/clean"
    for d in (train_dir, val_dir):
        if not (d / "manifest.json").is_file():
            _fail(f"{d}: no dataset here; run `mmp run` (or `dvc repro augment`) first")
    _logging()
    os.environ["MMP_WORKSPACE"] = str(wd)
    result = fusion_study(params.train, params.rl_finetune, kinds, seed_list, train_dir=train_dir, val_dir=val_dir,
                          data_dir=val_dir, out_dir=wd / out if not out.is_absolute() else out,
                          cache_dir=wd / ".cache/mmp", runner=runner(params.rl_finetune.algorithm),
                          train_images=train_images or None)
    typer.echo(json.dumps(result["summary"], indent=2))


@study_app.command("ceiling")
def study_ceiling(
        split: Annotated[str, typer.Option(help="split of data/processed/clean to score")] = "test",
        images: Annotated[int, typer.Option(help="its first N images (0: all)")] = 0,
        df: Annotated[str, typer.Option(help="document frequencies: 'split' (the evaluate stage's) or 'train' "
                                             "(the RL reward's)")] = "split",
        model: Annotated[Path | None, typer.Option(help="model whose greedy captions are the start "
                                                       "(default: models/base when there)")] = None,
        search: Annotated[bool, typer.Option(help="run the per-image local search (slowest part)")] = True,
        workdir: Annotated[Path, typer.Option(help="DVC workspace with data/processed/clean")] = Path("."),
        out: Annotated[Path, typer.Option(help="where ceiling.json / .md go")] = Path("reports/rl_study")) -> None:
    """How far can CIDEr-D go on these references? Upper-bound estimates (best reference, best wording, a
    per-image local search) beside the model's greedy score, and what a +5 % or +9 % RL target needs.
    The RL held-out set: --split val --images 200 --df train."""
    from rich.progress import Progress

    from mmplatform.evaluate.ceiling import ceiling_study

    wd = workdir.resolve()
    data = wd / "data/processed/clean"
    if not (data / "manifest.json").is_file():
        _fail(f"{data}: no dataset here; run `mmp run` (or `dvc repro clean`) first")
    if df not in ("split", "train"):
        _fail(f"--df {df!r}: expected 'split' or 'train'")
    if model is None and (wd / "models/base/model_config.json").is_file():
        model = wd / "models/base"
    if model is not None and not (model / "model_config.json").is_file():
        _fail(f"{model}: no trained model here")
    with Progress(transient=True) as bar:
        task = bar.add_task("local search", total=None)
        try:
            result = ceiling_study(data, wd / out if not out.is_absolute() else out, split=split, images=images,
                                   df=df, model_dir=model, search=search,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
        except ValueError as exc:
            _fail(str(exc))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "template_means"}, indent=2))


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mmp {version('mmplatform')}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """mmplatform: image-text data → model."""


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode click returns the code of typer.Exit instead of raising it.
        rc = app(args=argv, prog_name="mmp", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except typer.Abort:  # Ctrl-C at a prompt
        return 130
    except TyperException as exc:  # typer's own click: usage errors and bad values, one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # `mmp` or `mmp data` alone: the help is the answer
            typer.echo(exc.format_message(), err=True)
            return 2
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None and ctx.command_path != "mmp" else ""
        typer.echo(f"error: {where}{' '.join(exc.format_message().split())}", err=True)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
