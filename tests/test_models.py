"""The torchvision architectures: fitted to the data's channels, size and classes, started from a local
weights file, frozen, and exportable; all on CPU, with "pretrained" files made here (nothing is downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tasks import build, inputs, paths, prepare
from tasks.core.models import TORCHVISION, MeanPool, Normalize, build_model
from tasks.errors import InputError
from tasks.files import read_json, sha256_file
from tasks.params import load

KINDS = ["resnet18", "mobilenet_v3_small"]
N_CLASSES = 5


def norm(c: int) -> dict:
    return {"scale": 1 / 16, "mean": [0.3] * c, "std": [0.4] * c}


def make(kind: str, c: int = 1, size: int = 8, **kwargs) -> nn.Sequential:
    return build_model(kind, [c, size, size], N_CLASSES, norm(c), channels=[8], hidden=[8], dropout=0.1, **kwargs)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture, a "pretrained" file: the state dict of torchvision's own model (RGB, 1000 classes), seeded."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(1234 + i)
        state = getattr(torchvision.models, kind)(weights=None).state_dict()
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var", ".bias")):  # not the constants of a fresh model
                value.copy_(torch.rand_like(value) + 0.5)
        files[kind] = folder / f"{kind}.pth"
        torch.save(state, files[kind])
    return files


def file_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    """`torch.jit.script` as the export stage does it: TorchScript caches compiled code per process, and code
    compiled outside this block would put absolute paths into a later in-process export, which then fails."""
    from tasks.export import _path_prefixes, reproducible_scripting

    with reproducible_scripting(_path_prefixes()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        return torch.jit.script(model)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_any_channels_and_image_size_give_one_logit_per_class(kind, c, size):
    torch.manual_seed(0)
    net = make(kind, c, size)
    assert isinstance(net[0], Normalize) and net[0].mean.shape == (1, c, 1, 1)
    # No adaptive pooling left (no deterministic CUDA backward), the mean pool in its place.
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.modules())
    assert any(isinstance(m, MeanPool) for m in net.modules())
    x = torch.rand(4, c, size, size) * 16
    out = net.train()(x)
    assert out.shape == (4, N_CLASSES)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.eval()(x[:1]).shape == (1, N_CLASSES)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_a_weights_file_gives_the_backbone_and_a_new_classifier(kind, c, weight_files):
    first, head = TORCHVISION[kind]
    saved = file_state(weight_files[kind])
    torch.manual_seed(0)
    net = make(kind, c, weights=weight_files[kind])
    own = net[1].state_dict()
    backbone = [k for k in own if not k.startswith((f"{first}.", f"{head}."))]
    assert len(backbone) > 100
    for key in backbone:
        assert torch.equal(own[key], saved[key]), key
    # The classifier is new, sized for the data's classes, and seeded.
    assert own[f"{head}.weight"].shape == (N_CLASSES, saved[f"{head}.weight"].shape[1])
    torch.manual_seed(0)
    assert torch.equal(
        make(kind, c, weights=weight_files[kind])[1].state_dict()[f"{head}.weight"], own[f"{head}.weight"]
    )
    # The first convolution: the file's RGB weights as they are, or for grey images their sum over R, G and B.
    rgb = saved[f"{first}.weight"]
    expected = rgb if c == 3 else rgb.sum(dim=1, keepdim=True)
    assert own[f"{first}.weight"].shape[1] == c
    assert torch.equal(own[f"{first}.weight"], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_backbone_leaves_only_the_classifier_trainable(kind, weight_files):
    head = TORCHVISION[kind][1]
    net = make(kind, weights=weight_files[kind], freeze_backbone=True)
    trainable = [name for name, p in net.named_parameters() if p.requires_grad]
    assert trainable == [f"1.{head}.weight", f"1.{head}.bias"]
    net(torch.rand(4, 1, 8, 8) * 16).sum().backward()
    assert [name for name, p in net.named_parameters() if p.grad is not None] == trainable
    # requires_grad is not in a state dict: a model built to load one (no weights file) is frozen all the same.
    again = make(kind, freeze_backbone=True)
    again.load_state_dict(net.state_dict())
    assert [name for name, p in again.named_parameters() if p.requires_grad] == trainable


def test_a_wrong_weights_file_is_an_input_error_that_says_what_to_give(tmp_path, weight_files):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(
        InputError, match=r"junk.pth is not a readable PyTorch state dict .*torchvision.models.resnet18"
    ):
        make("resnet18", weights=junk)
    with pytest.raises(InputError, match=r"nothing.pth does not exist"):
        make("resnet18", weights=tmp_path / "nothing.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(InputError, match=r"tensor.pth holds a Tensor, not a state dict"):
        make("resnet18", weights=tmp_path / "tensor.pth")
    # Another architecture's state dict: named, with the first missing and the first unknown entry.
    with pytest.raises(InputError) as caught:
        make("mobilenet_v3_small", weights=weight_files["resnet18"])
    message = str(caught.value)
    assert "resnet18.pth is not a state dict of torchvision's mobilenet_v3_small" in message
    assert "missing (first: features.0.0.weight)" in message and "unknown (first: conv1.weight)" in message
    assert "mobilenet_v3_small-047dcff4.pth" in message and "\n" not in message
    # The right names with a wrong shape (e.g. a wider variant).
    state = file_state(weight_files["resnet18"])
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save(state, tmp_path / "wide.pth")
    with pytest.raises(InputError, match=r"1 tensors of other shapes \(first: layer1.0.conv1.weight \(32, 64, 3, 3\)"):
        make("resnet18", weights=tmp_path / "wide.pth")


@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_and_torch_export_reproduce_the_eager_model(kind):
    """On 8x8 digits, where both shrink to 1x1 positions; 5 images through a program exported with 2 (dynamic batch)."""
    torch.manual_seed(0)
    net = make(kind).eval()
    x = torch.rand(5, 1, 8, 8) * 16
    program = torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))  # as export does
    with torch.no_grad():
        expected = net(x)
        assert torch.allclose(scripted(net)(x), expected, rtol=0, atol=1e-5)
        assert torch.allclose(program.module()(x), expected, rtol=0, atol=1e-5)


def test_the_build_step_starts_from_the_weights_file_and_records_its_hash(project, weight_files):
    prepare.run(load())
    file = weight_files["resnet18"]
    params = load(overrides=["build.model=resnet18", f"build.weights={file}", "build.freeze_backbone=true"])
    result = build.run(params)
    summary = read_json(paths.SUMMARY, "build")
    assert summary["weights"] == {"path": str(file), "sha256": sha256_file(file)}
    assert summary["trainable_parameters"] == result["trainable_parameters"] == 512 * 10 + 10
    assert summary["parameters"] > 11_000_000
    # What the later stages load: the same weights, frozen the same way.
    net = inputs.model(params, paths.INIT, made_by="build")
    assert torch.equal(net[1].layer4[1].conv2.weight, file_state(file)["layer4.1.conv2.weight"])
    assert [name for name, p in net.named_parameters() if p.requires_grad] == ["1.fc.weight", "1.fc.bias"]

    missing = load(overrides=["build.model=resnet18", "build.weights=models/imagenet.pth"])
    with pytest.raises(InputError, match=r"^build.weights: models/imagenet.pth does not exist.*nothing is downloaded"):
        build.run(missing)
    assert read_json(paths.SUMMARY, "build") == summary  # outputs left as they were


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_torchvision_model_trains_evaluates_and_exports_through_the_pipeline(project, weight_files, kind):
    """Every stage on the digits: 2 epochs from a weights file, frozen; the export stage checks its files itself."""
    from tasks import evaluate, export, train

    overrides = [f"build.model={kind}", f"build.weights={weight_files[kind]}", "train.epochs=2", "train.lr=0.01"]
    params = load(overrides=overrides)
    for step in (prepare, build, train, evaluate, export):
        step.run(params)  # export raises ExportError if a file differs from the eager model
    info = read_json(paths.EXPORT_INFO, "export")
    assert info["input"]["shape"] == ["batch", 1, 8, 8] and len(info["classes"]) == 10
    model = torch.jit.load(paths.TORCHSCRIPT)
    import numpy as np

    x = torch.from_numpy(np.load(paths.images("test"))).float()
    y = torch.from_numpy(np.load(paths.labels("test")))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    # Two epochs on 8x8 images teach these big models little (mobilenet may still be at chance): what
    # counts here is that the exported files are the model that was evaluated, within export.atol.
    assert max(info["check"]["max_abs_diff"].values()) <= params.export.atol
    assert read_json(paths.TEST_METRICS, "evaluate")["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
