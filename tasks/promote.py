"""promote: the exported model joins the MLflow model registry, and becomes its champion only when better.

    python -m tasks promote          # or: dvc repro promote (the pipeline's last step)

The pipeline run's `model` (the `torch.export` program that export checked and logged) becomes a
new version of the registered model `promote.registered_model`, with the alias `challenger`. It
takes the alias `champion` from the current champion only if

- its export check passed (the run's `export.check` tag, set by export after the check),
- it was evaluated on the same test data as the champion (the DVC hashes of the test images and
  labels are the same): test metrics on other data do not compare,
- its checkout was its commit (`git.dirty` false), unless `promote.from_dirty` is true: a
  champion must be reproducible from its commit,
- and its `promote.metric` is better than the champion's by at least `promote.margin` (and
  better at all when the margin is 0).

The first version is champion by default. The decision, the reason and both numbers are printed,
set as tags on the run (`promote.*`) and on the version. So `models:/<name>@champion` always loads
the best model so far, and `models:/<name>@challenger` the latest.

It is the last step, so it also gives the run its DVC lineage: `dvc.lock` as the artifact
`lineage/dvc.lock` (the hash of every stage's dependencies and outputs), and two tags per stage
to compare runs by (`dvc.<stage>.deps`, `dvc.<stage>.outs`: a short hash of each list). Under
`dvc repro` and the Prefect flow, every earlier step is in `dvc.lock` by then.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tasks import BY_HAND, StepContext, inputs, paths, tracking
from tasks.files import file_hashes
from tasks.params import Params

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK = Path("dvc.lock")
DESCRIPTION = (
    "Models the pipeline exported. @champion: the best so far on the test data (promoted by tasks/promote.py); "
    "@challenger: the latest."
)


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    run_id = tracking.current_run_id(paths.BEST)
    with tracking.stage_run(run_id, "promote"):
        lineage, why_not = dvc_lineage()
        if lineage:
            tracking.set_tags(run_id, lineage)
            tracking.log_artifacts(run_id, "lineage", [LOCK])
        else:
            print(f"promote: no DVC hashes on the run: {why_not}")
        return _promote(params, run_id, ctx.params_path)


def dvc_lineage() -> tuple[dict[str, str], str]:
    """The run's DVC tags from dvc.lock, or ({}, why not) when dvc.lock does not describe this checkout's model."""
    from tasks.params import _yaml

    if not LOCK.exists():
        return {}, f"there is no {LOCK} (run the pipeline with `dvc repro` or the flow)"
    try:
        stages = dict((_yaml().load(LOCK.read_text()) or {}).get("stages", {}))
    except Exception as exc:  # not YAML, or not a mapping: the lineage is lost, not the registration
        return {}, f"{LOCK} cannot be read ({type(exc).__name__}); `dvc commit` writes it again"
    stages.pop("promote", None)  # this step's own entry is written after it, so it is the previous run's
    outs = {o["path"]: o.get("md5", "") for stage in stages.values() for o in stage.get("outs", [])}
    for path in (paths.BEST, paths.TORCH_EXPORT):
        if not path.exists() or outs.get(str(path)) != file_hashes(path, "md5")["md5"]:
            return {}, f"{LOCK} does not record this checkout's {path} (a step ran by hand?); `dvc commit` records it"
    tags = {}  # two per stage, to compare runs by; each file's hash is in the artifact lineage/dvc.lock
    for name, stage in stages.items():
        for kind in ("deps", "outs"):
            entries = sorted((e["path"], e.get("md5", "")) for e in stage.get(kind, []))
            tags[f"dvc.{name}.{kind}"] = hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    return tags, ""


def checkout_dirty(params: Params, params_path: Path) -> bool:
    """Whether the checkout differs from its commit now, as train judges it (its tag covers train's time only)."""
    from tasks import naming

    differs = naming.compare_with_head(params, params_path)[2]
    return tracking.git_tags(params_path, differs)["git.dirty"] == "true"


def better_by(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` (negative: worse); lower is better for a loss."""
    return old - new if metric.endswith("loss") else new - old


def _promote(params: Params, run_id: str, params_path: Path) -> dict:
    import mlflow
    from mlflow.exceptions import MlflowException

    cfg = params.promote
    name, metric = cfg.registered_model, cfg.metric
    mlflow.set_tracking_uri(tracking.tracking_uri())  # the registry resolves models:/<id> through it
    c = tracking.client()
    with tracking.store():
        run = c.get_run(run_id)
    tags = dict(run.data.tags)
    if checkout_dirty(params, params_path):  # a step after train (evaluate, export, this one) changed since the commit
        tags["git.dirty"] = "true"
    if metric not in run.data.metrics:
        return _refuse(run_id, None, f"the run has no {metric}: evaluate did not log it")
    value = run.data.metrics[metric]
    test = inputs.split_record("test")
    files = list(test["files"].values())
    model_id = _exported_model(c, run)
    if model_id is None:
        return _refuse(run_id, None, "the run has no exported model `model`: export did not finish")

    with tracking.store():
        try:
            c.create_registered_model(name, description=DESCRIPTION)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        versions = c.search_model_versions(f"name = '{name}'")
        same = [v for v in versions if v.source == f"models:/{model_id}"]  # (a search leaves model_id unset)
        if same:  # this very model is registered already (promote ran again, or the weights were carried over)
            version = same[0]
        else:
            version = c.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=run_id,
                model_id=model_id,
                # Few, for the versions list: the run (linked) holds the rest. The metric outlives a deleted run.
                tags={"data.test_md5": " ".join(files), metric: repr(value)},  # the test images' and labels' md5
                description=f"{tags.get('mlflow.runName', run_id)}: {metric} {value:.4f}",
            )
        c.set_registered_model_alias(name, CHALLENGER, version.version)
        aliases = c.get_registered_model(name).aliases
    champion_version = aliases.get(CHAMPION)

    champion, champion_value = None, None
    if champion_version is not None and str(champion_version) != str(version.version):
        with tracking.store():
            champion = c.get_model_version(name, str(champion_version))
            champion_run = _run_or_none(c, champion.run_id)
        # The value registered with the version, measured on the test data of its data.test_md5 tag
        if metric in champion.tags:
            champion_value = float(champion.tags[metric])
        elif champion_run is not None:
            champion_value = champion_run.data.metrics.get(metric)
    decision = {
        "registered_model": name,
        "version": str(version.version),
        "metric": metric,
        "challenger_value": value,
        "champion_version": str(champion_version) if champion_version is not None else None,
        "champion_value": champion_value if champion is not None else None,
    }
    outcome, message = _judge(cfg, tags, f"{name} version {version.version}", decision, files, champion)
    return _decide(run_id, version, decision, outcome, message)


def _judge(cfg: Any, tags: dict, me: str, decision: dict, files: list[str], champion: Any) -> tuple[str, str]:
    """(promoted | kept | refused | champion, the sentence that says why)."""
    metric, value = cfg.metric, decision["challenger_value"]
    if decision["champion_version"] == decision["version"]:
        return "champion", f"{me} is the champion already ({metric} {value:.4f})"
    if not tags.get("export.check", "").startswith("passed"):
        return "refused", f"{me} stays challenger: its export check did not pass"
    dirty = tags.get("git.dirty", "unknown")
    if dirty != "false" and not cfg.from_dirty:
        what = "differs from its commit" if dirty == "true" else "is not in git"
        return "refused", (
            f"{me} stays challenger: its checkout {what} (git.dirty {dirty}), so a champion could not be rebuilt "
            "from its commit; commit the change and run again, or set promote.from_dirty: true"
        )
    if champion is None:
        return "promoted", f"{me} is the champion: the first ({metric} {value:.4f})"
    old = decision["champion_version"]
    theirs = champion.tags.get("data.test_md5", "")
    if theirs != " ".join(files):
        return "refused", (
            f"{me} stays challenger: its test data (md5 {files[0][:12]}) is not champion version {old}'s "
            f"({theirs[:12] or 'unknown'}), so their {metric} do not compare; to start again on new test data, set "
            "promote.registered_model to a new name"
        )
    if decision["champion_value"] is None:
        return "promoted", f"{me} is the champion: version {old} has no {metric}"
    gain = better_by(metric, value, decision["champion_value"])
    versus = f"{metric} {value:.4f} against {decision['champion_value']:.4f} of version {old}"
    if gain > 0 and gain >= cfg.margin - 1e-12:  # 0.96 - 0.95 is 0.0099999... in floats
        return "promoted", f"{me} is the champion now: {versus}"
    if gain > 0:
        return "kept", f"{me} stays challenger: {versus}, not better by at least promote.margin ({cfg.margin:g})"
    return "kept", f"{me} stays challenger: {versus}, not better"


def _exported_model(c: Any, run: Any) -> str | None:
    """The id of the run's READY logged model named `model` (its own, or one carried over with the same weights)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    with tracking.store():
        models = [c.get_logged_model(output.model_id) for output in outputs]
    ready = [m for m in models if m.name == "model" and str(m.status) == "READY"]
    # The latest: an export that ran again in the same run (its params changed) logged another
    return max(ready, key=lambda m: m.creation_timestamp).model_id if ready else None


def _run_or_none(c: Any, run_id: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return c.get_run(run_id)
    except MlflowException:  # deleted: the version's tags still hold its metric
        return None


def _refuse(run_id: str, version: Any, reason: str) -> dict:
    return _decide(run_id, version, {}, "refused", f"not registered: {reason}")


def _decide(run_id: str, version: Any, decision: dict, outcome: str, message: str) -> dict:
    """Move the alias when promoted; record the decision on the run and the version; print it."""
    c = tracking.client()
    decision = {**decision, "decision": outcome, "reason": message}
    with tracking.store():
        if outcome == "promoted":
            c.set_registered_model_alias(version.name, CHAMPION, version.version)
        if version is not None:
            c.set_model_version_tag(version.name, version.version, "promote.decision", f"{outcome}: {message}")
    keys = ("registered_model", "version", "challenger_value", "champion_version", "champion_value")
    tracking.set_tags(
        run_id,
        {f"promote.{k}": "" if decision.get(k) is None else str(decision[k]) for k in (*keys, "decision", "reason")},
    )
    print(f"promote: {message}")
    if outcome == "promoted":
        print(f"promote: models:/{version.name}@{CHAMPION} loads it (mlflow.pytorch.load_model)")
    return decision
