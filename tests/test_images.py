"""Your own images: image folders, MNIST files, bad files, image modes, augmentation.

The folders are made from scikit-learn's digits (tests/images.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import build, evaluate, paths, prepare, train
from tasks.errors import DataError
from tasks.files import read_json, sha256_file
from tasks.params import load
from tests.conftest import snapshot
from tests.images import add_defect, image_folder, mnist_root

ROOT_DIR = "data/raw/digits"
FOLDER = [
    "prepare.dataset=imagefolder",
    f"prepare.root={ROOT_DIR}",
    "prepare.image_size=16",
    "prepare.max_image_pixels=100000",
]
REASONS = {
    "truncated": "truncated or corrupt (",
    "corrupt": "corrupt: it starts as a PNG file, but Pillow cannot read it",
    "not_an_image": "not an image (Pillow cannot identify it)",
    "empty": "empty file (0 bytes)",
    "too_many_pixels": "400x400 pixels, over prepare.max_image_pixels (100,000): a decompression bomb",
    "symlink_outside": "symlink pointing outside the data root (to ",
    "duplicate": "the same bytes as 1/",
    "unreadable": "cannot read it (Permission denied)",
}


def params(*more: str):
    return load(overrides=[*FOLDER, *more])


@pytest.fixture
def folder(project: Path) -> Path:
    """A small image folder (3 classes of 8) in the project, prepared once: the outputs a failure must keep."""
    image_folder(project / ROOT_DIR, per_class=8, classes=3)
    prepare.run(params())
    return project / ROOT_DIR


def report() -> dict:
    return read_json(paths.DATA_REPORT, "prepare")


@pytest.mark.parametrize("kind", [k for k in REASONS if k != "unreadable"])
def test_a_bad_file_stops_prepare_naming_it_or_is_skipped_and_reported(folder, tmp_path, capsys, kind):
    bad = add_defect(folder, kind, outside=tmp_path / "elsewhere/x.png")
    before = snapshot(Path.cwd())

    with pytest.raises(DataError) as caught:
        prepare.run(params())
    message = str(caught.value)
    assert message.startswith(f"1 bad file in {ROOT_DIR}: {bad}: {REASONS[kind]}")
    assert message.endswith(
        "or set prepare.on_bad_sample: skip to leave such files out (each is then listed in the data report)"
    )
    assert snapshot(Path.cwd()) == before  # the previous prepared data, untouched

    capsys.readouterr()
    prepare.run(params("prepare.on_bad_sample=skip"))
    assert [(s["file"], s["reason"][: len(REASONS[kind])]) for s in report()["skipped"]] == [(bad, REASONS[kind])]
    manifest = read_json(paths.MANIFEST, "prepare")
    assert manifest["skipped"] == 1 and sum(manifest["sizes"].values()) == 24
    assert f"1 bad file left out, listed in {paths.DATA_REPORT}" in capsys.readouterr().out


def test_an_unreadable_file_is_named(folder, tmp_path):
    """Root reads any file: drop the capability that lets it, so the file's mode counts as for anyone."""
    bad = add_defect(folder, "unreadable", outside=tmp_path / "x.png")
    before = snapshot(Path.cwd())
    command = [sys.executable, "-m", "tasks", "prepare", *[f"--set={o}" for o in FOLDER]]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert f"error: prepare: 1 bad file in {ROOT_DIR}: {bad}: {REASONS['unreadable']}" in proc.stderr
    assert snapshot(Path.cwd()) == before


def test_several_bad_files_name_the_first_five_and_the_count(folder, tmp_path):
    bad = sorted(add_defect(folder, kind, outside=tmp_path / "x.png") for kind in list(REASONS)[:7])
    with pytest.raises(DataError) as caught:
        prepare.run(params())
    message = str(caught.value)
    assert message.startswith(f"7 bad files in {ROOT_DIR}: {bad[0]}: ")
    assert all(f"{b}: " in message for b in bad[:5]) and not any(f"{b}: " in message for b in bad[5:])
    assert "(and 2 more); fix or remove them" in message
    prepare.run(params("prepare.on_bad_sample=skip"))
    assert [s["file"] for s in report()["skipped"]] == bad


def test_an_empty_class_folder_stops_or_drops_the_class(folder):
    (folder / "9").mkdir()
    with pytest.raises(DataError, match=r"^1 bad file in data/raw/digits: 9/: empty class folder: no images in it;"):
        prepare.run(params())
    prepare.run(params("prepare.on_bad_sample=skip"))
    assert read_json(paths.MANIFEST, "prepare")["classes"] == ["0", "1", "2"]
    assert report()["dropped_classes"] == ["9"]


def test_a_single_class_is_refused(project):
    image_folder(project / ROOT_DIR, per_class=8, classes=1)
    with pytest.raises(DataError, match=r"only 1 class with usable images \(0\); a classifier needs at least 2"):
        prepare.run(params())
    assert not paths.MANIFEST.exists()


def test_image_modes_are_converted_and_hidden_files_ignored(project):
    from tasks.core.sources import decode

    root = project / ROOT_DIR
    image_folder(root, per_class=6, classes=2)
    grey = np.full((20, 12), 100, dtype=np.uint8)
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    transparent = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    transparent.info["transparency"] = 0
    variants = {
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "palette-transparent.png": transparent,
        "rgba.png": rgb.convert("RGBA"),
        "grey-alpha.png": rgb.convert("LA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "grey.png": rgb.convert("L"),
        "sixteen.png": Image.fromarray(np.full((20, 12), 100 * 257, dtype=np.uint16)),  # 16-bit grey
        "thirty-two.tif": Image.fromarray(np.full((20, 12), 100 * 257, dtype=np.int32), "I"),
        "float.tif": Image.fromarray(np.full((20, 12), 100 / 255, dtype=np.float32), "F"),
    }
    for name, image in variants.items():
        image.save(root / "0" / name, **({"transparency": 0} if name == "palette-transparent.png" else {}))
    # Each comes out as grey 100 exactly, in RGB and in grey: 16-bit and float scaled, never clipped.
    for name in variants:
        for channels in (3, 1):
            decoded = decode(root, f"0/{name}", channels, 8, "crop", 10_000)
            assert decoded.reason == "" and decoded.image.shape == (channels, 8, 8), name
            assert (decoded.image == 100).all(), (name, channels, np.unique(decoded.image))
    (root / "0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "1" / "._0007.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (root / "__MACOSX").mkdir()
    prepare.run(params("prepare.channels=3"))
    manifest = read_json(paths.MANIFEST, "prepare")
    assert manifest["skipped"] == 0 and sum(manifest["sizes"].values()) == 12 + len(variants)
    assert manifest["classes"] == ["0", "1"]


def test_a_thin_strip_and_a_rotated_photo_are_cut_and_turned_right(project):
    from tasks.core.sources import decode

    root = project / ROOT_DIR
    (root / "0").mkdir(parents=True)
    Image.new("RGB", (20_000, 2), (100, 100, 100)).save(root / "0/strip.png")
    photo = Image.new("RGB", (30, 10), (200, 50, 50))
    exif = photo.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to show upright
    photo.save(root / "0/phone.jpg", exif=exif, quality=95)
    strip = decode(root, "0/strip.png", 3, 16, "crop", 100_000)
    assert strip.reason == "" and strip.image.shape == (3, 16, 16)  # the centre, not a 160,000 px wide resize
    turned = decode(root, "0/phone.jpg", 3, 16, "crop", 100_000)
    assert (turned.width, turned.height) == (10, 30)  # the size as shown, after the EXIF rotation


def test_a_symlinked_class_folder_outside_the_root_is_a_bad_input(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    image_folder(elsewhere, per_class=3, classes=1)
    (folder / "7").symlink_to(elsewhere / "0")
    with pytest.raises(DataError, match=r"7/: class folder: symlink pointing outside the data root \(to "):
        prepare.run(params())


def test_a_class_too_small_to_split_is_named(folder):
    (folder / "9").mkdir()
    shutil.copy(folder / "0/0000.jpg", folder / "9/only.jpg")
    (folder / "0/0000.jpg").unlink()
    with pytest.raises(DataError, match=r"^classes with fewer than 3 usable images: '9' \(1\); a stratified split"):
        prepare.run(params())


def test_folders_split_by_hand_are_used_as_given(project):
    root = project / ROOT_DIR
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        image_folder(root / split, per_class=n, classes=3, seed=len(split))
    prepare.run(params())
    assert read_json(paths.MANIFEST, "prepare")["sizes"] == {"train": 30, "val": 9, "test": 12}

    shutil.copy(root / "train/0/0000.jpg", root / "test/0/copy.jpg")
    with pytest.raises(DataError, match=r"test/0/copy.jpg: the same bytes as train/0/0000.jpg \(in train/\)"):
        prepare.run(params())
    (root / "test/0/copy.jpg").unlink()
    # A class with no train images is left out of val and test too (under skip), never kept with none.
    shutil.rmtree(root / "train/2")
    (root / "train/2").mkdir()
    with pytest.raises(DataError, match=r"^1 bad file in data/raw/digits: train/2/: empty class folder"):
        prepare.run(params())
    prepare.run(params("prepare.on_bad_sample=skip"))
    manifest = read_json(paths.MANIFEST, "prepare")
    assert manifest["classes"] == ["0", "1"] and manifest["sizes"] == {"train": 20, "val": 6, "test": 8}
    # An empty val/ is an error, not a val split carved silently out of train/.
    for images in (root / "val").rglob("*.*"):
        images.unlink()
    with pytest.raises(DataError, match=r"the val split is empty: put images in data/raw/digits/val/<class>/"):
        prepare.run(params("prepare.on_bad_sample=skip"))
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match=r"has train/, val/ but no test/: splits made by hand need all three folders"):
        prepare.run(params())


def test_mnist_files_train_end_to_end(project):
    mnist_root(project / "data/raw")
    p = load(overrides=["prepare.dataset=mnist", "train.epochs=3"])
    prepare.run(p)
    manifest = read_json(paths.MANIFEST, "prepare")
    assert manifest["classes"][:2] == ["0 - zero", "1 - one"] and manifest["input_shape"] == [1, 16, 16]
    assert manifest["sizes"]["test"] == 297  # MNIST's own test set (t10k), as given
    assert manifest["sizes"]["train"] + manifest["sizes"]["val"] == 1500
    build.run(p)
    train.run(p)
    assert evaluate.run(p)["accuracy"] > 0.85  # chance is 0.1; the last digits are the hardest


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_missing_mnist_files_say_what_to_place_where(project, dataset, folder):
    with pytest.raises(DataError) as caught:
        prepare.run(load(overrides=[f"prepare.dataset={dataset}"]))
    assert str(caught.value) == (
        f"prepare.dataset is '{dataset}' but data/raw/{folder}/raw lacks train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte: place the four IDX files in "
        f"data/raw/{folder}/raw/, or set prepare.download: true to let torchvision fetch them"
    )


@pytest.mark.slow
def test_augmentation_with_two_workers_is_byte_reproducible(project):
    augmented = [
        "train.epochs=2",
        "train.num_workers=2",
        "train.augment.crop_scale=0.7",
        "train.augment.rotation=15",
        "train.augment.color_jitter=0.3",
    ]
    prepare.run(load())
    build.run(load())
    weights = []
    for overrides in (augmented, augmented, augmented[:2]):
        train.run(load(overrides=overrides))
        weights.append(sha256_file(paths.BEST))
    assert weights[0] == weights[1]  # same seed, same augmented batches, from two worker processes
    assert weights[0] != weights[2]  # and the augmentation did change what was trained on


def test_data_report_counts_sizes_and_sample_grid(folder):
    counts = paths.DATA_COUNTS.read_text().splitlines()
    assert counts[0] == "class,split,images" and len(counts) == 1 + 3 * 3
    total = sum(int(line.rsplit(",", 1)[1]) for line in counts[1:])
    assert total == 24
    sizes = [line.split(",") for line in paths.DATA_SIZES.read_text().splitlines()[1:]]
    assert sum(int(n) for _, _, n in sizes) == 24 and all(32 <= int(w) <= 48 for w, _, _ in sizes)
    grid = Image.open(paths.DATA_SAMPLES)
    assert grid.format == "PNG" and grid.height > 3 * 32  # a row of 8 samples per class
    # Each row starts with its class's name: dark text on the white margin left of the 8 square tiles.
    row = (grid.height - 2) / 3
    margin = round(grid.width - 8 * row - 2)
    pixels = np.array(grid.convert("L"))
    assert margin > 10 and all(
        (pixels[round(k * row) + 2 : round((k + 1) * row), :margin] < 128).any() for k in range(3)
    )
    # Right of the names, each class's first 8 train images as torchvision's make_grid lays them out.
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import make_grid

    images, labels = np.load(paths.images("train")), np.load(paths.labels("train"))
    tiles = torch.zeros(3 * 8, *images.shape[1:], dtype=torch.uint8)
    for k in range(3):
        picked = np.flatnonzero(labels == k)[:8]
        tiles[k * 8 : k * 8 + picked.size] = torch.from_numpy(images[picked])
    factor = -(-32 // min(images.shape[2:]))  # small images in big pixels, at least 32 of them
    size = [images.shape[2] * factor, images.shape[3] * factor]
    tiles = F.resize(tiles, size, interpolation=F.InterpolationMode.NEAREST)
    expected = make_grid(tiles, nrow=8, padding=2, pad_value=128).permute(1, 2, 0).numpy()
    assert (np.array(grid.convert("RGB"))[:, grid.width - expected.shape[1] :] == expected).all()
    assert json.loads(paths.DATA_REPORT.read_text())["skipped"] == []


@pytest.mark.slow
def test_dvc_repro_on_an_image_folder_with_bad_files(tmp_path, monkeypatch):
    """The acceptance run: a real `dvc repro` on a DVC-tracked folder of RGB PNGs and JPEGs, some broken."""
    from tests.conftest import OUTPUTS, dvc, make_project, set_param, sh

    path = make_project(
        tmp_path / "project",
        {
            "dataset: digits ": "dataset: imagefolder",
            "root: data/raw ": f"root: {ROOT_DIR}",
            "image_size: null": "image_size: 32",
            "on_bad_sample: error": "on_bad_sample: skip",
            "max_image_pixels: 40000000": "max_image_pixels: 100000",
            "epochs: 30": "epochs: 10",
        },
    )
    monkeypatch.chdir(path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = path / ROOT_DIR
    image_folder(root, per_class=100)
    kinds = ["truncated", "corrupt", "not_an_image", "empty", "too_many_pixels", "duplicate"]
    bad = sorted(add_defect(root, kind, outside=tmp_path / "x.png") for kind in kinds)
    dvc("add", ROOT_DIR, cwd=path)
    sh("git", "add", "-A", cwd=path)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "data", cwd=path)

    first = dvc("repro", cwd=path).stdout
    assert f"{len(bad)} bad files left out, listed in data/prepared/report.json" in first
    assert [s["file"] for s in report()["skipped"]] == bad
    assert read_json(paths.TEST_METRICS, "evaluate")["test"]["accuracy"] >= 0.95
    from tasks.tracking import client

    run = client().search_runs([client().get_experiment_by_name("pipeline").experiment_id])[0]
    logged = {a.path for a in client().list_artifacts(run.info.run_id, "data")}
    assert {"data/report.json", "data/samples.png", "data/counts.csv", "data/sizes.csv"} <= logged

    # Under `error`, the same folder stops prepare, naming the files, and every output stays as it was.
    before = {out: sha256_file(path / out) for out in OUTPUTS}
    lock = (path / "dvc.lock").read_text()
    set_param(path, "on_bad_sample: skip", "on_bad_sample: error")
    failed = dvc("repro", cwd=path, check=False)
    assert failed.returncode != 0
    assert f"error: prepare: {len(bad)} bad files in {ROOT_DIR}: {bad[0]}: " in failed.stderr
    assert {out: sha256_file(path / out) for out in OUTPUTS} == before and (path / "dvc.lock").read_text() == lock
    set_param(path, "on_bad_sample: error", "on_bad_sample: skip")

    # One image changed: prepare and everything after it run again; then nothing is stale.
    image = root / "3/0301.png"
    Image.open(image).rotate(10).save(image)
    again = dvc("repro", cwd=path).stdout
    for stage in ("prepare", "build", "train", "evaluate", "export"):
        assert f"Running stage '{stage}'" in again
    assert "Data and pipelines are up to date." in dvc("repro", cwd=path).stdout


@pytest.mark.slow
def test_decoding_in_parallel_processes_gives_the_same_arrays(project):
    image_folder(project / ROOT_DIR, per_class=60, classes=10)  # 600 images: enough to start processes
    hashes = []
    for workers in (1, 2):
        result = prepare.run(params(f"prepare.workers={workers}"))
        assert sum(result["sizes"].values()) == 600
        hashes.append(read_json(paths.MANIFEST, "prepare")["sha256"])
    assert hashes[0] == hashes[1]
