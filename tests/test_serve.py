"""Using the model: the prediction command, the model loader's checks, and the HTTP server under bad input and load."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, free_port, one_line_error, python


@pytest.fixture(scope="module")
def exported(trained_template: Path) -> Path:
    """The trained project (read-only here): its models/export/ and prepared data."""
    return trained_template / "project"


@pytest.fixture(scope="module")
def digit_files(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The test split written as 8-bit PNG files in <class>/ folders, as a user would have them; (folder, count)."""
    folder = tmp_path_factory.mktemp("digit-files")
    manifest = json.loads((exported / "data/prepared/manifest.json").read_text())
    images = np.load(exported / "data/prepared/test-images.npy")
    labels = np.load(exported / "data/prepared/test-labels.npy")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        cls = folder / manifest["classes"][label]
        cls.mkdir(exist_ok=True)
        pixels = np.round(image[0] * (255 / manifest["max_value"])).astype(np.uint8)
        Image.fromarray(pixels, "L").save(cls / f"{i:04d}.png")
    return folder, len(labels)


def png(size: tuple[int, int] = (32, 32), value: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_command_scores_the_test_images_as_the_evaluate_step_did(exported, digit_files, tmp_path):
    """From 8-bit PNG files of the test split, with no --model: the project's last export."""
    folder, count = digit_files
    out = tmp_path / "predictions.csv"
    proc = python("-m", "serve.predict", str(folder), "--output", str(out), cwd=exported)
    assert proc.returncode == 0, proc.stderr
    assert f"predict: {count} of {count} files scored" in proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == count and all(not r["error"] for r in rows)
    correct = sum(r["class"] == Path(r["file"]).parent.name for r in rows)
    accuracy = json.loads((exported / "metrics/evaluate.json").read_text())["test"]["accuracy"]
    assert correct == round(accuracy * count), (correct, accuracy)  # the same images right and wrong in number
    assert abs(correct / count - accuracy) < 1e-6
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)


def test_photos_of_any_size_and_mode_top_k_as_json_and_a_glob(exported, digit_files, tmp_path):
    """The 3s as 64x48 RGB JPEGs with EXIF-free borders: decoded, made grey, cropped and resized as in training."""
    folder, _ = digit_files
    threes = tmp_path / "threes"
    threes.mkdir()
    for f in sorted((folder / "3").glob("*.png")):
        grey = Image.open(f).resize((48, 48), Image.Resampling.NEAREST)
        photo = Image.new("RGB", (64, 48))
        photo.paste(grey.convert("RGB"), (8, 0))  # centred: the crop policy cuts the borders off
        photo.save(threes / f"{f.stem}.jpg", quality=98)
    out = tmp_path / "p.json"
    proc = python("-m", "serve.predict", f"{threes}/*.jpg", "--top-k", "3", "--output", str(out), cwd=exported)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == len(list((folder / "3").glob("*.png")))
    assert sum(r["class"] == "3" for r in rows) / len(rows) >= 0.8  # resizing twice is not lossless
    for row in rows:
        probs = [t["probability"] for t in row["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert row["class"] == row["top_k"][0]["class"] and len({t["class"] for t in row["top_k"]}) == 3


def test_bad_files_get_their_reason_and_the_others_are_still_scored(exported, digit_files, tmp_path):
    folder, _ = digit_files
    good = sorted((folder / "7").glob("*.png"))[:2]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image")
    (bad / "empty.png").write_bytes(b"")
    (bad / "cut.png").write_bytes(png()[:60])
    (bad / "huge.png").write_bytes(png((400, 300)))
    (bad / ".hidden.png").write_bytes(png())  # left out, as prepare leaves it out
    (bad / "Thumbs.db").write_bytes(b"\x00" * 64)  # the same
    out = tmp_path / "p.csv"
    args = [*map(str, good), str(bad), str(tmp_path / "missing.png"), f"{tmp_path}/none-*.jpg"]
    proc = python("-m", "serve.predict", *args, "--max-image-pixels", "100000", "--output", str(out), cwd=exported)
    assert proc.returncode == 3, proc.stderr
    rows = {Path(r["file"]).name: r for r in csv.DictReader(out.open())}
    assert list(rows) == [g.name for g in good] + [
        "cut.png",
        "empty.png",
        "huge.png",
        "notes.txt",
        "missing.png",
        "none-*.jpg",
    ]
    assert all(rows[g.name]["class"] == "7" and not rows[g.name]["error"] for g in good)
    assert rows["cut.png"]["error"].startswith("truncated or corrupt")
    assert rows["empty.png"]["error"] == "empty file (0 bytes)"
    assert rows["huge.png"]["error"].startswith("400x300 pixels, over the pixel limit (100,000)")
    assert rows["notes.txt"]["error"] == "not an image (Pillow cannot identify it)"
    assert rows["missing.png"]["error"] == "no such file or folder"
    assert rows["none-*.jpg"]["error"] == "no file matches this pattern"
    assert all(not r["class"] for r in rows.values() if r["error"])
    assert "2 of 8 files scored" in proc.stderr


def test_a_file_named_twice_is_scored_once_and_a_name_that_is_not_utf8_is_written_back(exported, digit_files, tmp_path):
    from serve import predict

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    source = sorted((digit_files[0] / "2").glob("*.png"))[0].read_bytes()
    (folder / "a.png").write_bytes(source)
    (folder / "sub/b.png").write_bytes(source)
    odd = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1 bytes, as an old camera or archive names it
    with open(odd, "wb") as f:
        f.write(source)
    out = tmp_path / "p.csv"
    model = str(exported / "models/export")
    code = predict.main([str(folder), f"{folder}/**/*", str(folder / "a.png"), "--model", model, "--output", str(out)])
    assert code == 0
    lines = out.read_bytes().splitlines()[1:]
    assert [line.split(b",")[0] for line in lines] == [
        os.fsencode(folder / "a.png"),
        odd,
        os.fsencode(folder / "sub/b.png"),
    ]
    assert len({line.split(b",", 1)[1] for line in lines}) == 1  # the same bytes, the same answer


@pytest.mark.slow
def test_an_output_that_cannot_be_replaced_keeps_its_old_content(exported, digit_files, tmp_path):
    from tests.conftest import immutable

    out = tmp_path / "p.csv"
    files = [str(f) for f in sorted((digit_files[0] / "1").glob("*.png"))[:3]]
    assert python("-m", "serve.predict", *files, "--output", str(out), cwd=exported).returncode == 0
    before = out.read_bytes()
    with immutable(out):
        proc = python("-m", "serve.predict", *files, "--top-k", "2", "--output", str(out), cwd=exported)
        assert proc.returncode == 9 and f"cannot write {out}" in one_line_error(proc)
        assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no temporary file left beside it


@pytest.mark.slow
def test_a_model_that_cannot_be_used_is_one_message_and_writes_nothing(exported, tmp_path):
    from serve.model import ModelError, load

    export = tmp_path / "export"
    shutil.copytree(exported / "models/export", export)
    image = tmp_path / "a.png"
    image.write_bytes(png())
    out = tmp_path / "p.csv"
    (tmp_path / "junk.ts").write_text("not a model")
    cases = {
        str(tmp_path / "nowhere"): "does not exist",
        str(tmp_path / "a.png"): "is not an exported model: pass a .ts",
        str(tmp_path / "junk.ts"): "there is no",  # no model.json beside it
    }
    for model, expected in cases.items():
        proc = python("-m", "serve.predict", str(image), "--model", model, "--output", str(out), cwd=exported)
        assert proc.returncode == 4 and expected in one_line_error(proc), proc.stderr
        assert not out.exists()

    info = json.loads((export / "model.json").read_text())
    (export / "model.ts").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="is not the file its model.json describes"):
        load(str(export))
    (export / "model.json").write_text(json.dumps({**info, "sha256": {}}))
    with pytest.raises(ModelError, match="is not a TorchScript model torch .* can load"):
        load(str(export))
    (export / "model.json").write_text(json.dumps({k: v for k, v in info.items() if k != "preprocess"}))
    with pytest.raises(ModelError, match="lacks the classes or the preprocessing contract"):
        load(str(export / "model.pt2"))
    (export / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        load(str(export / "model.pt2"))
    # A model that does not fit its contract: the 8x8 digits model told that it takes 3-channel images.
    wrong = {**info, "preprocess": {**info["preprocess"], "channels": 3}}
    (export / "model.json").write_text(json.dumps(wrong))
    with pytest.raises(ModelError, match=r"does not take the input its model.json describes \(3x8x8"):
        load(str(export / "model.pt2"))


def test_a_registry_reference_loads_the_champion_and_answers_as_the_export(exported, digit_files, monkeypatch):
    from serve.model import ModelError, load

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{exported.parent / 'mlflow.db'}")
    folder, _ = digit_files
    files = sorted(folder.glob("*/*.png"))[:40]
    local, champion = load(str(exported / "models/export")), load("models:/classifier@champion")
    assert champion.format == "torch_export" and champion.run_id
    assert (
        champion.describe()["mlflow"]["run_id"]
        == json.loads((exported / "models/train/run.json").read_text())["run_id"]
    )
    images = np.stack([local.decode(f.read_bytes()).image for f in files])
    assert np.allclose(local.probabilities(images), champion.probabilities(images), atol=1e-5)
    with pytest.raises(ModelError, match="cannot load models:/classifier@nobody from the MLflow store"):
        load("models:/classifier@nobody")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{exported.parent / 'nothing.db'}")
    with pytest.raises(ModelError, match="there is no MLflow store at"):
        load("models:/classifier@champion")


# The HTTP server ---------------------------------------------------------------------------------


def start_server(cwd: Path, *args: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "serve.http", "--port", str(port), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}): {server.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    pytest.fail("the server did not answer /health within 120 s")


@pytest.fixture(scope="module")
def server(exported):
    proc, url = start_server(exported, "--max-upload-mb", "0.5", "--max-images", "4", "--max-image-pixels", "100000")
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.mark.slow
def test_the_server_answers_with_the_classes_and_describes_its_model(server, exported, digit_files):
    import httpx

    from serve.model import load
    from serve.predict import score

    folder, _ = digit_files
    files = [sorted((folder / c).glob("*.png"))[0] for c in ("0", "4", "9")]
    r = httpx.post(
        f"{server}/predict?top_k=2", files=[("images", (f.name, f.read_bytes(), "image/png")) for f in files]
    )
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    # the command's answers for the same files, class and probabilities to the last digit
    assert predictions == score(load(str(exported / "models/export")), [(f.name, f.read_bytes()) for f in files], 2)
    assert [p["file"] for p in predictions] == [f.name for f in files]
    assert sum(p["class"] == c for p, c in zip(predictions, "049", strict=True)) >= 2  # a 3-epoch model
    assert all(len(p["top_k"]) == 2 and p["probability"] == p["top_k"][0]["probability"] for p in predictions)

    info = httpx.get(f"{server}/model").json()
    model_json = json.loads((exported / "models/export/model.json").read_text())
    assert info["classes"] == model_json["classes"] and info["format"] == "torchscript"
    assert info["sha256"] == model_json["sha256"]["torchscript"]
    assert info["preprocess"]["size"] == 8 and info["preprocess"]["max_value"] == 16
    assert info["mlflow"]["run_id"] == json.loads((exported / "models/train/run.json").read_text())["run_id"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


@pytest.mark.slow
def test_each_bad_request_gets_a_json_error_and_the_server_keeps_answering(server, digit_files):
    import httpx

    folder, _ = digit_files
    good = sorted((folder / "5").glob("*.png"))[0]
    ok = ("images", ("good.png", good.read_bytes(), "image/png"))

    def post(expected: int, **kwargs) -> dict:
        r = httpx.post(f"{server}/predict", **kwargs)
        assert r.status_code == expected, r.text
        assert httpx.get(f"{server}/health").status_code == 200  # still answering
        return r.json()

    # per image: the others in the request are still scored
    body = post(
        200,
        files=[
            ok,
            ("images", ("notes.txt", b"plain text", "text/plain")),
            ("images", ("cut.png", png()[:60], "image/png")),
            ("images", ("empty.png", b"", "image/png")),
        ],
    )
    rows = body["predictions"]
    assert rows[0]["class"] in "0123456789" and "error" not in rows[0]
    assert rows[1]["error"] == "not an image (Pillow cannot identify it)"
    assert rows[2]["error"].startswith("truncated or corrupt")
    assert rows[3]["error"] == "empty file (0 bytes)"
    huge = post(422, files=[("images", ("huge.png", png((400, 300)), "image/png"))])
    assert huge["predictions"][0]["error"].startswith("400x300 pixels, over the pixel limit (100,000)")
    # per request
    wrong_field = post(400, files=[("image", ("good.png", good.read_bytes(), "image/png"))])
    assert wrong_field["error"] == "no field 'images' in the form (it has 'image'): send each image as field 'images'"
    empty_form = {"content-type": "multipart/form-data; boundary=xyz"}
    assert post(400, content=b"--xyz--\r\n", headers=empty_form)["error"].startswith(
        "no field 'images' in the form (it is empty, or cut off)"
    )
    assert post(415, content=good.read_bytes(), headers={"content-type": "image/png"})["error"].startswith(
        "send the images as multipart/form-data, field 'images'"
    )
    assert post(400, files=[ok] * 5)["error"] == "at most 4 images per request"
    with_text = post(200, files=[ok], data={f"note{n}": "x" for n in range(5)})  # text fields are not images
    assert [p["class"] for p in with_text["predictions"]] == [rows[0]["class"]]
    wrong_method = httpx.get(f"{server}/predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert httpx.head(f"{server}/health").status_code == 200
    too_big = post(413, files=[("images", ("big.png", b"\0" * 600_000, "image/png"))])
    assert too_big["error"].startswith("the request body is 600,") and too_big["error"].endswith(
        "over the limit of 500,000 bytes"
    )
    assert (
        post(422, files=[ok], params={"top_k": "11"})["error"]
        == "top_k must be between 1 and 10 (the number of classes)"
    )
    assert post(422, files=[ok], params={"top_k": "x"})["error"].startswith("query.top_k:")
    text = post(422, files={"images": (None, "hello")})
    assert text["predictions"][0]["error"].startswith("this 'images' part has no filename, so it was taken as text")
    nameless = post(422, files=[("images", ("", good.read_bytes(), "image/png"))])  # httpx sends no filename
    assert nameless["predictions"][0]["error"].startswith("this 'images' part has no filename")
    assert post(400, content=b"x" * 10, headers={"content-type": "multipart/form-data"})["error"] == (
        "cannot read the form: Missing boundary in multipart."
    )
    assert httpx.get(f"{server}/nowhere").json() == {"error": "Not Found"}
    # the server still scores after all of that
    assert post(200, files=[ok])["predictions"][0] == rows[0] | {"file": "good.png"}


@pytest.mark.slow
def test_the_server_does_not_start_on_a_bad_model_or_a_busy_port(exported, tmp_path):
    (tmp_path / "model.ts").write_text("nonsense")
    port = free_port()
    proc = python("-m", "serve.http", "--port", str(port), "--model", str(tmp_path / "model.ts"), cwd=exported)
    assert proc.returncode == 4 and "there is no" in one_line_error(proc)
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        proc = python("-m", "serve.http", "--port", str(port), cwd=exported)
    assert proc.returncode == 10 and f"cannot listen on 127.0.0.1:{port}" in one_line_error(proc)


@pytest.mark.slow
def test_concurrent_clients_on_loopback_get_every_answer(server, exported, capsys):
    """A bounded load test: 8 clients, at most 400 requests or 60 s; no request may fail."""
    spec = importlib.util.spec_from_file_location("http_load", ROOT / "benchmarks/http_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.ROOT = exported
    result = bench.load(server, bench.test_images(64), clients=8, requests=400, seconds=60, per=1)
    with capsys.disabled():
        print(f"\nload: {result}")
    assert result["failed"] == 0, result["failures"]
    assert result["requests"] == 400 and result["p99_ms"] > 0


# The batch-scoring flow --------------------------------------------------------------------------


@pytest.mark.slow
def test_the_scoring_flow_writes_every_row_logs_counts_and_replaces_nothing_on_failure(
    prefect_api, exported, digit_files, tmp_path
):
    from tests.conftest import prefect_rest

    folder = tmp_path / "incoming"
    shutil.copytree(digit_files[0], folder)
    (folder / "3" / "broken.png").write_bytes(png()[:40])
    out = tmp_path / "scores" / "today.json"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    args = ["-m", "flows.score", str(folder), "--output", str(out), "--batch-size", "100"]
    proc = python(*args, cwd=exported, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    count = digit_files[1] + 1
    assert len(rows) == count and [r["file"] for r in rows if "error" in r] == [str(folder / "3" / "broken.png")]
    logged = proc.stdout + proc.stderr
    assert f"score: {count - 1} of {count} files scored into {out}" in logged
    (run,) = prefect_rest(prefect_api, "flow_runs/filter", {"flow_runs": {"name": {"any_": [f"score {folder}"]}}})
    assert run["state_type"] == "COMPLETED"
    tasks = prefect_rest(prefect_api, "task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert sorted(t["name"] for t in tasks) == sorted(
        ["load model", f"write {out}", "score files 1-100", "score files 101-200", "score files 201-271"]
    )
    artifacts = prefect_rest(prefect_api, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    (summary,) = [a for a in artifacts if a["key"] == "score-summary"]
    assert f"**{count - 1} of {count} files scored**" in summary["data"] and "broken.png" in summary["data"]

    # A model that cannot be used: one line, and yesterday's predictions stay as they were.
    before = out.read_bytes()
    proc = python(*args, "--model", str(tmp_path / "nothing.pt2"), cwd=exported, env=env)
    assert proc.returncode == 4 and "nothing.pt2 does not exist" in one_line_error(proc)
    assert out.read_bytes() == before
