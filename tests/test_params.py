"""params.yaml validation: every mistake is one line naming the key, and nothing runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import ConfigError, Params, load, write_overrides
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parents[1]
LIGHT_ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # the entry points must fail before any server


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def full(tmp_path: Path, edits: dict[str, str] | None = None) -> Path:
    """The project's params.yaml with some lines' text replaced, as a user would edit it."""
    text = (ROOT / "params.yaml").read_text()
    for old, new in (edits or {}).items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return write(tmp_path, text)


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path, overrides)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_the_project_params_file_is_valid_and_spells_out_every_default():
    """What a user reads in params.yaml is what runs: no hidden default differs from it."""
    params = load(ROOT / "params.yaml")
    assert params == Params()
    assert params.flat()["train.epochs"] == params.train.epochs


def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    message = error_of(full(tmp_path, {"  epochs: 30": "  epocs: 30"}))
    assert message == f"{tmp_path / 'params.yaml'}: train.epocs: unknown key (did you mean 'epochs'?)"


def test_unknown_section_lists_what_is_allowed(tmp_path):
    message = error_of(write(tmp_path, "trian_stuff:\n  epochs: 3\n"))
    assert "trian_stuff: unknown key" in message
    assert "train" in message


def test_wrong_type_shows_the_value_and_the_expected_type(tmp_path):
    message = error_of(write(tmp_path, "train:\n  epochs: ten\n"))
    assert "train.epochs: got 'ten'" in message
    assert "integer" in message


def test_out_of_range_and_bad_choice(tmp_path):
    assert "train.lr: got -0.1; input should be greater than 0" in error_of(write(tmp_path, "train:\n  lr: -0.1\n"))
    message = error_of(write(tmp_path, "build:\n  model: resnet\n"))
    assert "build.model: got 'resnet'" in message and "'resnet18' or 'mobilenet_v3_small'" in message


def test_fractions_must_leave_training_data(tmp_path):
    message = error_of(write(tmp_path, "prepare:\n  val_fraction: 0.5\n  test_fraction: 0.45\n"))
    assert "prepare" in message and "below 0.9" in message


def test_not_yaml_gives_the_line(tmp_path):
    assert "not valid YAML at line 3" in error_of(write(tmp_path, "train:\n  epochs: [3\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    path = full(tmp_path)
    params = load(path, ["train.lr=0.01", "build.channels=[8, 16]", "build.model=mlp"])
    assert params.train.lr == 0.01 and params.build.channels == [8, 16] and params.build.model == "mlp"
    assert "train.lrr: unknown key (did you mean 'lr'?)" in error_of(path, ["train.lrr=0.1"])
    assert "expected KEY=VALUE" in error_of(path, ["train.lr"])
    # Read as YAML 1.2, as DVC reads them: 1e-3 is a number, not the string YAML 1.1 makes of it.
    assert load(path, ["train.lr=1e-3"]).train.lr == 0.001


def test_duplicate_key_is_an_error_as_in_dvc(tmp_path):
    path = full(tmp_path, {"  lr: 0.003": "  lr: 0.003\n  lr: 0.5"})
    message = error_of(path)
    assert message.endswith("duplicate key 'lr'; keep one of the two values")
    second = path.read_text().splitlines().index("  lr: 0.5") + 1
    assert f"line {second}: " in message


def test_empty_file_is_an_error_not_the_built_in_defaults(tmp_path):
    message = error_of(write(tmp_path, "# nothing here\n"))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: the file is empty")
    assert "prepare, build, train, evaluate, export" in message


def test_missing_keys_are_named_with_their_defaults(tmp_path):
    message = error_of(full(tmp_path, {"  dropout: 0.1\n": "", "evaluate:\n  batch_size: 512\n": ""}))
    assert "build.dropout: missing (default 0.1)" in message and "evaluate: missing section" in message


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_infinite_or_nan_values_are_refused(tmp_path, value):
    message = error_of(full(tmp_path), [f"train.weight_decay={value}"])
    assert message.startswith(f"{tmp_path / 'params.yaml'}: train.weight_decay: got")
    assert "finite number" in message


def test_write_overrides_keeps_comments_and_writes_validated_values(tmp_path):
    path = full(tmp_path)
    before = path.read_text()
    write_overrides(path, ["train.lr=1e-2", "build.model=mlp", "train.epochs=5.0"])
    after = path.read_text()
    expected = before.replace("  lr: 0.003", "  lr: 0.01").replace("model: cnn", "model: mlp")
    assert after == expected.replace("epochs: 30", "epochs: 5")  # comments kept, the validated int written
    assert load(path).train.lr == 0.01 and load(path).train.epochs == 5


def test_write_overrides_writes_nothing_when_invalid(tmp_path):
    path = full(tmp_path)
    before = path.read_text()
    with pytest.raises(ConfigError, match="train.lr: got -1"):
        write_overrides(path, ["train.lr=-1"])
    assert path.read_text() == before


def test_write_overrides_refuses_a_read_only_file_instead_of_replacing_it(tmp_path):
    path = full(tmp_path)
    before = path.read_text()
    path.chmod(0o444)
    with pytest.raises(ConfigError) as exc:
        write_overrides(path, ["train.lr=0.01"])
    assert str(exc.value) == (
        f"{path}: the file is read-only, and --set writes the overrides into it; "
        f"make it writable (chmod u+w {path}) or run without --set"
    )
    assert path.read_text() == before and (path.stat().st_mode & 0o777) == 0o444


@pytest.mark.parametrize("entry", [["-m", "tasks", "train"], ["-m", "flows.pipeline"]])
def test_entry_points_reject_a_bad_key_without_importing_heavy_libraries(tmp_path, entry):
    """Exit code 2, one line on stderr, no file written, and torch/Prefect/MLflow never imported."""
    full(tmp_path)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc, imported = run_module(entry[1], [*entry[2:], "--set", "train.epocs=4"], cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params.yaml: train.epocs: unknown key (did you mean 'epochs'?)"
    assert proc.stdout == ""
    assert not {"torch", "prefect", "mlflow"} & imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("entry", [["-m", "tasks"], ["-m", "flows.pipeline"]])
def test_help_answers(entry):
    proc = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--set KEY=VALUE" in proc.stdout


def entry_points() -> tuple[str, ...]:
    """Every entry point a user runs: the list `benchmarks/startup.py` times the `--help` of."""
    spec = importlib.util.spec_from_file_location("startup", ROOT / "benchmarks" / "startup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.ENTRY_POINTS


@pytest.mark.parametrize("module", entry_points())
def test_help_of_every_entry_point_imports_no_heavy_library(module):
    """`--help` in about a tenth of a second: none of torch, Prefect, MLflow, DVC, pydantic, numpy is imported."""
    proc, imported = run_module(module, ["--help"], cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: ")
    assert not {"torch", "prefect", "mlflow", "dvc", "pydantic", "numpy"} & imported


def test_write_overrides_keeps_the_files_permissions_and_writes_through_a_symlink(tmp_path):
    real = full(tmp_path)
    real.chmod(0o640)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    write_overrides(link, ["train.lr=0.01"])
    assert link.is_symlink() and load(real).train.lr == 0.01
    assert (real.stat().st_mode & 0o777) == 0o640


DUPLICATE_LINE = (ROOT / "params.yaml").read_text().splitlines().index("  lr: 0.003") + 2


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            {"  lr: 0.003": "  lr: 0.003\n  lr: 0.3"},
            f"params.yaml: line {DUPLICATE_LINE}: duplicate key 'lr'; keep one of the two values",
        ),
        (
            "",
            "params.yaml: the file is empty; it must hold seed and the sections prepare, build, train, evaluate",
        ),
    ],
)
def test_every_entry_point_refuses_what_dvc_refuses(tmp_path, edit, expected):
    """Duplicate keys and an empty file: exit 2 and one line from the stage command, as from DVC."""
    if edit:
        full(tmp_path, edit)
    else:
        write(tmp_path, "")
    for entry in (["-m", "tasks", "train"], ["-m", "flows.pipeline"]):
        proc = subprocess.run([sys.executable, *entry], cwd=tmp_path, capture_output=True, text=True, env=LIGHT_ENV)
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"error: {expected}") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("how", ["chmod", "chattr"])
def test_set_refuses_a_params_file_the_user_cannot_write(tmp_path, how):
    path = full(tmp_path)
    before = path.read_text()
    if how == "chmod":
        path.chmod(0o444)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.pipeline", "--set", "train.lr=0.01"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=LIGHT_ENV,
        )
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: params.yaml: the file is read-only, and --set writes the overrides into it; "
        "make it writable (chmod u+w params.yaml) or run without --set\n"
    )
    assert path.read_text() == before
