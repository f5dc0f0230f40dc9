"""From an MLflow run id to what made it and what it made: `python -m tasks.lineage RUN_ID`.

    python -m tasks.lineage 1f2e3d...                  # print the run's lineage
    python -m tasks.lineage 1f2e3d... --json           # the same as JSON
    python -m tasks.lineage 1f2e3d... --restore DIR    # copy the run's DVC outputs from the cache into DIR

It prints the run's name, commit and whether the checkout was clean, the hash of its effective
params, its data sets (the DVC hash of each split), its DVC outputs with where each is in DVC's
cache and whether the checkout still has it, its MLflow models and their registry versions and
aliases. The DVC outputs are those of the `dvc.lock` the promote step logged to the run
(`lineage/dvc.lock`): the checkpoints, the trained weights, the exported files, the metrics and plots.
`--restore` copies each output that the cache holds into DIR under its own path, so the files of
any earlier run come back without touching the checkout.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path
from typing import Any

from tasks.cli import fail, user_errors
from tasks.errors import InputError


def lineage(run_id: str) -> dict[str, Any]:
    """What the store and DVC's cache know of the run."""
    from tasks import tracking

    run = tracking.get_run(run_id)
    c = tracking.client()
    with tracking.store():
        versions = c.search_model_versions(f"run_id = '{run_id}'")
        aliases = {}
        for name in {v.name for v in versions}:
            for alias, version in c.get_registered_model(name).aliases.items():
                aliases.setdefault((name, str(version)), []).append(alias)
        models = [c.get_logged_model(m.model_id) for m in (run.outputs.model_outputs if run.outputs else [])]
    tags = run.data.tags
    return {
        "run_id": run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "commit": tags.get("mlflow.source.git.commit"),
        "dirty": tags.get("git.dirty"),
        "params_sha256": tags.get("lineage.params_sha256"),
        "software": {k.removeprefix("lineage."): tags[k] for k in ("lineage.torch", "lineage.cuda") if k in tags},
        "device": tags.get("lineage.device"),
        "prefect_flow_run": tags.get("prefect.flow_run_name"),
        "datasets": [
            {
                "name": d.dataset.name,
                "digest": d.dataset.digest,
                "context": {t.key: t.value for t in d.tags}.get("mlflow.data.context"),
            }
            for d in (run.inputs.dataset_inputs if run.inputs else [])
        ],
        "dvc_outputs": [_output(path, md5) for path, md5 in sorted(_locked_outputs(c, run_id).items())],
        "models": [{"name": m.name, "uri": f"models:/{m.model_id}", "status": str(m.status)} for m in models],
        "registered": [
            {"name": v.name, "version": str(v.version), "aliases": sorted(aliases.get((v.name, str(v.version)), []))}
            for v in sorted(versions, key=lambda v: int(v.version))
        ],
        "promotion": tags.get("promote.reason"),
    }


def lock_hashes(text: str) -> dict[str, dict[str, str]]:
    """{stage: {"deps:<path>" or "outs:<path>": md5}} from a dvc.lock's text."""
    from tasks.params import _yaml

    stages = (_yaml().load(text) or {}).get("stages", {})
    return {
        stage: {f"{kind}:{e['path']}": e.get("md5", "") for kind in ("deps", "outs") for e in body.get(kind, [])}
        for stage, body in stages.items()
    }


def _locked_outputs(c: Any, run_id: str) -> dict[str, str]:
    """{path: md5} of every output in the dvc.lock the promote step logged (`lineage/dvc.lock`); {} without one."""
    import tempfile

    from tasks import tracking

    with tracking.store(), tempfile.TemporaryDirectory() as tmp:
        if not any(a.path == "lineage/dvc.lock" for a in c.list_artifacts(run_id, "lineage")):
            return {}
        text = Path(c.download_artifacts(run_id, "lineage/dvc.lock", tmp)).read_text()
    try:
        stages = lock_hashes(text).values()
        return {key[5:]: md5 for stage in stages for key, md5 in stage.items() if key.startswith("outs:")}
    except Exception as exc:  # a changed artifact: say so, in one line
        raise InputError(f"the run's lineage/dvc.lock cannot be read ({type(exc).__name__}: {exc})") from None


def _output(path: str, md5: str) -> dict[str, Any]:
    """One DVC output: its hash, its file in the local cache (a folder's files too), and the checkout's copy."""
    from tasks.files import file_hashes

    cached = _cache_path(md5)
    entry: dict[str, Any] = {"path": path, "md5": md5, "cache": str(cached) if cached else None}
    entry["in_git"] = path in _kept_in_git()
    if md5.endswith(".dir"):
        entry["files"] = (
            [{"relpath": f["relpath"], "md5": f["md5"], "cache": _cached_str(f["md5"])}
             for f in json.loads(cached.read_text())]
            if cached else []
        )  # fmt: skip
        entry["in_checkout"] = None  # a folder: compare its files with `dvc status`
    else:
        here = Path(path)
        entry["in_checkout"] = here.is_file() and file_hashes(here, "md5")["md5"] == md5
    return entry


def _cache_path(md5: str) -> Path | None:
    """Where DVC's local cache keeps the object with this hash, or None when it does not have it."""
    path = Path(_cache().oid_to_path(md5))
    return path if path.is_file() else None


def _cached_str(md5: str) -> str | None:
    path = _cache_path(md5)
    return str(path) if path else None


@functools.cache
def _kept_in_git() -> set[str]:
    """The outputs dvc.yaml marks `cache: false`: git keeps them, at the run's commit when it was clean."""
    from tasks.params import _yaml

    kept = set()
    for stage in (_yaml().load(Path("dvc.yaml").read_text()) or {}).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                if isinstance(out, dict):
                    kept |= {path for path, opts in out.items() if (opts or {}).get("cache") is False}
    return kept


@functools.cache
def _cache() -> Any:
    """This checkout's local DVC cache (`.dvc/config` may move it)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            return repo.cache.local
    except NotDvcRepoError:
        raise InputError(f"{Path.cwd()} is not a DVC checkout: run this from the project's root") from None


def restore(info: dict[str, Any], dest: Path) -> list[Path]:
    """Copy every output the cache holds into `dest`/<its path>; return the files written."""
    written = []
    for out in info["dvc_outputs"]:
        if out["cache"] is None:
            continue
        pieces = [(f["relpath"], f["cache"]) for f in out["files"]] if "files" in out else [("", out["cache"])]
        for relpath, cached in pieces:
            if cached is None:  # a folder's file the cache lacks: reported as missing
                continue
            target = dest / out["path"] / relpath if relpath else dest / out["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, target)
            written.append(target)
    return written


def show(info: dict[str, Any]) -> str:
    clean = {"false": "clean", "true": "differs from the commit"}.get(str(info["dirty"]), "not in git")
    lines = [
        f"run {info['run_id']}  {info['name']}  ({info['status']})",
        f"  commit {info['commit']} ({clean}); params sha256 {info['params_sha256']}",
        f"  torch {info['software'].get('torch')}, CUDA {info['software'].get('cuda')}, on {info['device']}",
    ]
    if info["prefect_flow_run"]:
        lines.append(f"  Prefect flow run: {info['prefect_flow_run']}")
    lines.append("  data:")
    lines += [f"    {d['name']:<24} md5 {d['digest']}  ({d['context']})" for d in info["datasets"]]
    lines.append("  DVC outputs (md5, as dvc.lock recorded them; where DVC's cache has them):")
    if not info["dvc_outputs"]:
        lines.append("    none recorded: the promote step did not run for this run")
    for out in info["dvc_outputs"]:
        where = out["cache"] or (
            "in git (cache: false)" if out["in_git"] else "not in the local cache (`dvc fetch` gets it from the remote)"
        )
        now = {True: "  [the checkout has it]", False: "  [the checkout has another]", None: ""}[out["in_checkout"]]
        lines.append(f"    {out['path']:<36} {out['md5']}  {where}{now}")
    lines.append("  MLflow models:")
    lines += [f"    {m['name']:<12} {m['uri']}  ({m['status']})" for m in info["models"]]
    for v in info["registered"]:
        tags = f" @{', @'.join(v['aliases'])}" if v["aliases"] else ""
        lines.append(f"    registered: models:/{v['name']}/{v['version']}{tags}")
    if info["promotion"]:
        lines.append(f"  promotion: {info['promotion']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.lineage", description=__doc__.split("\n\n")[0])
    p.add_argument("run_id", help="the MLflow run id (the run page's URL and `mlflow runs list` show it)")
    p.add_argument("--json", action="store_true", help="print the lineage as JSON")
    p.add_argument("--restore", type=Path, metavar="DIR", help="copy the run's DVC outputs from the cache into DIR")
    args = p.parse_args(argv)
    with user_errors("lineage: "):
        info = lineage(args.run_id)
        if args.restore:
            if args.restore.exists() and any(args.restore.iterdir()):
                fail(f"lineage: {args.restore} is not empty; name a new or empty folder", InputError.exit_code)
            written = restore(info, args.restore)
            missing = [o["path"] for o in info["dvc_outputs"] if o["cache"] is None]
            for out in info["dvc_outputs"]:
                missing += [f"{out['path']}/{f['relpath']}" for f in out.get("files", []) if f["cache"] is None]
            gone = f"; not in the cache: {', '.join(missing)}" if missing else ""
            print(f"restored {len(written)} files into {args.restore}{gone}")
            return
    print(json.dumps(info, indent=2) if args.json else show(info))


if __name__ == "__main__":
    main()
