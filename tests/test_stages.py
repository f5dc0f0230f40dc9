"""One name per step, one list per fact: dvc.yaml, the flow, params.yaml, tasks/ and the paths agree."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import yaml

from tasks import STAGES, paths

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "serve")
# Code a stage runs without importing it: the model code that export logs to MLflow as a file.
NOT_IMPORTED = {"export": {"tasks/mlflow_torchscript.py"}}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(module: str) -> set[str]:
    """Files of every project module that importing `module` can load: its imports, transitively.

    Read from the source (`ast`), so imports inside functions count too, as they run when the step runs.
    """
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module loads every package above it
            file = module_file(".".join(parts[:i]))
            if file is None:
                continue
            rel = file.relative_to(ROOT).as_posix()
            if rel in seen:
                continue
            seen.add(rel)
            for node in _runtime_nodes(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
                elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    todo.append(node.module)
                    todo += [f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")]
    return seen


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for type hints only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def test_dvc_stages_and_flow_tasks_are_the_same_list():
    from flows.pipeline import STEP_TASKS

    flow_tasks = [t.name for t in STEP_TASKS.values()]
    assert list(dvc_stages()) == flow_tasks == list(STAGES)


def test_each_stage_calls_its_own_module_and_params_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert [k for k in params if k != "seed"] == list(STAGES)
    for stage, spec in dvc_stages().items():
        assert spec["cmd"] == f"python -m tasks {stage}"
        assert callable(importlib.import_module(f"tasks.{stage}").run)


def test_each_stage_depends_on_exactly_the_code_it_runs():
    """Edit any module a stage imports, and `dvc repro` must re-run that stage; edit another, and it must not."""
    for stage, spec in dvc_stages().items():
        code = {d for d in spec["deps"] if d.endswith(".py")}
        needed = project_imports(f"tasks.{stage}") | NOT_IMPORTED.get(stage, set())
        assert not needed - code, f"dvc.yaml stage {stage} lacks deps: {sorted(needed - code)}"
        assert not code - needed, f"dvc.yaml stage {stage} lists code it does not run: {sorted(code - needed)}"


def test_steps_never_import_each_other_and_the_core_imports_no_step():
    for stage in STAGES:
        others = {f"tasks/{s}.py" for s in STAGES if s != stage}
        assert not project_imports(f"tasks.{stage}") & others, stage
    for file in (ROOT / "tasks/core").glob("*.py"):
        reached = project_imports("tasks.core" if file.stem == "__init__" else f"tasks.core.{file.stem}")
        allowed = {"tasks/__init__.py", "tasks/errors.py", "serve/__init__.py", "serve/preprocess.py"}
        assert {r for r in reached if not r.startswith("tasks/core/")} <= allowed, file


def test_serving_needs_only_the_export_and_its_own_package():
    """serve/ runs where the project's pipeline code is not installed: a model server, a scoring job."""
    for file in (ROOT / "serve").glob("*.py"):
        reached = project_imports("serve" if file.stem == "__init__" else f"serve.{file.stem}")
        assert all(r.startswith("serve/") for r in reached), (file, reached)


def test_stage_outputs_are_the_paths_the_code_writes():
    for stage, spec in dvc_stages().items():
        declared = []
        for kind in ("outs", "metrics", "plots"):
            declared += [next(iter(o)) if isinstance(o, dict) else o for o in spec.get(kind, [])]
        assert sorted(declared) == sorted(str(p) for p in paths.OUTPUTS[stage]), stage


def test_the_checkpoints_resume_key_covers_train_s_code_and_nothing_else():
    """The code hash in a checkpoint's name moves with what DVC re-runs train for, no more: else a commit
    that only touches another module would make a fresh clone's checkpoint names differ from dvc.lock's."""
    from tasks.train import train_code

    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    assert [str(p.relative_to(ROOT)) for p in train_code()] == sorted(d for d in deps if d.endswith(".py"))
    assert ROOT / "tasks/train.py" in train_code() and ROOT / "tasks/reproduce.py" not in train_code()
