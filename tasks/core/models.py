"""The architectures, the loss and the optimizer: plain `nn.Module`s and `torch.optim`.

Every model starts with a `Normalize` layer holding the train split's statistics, so saved and
exported models take raw pixels as float32 and nobody has to re-implement the preprocessing. The
CNN adapts to the data: the manifest's channels and image size (8x8 grey up to photos of a few
hundred pixels), with an average pooling that caps what reaches the classifier at 4x4 positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tasks.errors import InputError

CLASSIFIER_GRID = 4  # at most 4x4 positions per channel reach the last layer


class Normalize(nn.Module):
    """(x * scale - mean) / std per channel: raw pixels in, standardised values out."""

    def __init__(self, scale: float, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.mean) / self.std


def mlp(in_shape: list[int], n_classes: int, hidden: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


def cnn(in_shape: list[int], n_classes: int, channels: list[int], dropout: float) -> nn.Sequential:
    """3x3 conv + ReLU blocks, each halving the image while it is at least 2 pixels wide.

    Larger images end with an average pool down to at most 4x4, so the classifier's size does not
    grow with the image; images that are already that small (the 8x8 digits) get no extra layer.
    A plain `AvgPool2d` with the kernel worked out here, not `AdaptiveAvgPool2d`: the adaptive
    one's backward pass has no deterministic CUDA kernel, and training must be reproducible.
    """
    layers: list[nn.Module] = []
    c, h, w = in_shape
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    if h > CLASSIFIER_GRID or w > CLASSIFIER_GRID:
        kernel = (math.ceil(h / CLASSIFIER_GRID), math.ceil(w / CLASSIFIER_GRID))
        layers.append(nn.AvgPool2d(kernel))  # stride = kernel; a remainder of rows or columns is dropped
        h, w = h // kernel[0], w // kernel[1]
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, n_classes))


def build_model(
    kind: str,
    in_shape: list[int],
    n_classes: int,
    normalisation: dict,
    channels: list[int],
    hidden: list[int],
    dropout: float,
    weights: str | Path | None = None,
    freeze_backbone: bool = False,
) -> nn.Sequential:
    """The architecture; weights come from `torch.manual_seed` or a state dict.

    For the torchvision models (`TORCHVISION`), `weights` is a local state-dict file to start the
    backbone from and `freeze_backbone` leaves only the new classifier trainable (see
    `torchvision_model`); `channels` and `hidden` are for the cnn and mlp alone.
    """
    if kind in TORCHVISION:
        net = torchvision_model(kind, in_shape[0], n_classes, dropout, weights, freeze_backbone)
    elif weights is not None or freeze_backbone:
        raise ValueError(f"weights and freeze_backbone are for the torchvision models, not {kind!r}")
    elif kind == "mlp":
        net = mlp(in_shape, n_classes, hidden, dropout)
    else:
        net = cnn(in_shape, n_classes, channels, dropout)
    norm = normalisation
    return nn.Sequential(Normalize(norm["scale"], norm["mean"], norm["std"]), net)


def build_loss(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float, decay_norms_and_biases: bool = True
) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters (a frozen backbone's are left out).

    `decay_norms_and_biases=False` puts biases and normalisation weights (every parameter with
    fewer than 2 dimensions) in a group without weight decay, the usual recipe for deep nets.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list = trainable
    if not decay_norms_and_biases:
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2]},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


# The torchvision architectures -------------------------------------------------------------------

# Each one's first convolution (adapted to the data's channels) and its last Linear (the classifier,
# new for the data's classes: never loaded from a file, the only layer trained with a frozen backbone).
TORCHVISION = {
    "resnet18": ("conv1", "fc"),
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
}


class MeanPool(nn.Module):
    """Global average pooling, `x.mean((-2, -1), keepdim=True)`: what `AdaptiveAvgPool2d(1)` computes.

    Put in place of every `AdaptiveAvgPool2d(1)` of the torchvision models (resnet's and mobilenet's
    `avgpool`, and the `avgpool` of each of mobilenet's SqueezeExcitation blocks): the adaptive
    pool's backward pass has no deterministic CUDA kernel, so training under
    `torch.use_deterministic_algorithms(True)` would fail on the first CUDA backward; a mean's
    backward is a plain division, deterministic everywhere. Same outputs, and the same (empty)
    state dict, so torchvision's weight files load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


def replace_adaptive_pools(net: nn.Module) -> int:
    """Swap every `AdaptiveAvgPool2d` with output size 1 in `net` for a `MeanPool`; return how many."""
    count = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size = child.output_size
                if all(s == 1 for s in (size if isinstance(size, tuple) else (size,))):
                    setattr(module, name, MeanPool())
                    count += 1
    return count


def torchvision_model(
    kind: str,
    in_channels: int,
    n_classes: int,
    dropout: float = 0.2,
    weights: str | Path | None = None,
    freeze_backbone: bool = False,
) -> nn.Module:
    """torchvision's `resnet18` or `mobilenet_v3_small`, adapted to the data; nothing is downloaded.

    - The first convolution takes `in_channels`; the last Linear gives `n_classes` logits.
      mobilenet's classifier dropout is `dropout` (resnet18 has none).
    - Every `AdaptiveAvgPool2d(1)` becomes a `MeanPool` (deterministic on CUDA, see there).
    - Any image size works: 8x8 digits shrink to 1x1 positions on the way (resnet18 by its second
      stage), and the mean pool takes that as it is.
    - `weights`: a local file with the state dict of the whole torchvision model (e.g. the ImageNet
      file torchvision would download). All of it is loaded but the classifier (another class
      count), which keeps its seeded random weights. For 1-channel data, 3-channel (RGB) weights of
      the first convolution are summed over their input channels, the usual practice: a grey image
      then gives what the RGB model gives for the same grey in each channel.
    - `freeze_backbone`: every parameter but the classifier's gets `requires_grad=False`. That
      flag is not in a state dict, so it is applied here, every time the model is built, whether
      its weights then come from `weights` or from a saved state dict. (BatchNorm running
      statistics still follow the data in train mode: they are buffers, not parameters.)
    """
    import torchvision

    first_name, head_name = TORCHVISION[kind]
    if kind == "resnet18":
        net = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    elif kind == "mobilenet_v3_small":
        net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=n_classes, dropout=dropout)
    else:
        raise ValueError(f"not a torchvision model here: {kind!r} (one of {', '.join(TORCHVISION)})")
    first = net.get_submodule(first_name)
    if first.in_channels != in_channels:
        conv = nn.Conv2d(
            in_channels,
            first.out_channels,
            first.kernel_size,
            stride=first.stride,
            padding=first.padding,
            bias=first.bias is not None,
        )
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as both models do
        net.set_submodule(first_name, conv)
    replace_adaptive_pools(net)
    if weights is not None:
        load_backbone(net, kind, Path(weights))
    if freeze_backbone:
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(f"{head_name}."))
    return net


def load_backbone(net: nn.Module, kind: str, path: Path) -> None:
    """Load a torchvision state-dict file into `net` (made by `torchvision_model`), all but the classifier."""
    import torchvision

    first_name, head_name = TORCHVISION[kind]
    url = torchvision.models.get_model_weights(kind).DEFAULT.url
    todo = (
        f"give a state dict of torchvision.models.{kind} (e.g. torchvision's ImageNet weights, {url}, "
        "downloaded by hand; nothing is downloaded here)"
    )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; {todo}") from None
    except Exception as exc:  # whatever torch.load makes of a damaged or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise InputError(f"{path} is not a readable PyTorch state dict ({reason}); {todo}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; {todo}")

    own = net.state_dict()
    head = {k for k in own if k.startswith(f"{head_name}.")}
    # Files saved before PyTorch 0.4.1 lack BatchNorm's step counters; the model's own (0) are kept.
    missing = [k for k in own if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        parts = [f"{len(missing)} of the model's entries missing (first: {missing[0]})"] if missing else []
        parts += [f"{len(unknown)} unknown (first: {unknown[0]})"] if unknown else []
        raise InputError(f"{path} is not a state dict of torchvision's {kind}: {', '.join(parts)}; {todo}")

    state = {k: v for k, v in state.items() if k not in head}
    conv = f"{first_name}.weight"
    w, want = state[conv], own[conv]
    if w.shape != want.shape and want.shape[1] == 1 and w.ndim == 4 and w.shape[0] == want.shape[0]:
        state[conv] = w.sum(dim=1, keepdim=True)  # RGB weights for grey images: one channel, the sum
    wrong = [
        f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise InputError(
            f"{path} does not fit torchvision's {kind} for this data: {len(wrong)} tensors of other shapes "
            f"(first: {wrong[0]}); {todo}"
        )
    net.load_state_dict({**own, **state})
