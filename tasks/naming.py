"""What a pipeline run is called, and what it changed: one name for MLflow, Prefect and the DVC experiment.

A run is named from what tells it apart from the others: the model, the data, and the params
that differ from the committed `params.yaml` (the file in git's HEAD), e.g.
`cnn-digits lr=0.01 epochs=5`; a run on the committed params is just `cnn-digits`. A `dvc exp run`
adds its experiment's name: `cnn-digits lr=0.01 [brisk-lion]`.

The comparison is on the validated values, not on the YAML text, so a params file that `--set`
or `dvc exp run -S` rewrote in another layout, with the committed values back, counts as
unchanged (`git.dirty` false). Light on purpose: git, the params model and the standard library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.params import PARAMS_FILE, Params
from tasks.tracking import git

MAX_NAME = 90  # characters: the MLflow runs list and the Prefect flow-run list cut longer names
# Params that change no result (where checkpoints go, how many loader processes): never in a name.
NOT_IN_NAME = ("train.checkpoint.", "train.num_workers", "prepare.workers")


def committed_params(path: Path = PARAMS_FILE) -> dict[str, Any] | None:
    """The flat params of `path` as git's HEAD has it, or None (no git, not committed, or not valid)."""
    from tasks.params import _yaml, validate

    relative = git("ls-files", "--full-name", "--", str(path))
    if not relative:
        return None
    text = git("show", f"HEAD:{relative}")
    if text is None:
        return None
    try:
        return validate(_yaml().load(text) or {}, source=f"HEAD:{relative}").flat()
    except Exception:  # an old commit's params may not validate against today's model (a ConfigError)
        return None


def differs_from_head(path: Path = PARAMS_FILE) -> bool:
    """Whether the file's text differs from git's HEAD (True when HEAD does not have it): the fallback
    when the committed params cannot be compared by value."""
    if not git("ls-files", "--", str(path)):
        return True
    return bool(git("diff", "HEAD", "--", str(path)))


def changes(params: Params, committed: dict[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """{key: (committed value, this run's value)} for every param that differs; {} without a committed file."""
    if committed is None:
        return {}
    now = params.flat()
    return {k: (committed.get(k), v) for k, v in now.items() if committed.get(k) != v}


def compare_with_head(params: Params, path: Path = PARAMS_FILE) -> tuple[dict[str, Any] | None, dict, bool]:
    """(HEAD's flat params or None, `changes`, whether the params differ from HEAD): by value where git's
    HEAD has a valid params file, else by text (differing when HEAD has none). What `git.dirty` counts."""
    committed = committed_params(path)
    changed = changes(params, committed)
    return committed, changed, bool(changed) if committed is not None else differs_from_head(path)


def _short(key: str, keys: list[str]) -> str:
    """`train.lr` -> `lr`, unless another param ends the same way (`train.batch_size`, `evaluate.batch_size`)."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(_value, value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def data_name(params: Params) -> str:
    dataset = params.prepare.dataset
    return Path(params.prepare.root).name or dataset if dataset == "imagefolder" else dataset


def run_name(params: Params, changed: dict[str, tuple[Any, Any]], experiment: str | None = None) -> str:
    """`cnn-digits lr=0.01 epochs=5`, with `[experiment]` in a `dvc exp run`; cut to MAX_NAME characters."""
    name = f"{params.build.model}-{data_name(params)}"
    keys = list(params.flat())
    shown = [k for k in changed if not k.startswith(NOT_IN_NAME) and k != "prepare.dataset" and k != "build.model"]
    suffix = f" [{experiment}]" if experiment else ""
    for i, key in enumerate(shown):
        part = f" {_short(key, keys)}={_value(changed[key][1])}"
        more = f" +{len(shown) - i} more"
        if len(name) + len(part) + len(suffix) + (len(more) if i < len(shown) - 1 else 0) > MAX_NAME:
            name += more
            break
        name += part
    name += suffix
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def experiment_name() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME for its stages), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def describe(params: Params, changed: dict[str, tuple[Any, Any]], links: dict[str, str], compared: bool = True) -> str:
    """A few lines of Markdown for the run's description: what was trained on what, what changed, the links."""
    t = params.train
    lines = [
        f"**{params.build.model}** on **{data_name(params)}**: {t.epochs} epochs, {t.optimizer} lr {t.lr:g}, "
        f"batch {t.batch_size}, seed {params.seed}.",
        "",
    ]
    commit = git("rev-parse", "--short", "HEAD")
    base = f"`params.yaml` at commit {commit}" if commit else "`params.yaml`"
    if not compared:
        lines.append(f"Params: not compared with {base} (git's HEAD has no valid params file there); all are logged.")
    elif changed:
        lines.append(f"Params that differ from {base}:")
        lines += [f"- `{k}`: {_value(old)} → {_value(new)}" for k, (old, new) in changed.items()]
    else:
        lines.append(f"Params: as in {base}.")
    if links:
        lines += ["", *(f"{label}: {url}" for label, url in links.items())]
    return "\n".join(lines)
