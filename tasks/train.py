"""train: the classic loop, validated every epoch, checkpointed, resumable, keeping the best epoch's weights.

    python -m tasks train                                        # or: dvc repro train
    torchrun --standalone --nproc_per_node 2 -m tasks train      # data-parallel (DDP) on this machine

Per epoch: `model.train()`, shuffled batches through `zero_grad` / forward / loss / `backward` /
`step` (`tasks/core/loops.py` `train_one_epoch`, with the recipe's gradient accumulation, mixed
precision, clipping and learning-rate schedule), then validation under `model.eval()` and
`torch.no_grad()`. Batches come from the memory-mapped arrays of `prepare` through a `DataLoader`,
with `train.augment` applied per sample on the train split only. The weights of the epoch with
the best `train.select_metric` are kept in `models/train/best.pt`; early stopping ends the run
after `train.early_stopping.patience` epochs without improvement.

Checkpoints: after every epoch (and every `train.checkpoint.every_steps` optimizer steps) the
whole state goes to `models/train/checkpoints/` (`tasks/core/checkpoint.py`). Run train again,
after a kill, Ctrl-C, out of memory or a Prefect retry, and it goes on from the newest whole
checkpoint whose inputs (params that change weights, data, initial weights, device, processes)
are this run's, in the same MLflow run, and ends with the weights an uninterrupted run would have
made, byte for byte. Other inputs start a fresh training and say which input changed.

A quality gate stops a run that is going nowhere, with one line naming the epoch, the value and
the param most likely at fault, before it can replace a good model: a train loss above
`train.divergence_factor` times the untrained model's loss (or not finite), or, from epoch
`train.chance_epochs` on, a selection metric no better than chance. Outputs are written only
after training and its MLflow logging succeeded, so a stopped, failed or killed run leaves the
previous ones as they were; Ctrl-C marks the MLflow run KILLED.

Same seed, same params, same machine: byte-identical weights. The seed fixes the initial weights
(from `build`), the data order and augmentation (functions of seed, epoch and sample), and dropout;
`train.deterministic` rules out nondeterministic kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tasks import BY_HAND, StepContext, inputs, naming, paths, tracking
from tasks.core import checkpoint, distributed
from tasks.core.data import EpochSampler, augmentation, loader
from tasks.core.loops import EpochState, Recipe, build_schedule, train_one_epoch, validate
from tasks.core.models import build_loss, build_optimizer
from tasks.errors import PipelineError, TrackingError, TrainingError
from tasks.files import json_text, require, save_torch, sha256_file, staged
from tasks.params import Params

CURVE_KEYS = ("train/loss", "val/loss", "val/accuracy")
DATA_ARTIFACTS = (paths.MANIFEST, paths.DATA_REPORT, paths.DATA_COUNTS, paths.DATA_SIZES, paths.DATA_SAMPLES)
RESUME_TAG = "train.resume_key"  # the sha256 of what a checkpoint must match to be resumed
FREE_PARAMS = ("train.checkpoint.", "train.num_workers")  # they change no weight: a resume may change them


def pick_device(choice: str, me: distributed.World | None = None) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and me is not None and me.size > 1:
        return torch.device("cuda", me.local_rank)  # one GPU per process
    return torch.device(choice)


def better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric.endswith("accuracy") else value < best


def chance_level(metric: str, val_y: torch.Tensor, n_classes: int) -> float:
    """What a model that learned nothing scores: always the most common class, or uniform probabilities."""
    if metric.endswith("accuracy"):
        return torch.bincount(val_y, minlength=n_classes).max().item() / val_y.numel()
    return math.log(n_classes)  # cross-entropy of uniform predictions, with or without label smoothing


def at_chance(metric: str, value: float, chance: float) -> bool:
    return value <= chance + 1e-9 if metric.endswith("accuracy") else value >= chance - 1e-9


def suspect(params: Params, first_loss: float, last_loss: float, n_classes: int) -> str:
    """The param most likely at fault when training goes nowhere, with what to do about it."""
    cfg = params.train
    if not math.isfinite(first_loss):
        return (
            f"the untrained model's loss is already {first_loss}, before any step: look for non-finite values "
            "in the data (stage 'prepare') or the initial weights (stage 'build')"
        )
    shrink = cfg.lr * cfg.weight_decay
    if shrink >= 0.1:
        return (
            f"most likely train.weight_decay (now {cfg.weight_decay:g}): with train.lr {cfg.lr:g} it pulls the "
            f"weights {shrink:.3g} of the way to zero every step; lower it"
        )
    lower_lr = f"most likely train.lr (now {cfg.lr:g}): lower it, e.g. --set train.lr={cfg.lr / 10:g}"
    guessing = math.log(n_classes)  # the loss of a model that learned nothing
    if not math.isfinite(last_loss) or last_loss > 1.5 * max(first_loss, guessing):
        return lower_lr
    if last_loss >= 0.8 * guessing:  # the loss stayed where guessing puts it: nothing was learned
        if cfg.label_smoothing >= 0.8:
            return f"most likely train.label_smoothing (now {cfg.label_smoothing:g}): lower it"
        if params.build.dropout >= 0.8:
            return f"most likely build.dropout (now {params.build.dropout:g}): lower it"
        if cfg.lr < 1e-4:
            return f"most likely train.lr (now {cfg.lr:g}), too small: raise it, e.g. --set train.lr={cfg.lr * 10:g}"
        return lower_lr
    return "the model fits the train split but not val: check the data and its labels (stage 'prepare')"


def train_code() -> list[Path]:
    """The code files dvc.yaml lists as train's dependencies: those it imports (tests/test_stages.py checks).

    Exactly what DVC judges train's staleness by: a change to any other module (a later step, a
    command) leaves both the checkpoints and their names, which dvc.lock records, as they were.
    """
    from tasks.params import _yaml

    root = Path(__file__).resolve().parents[1]
    deps = (_yaml().load((root / "dvc.yaml").read_text()) or {})["stages"]["train"]["deps"]
    return sorted(root / dep for dep in deps if str(dep).endswith(".py"))


def resume_key(params: Params, data_sha256: str, init_sha256: str, device: str, processes: int) -> tuple[str, dict]:
    """What a checkpoint must match to be resumed: the params that change weights, the data, the start, the code.

    `train.checkpoint` and `train.num_workers` do not change a single weight, so they may differ.
    """
    values = {k: v for k, v in params.flat().items() if k.split(".")[0] in ("seed", "build", "train", "evaluate")}
    for free in [k for k in values if k.startswith(FREE_PARAMS)]:
        del values[free]
    code = hashlib.sha256()
    for file in train_code():
        code.update(file.read_bytes())
    values.update({"data.sha256": data_sha256, "init.sha256": init_sha256, "device": device, "processes": processes})
    values["code.sha256"] = code.hexdigest()  # a change to train's code: new code, new training
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), values


def why_fresh(old: dict, new: dict) -> str:
    """The differences between a checkpoint's inputs and this run's, for one line."""
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    names = {
        "data.sha256": "the prepared data",
        "init.sha256": "the initial weights (models/build/init.pt)",
        "code.sha256": "the code of train (its modules in dvc.yaml)",
    }
    out = [names.get(c.split(" ")[0], c) for c in changed]
    return ", ".join(out[:4]) + (f" and {len(out) - 4} more" if len(out) > 4 else "")


def make_schedule(cfg, optimizer, steps_per_epoch: int):
    s = cfg.schedule
    return build_schedule(
        optimizer,
        s.name,
        cfg.lr,
        cfg.epochs,
        steps_per_epoch,
        s.warmup_epochs,
        s.step_epochs,
        s.gamma,
        s.patience,
        s.min_lr,
        maximize=cfg.select_metric.endswith("accuracy"),
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("train.precision fp16 needs CUDA (a gradient scaler on GPU); on CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Progress:
    """A bar per epoch on a terminal (samples/s, loss, time left); nothing when stderr is not one.

    The per-epoch line is printed either way, so CI, Prefect's logs and `dvc repro` show one line
    per epoch. The loss shown is read at most twice a second: reading it waits for the device.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def wrap(self, batches, total: int, description: str, state: EpochState):
        if not self.enabled:
            yield from batches
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=description, unit="img", unit_scale=True, leave=False, file=sys.stderr) as bar:
            shown = time.monotonic()
            for x, y in batches:
                yield x, y
                bar.update(y.shape[0])
                if time.monotonic() - shown > 0.5 and state.seen:
                    bar.set_postfix_str(f"train/loss {state.loss_sum.item() / state.seen:.4f}", refresh=False)
                    shown = time.monotonic()


def fit(params: Params, device: torch.device, run: Run, resume: dict | None, key: str, inputs_used: dict) -> dict:
    """The epochs on `device`, in the process group `run` has started; from `resume` when given."""
    cfg = params.train
    me = distributed.world()
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.manual_seed(params.seed)
    host: dict = {}  # Python's and numpy's generators as this epoch started (see checkpoint.seed_host)

    manifest = inputs.manifest()
    n_classes = len(manifest["classes"])
    aug = cfg.augment
    augment = augmentation(manifest["input_shape"][-1], aug.crop_scale, aug.hflip, aug.rotation, aug.color_jitter)
    train_set = inputs.dataset("train", transform=augment, seed=params.seed)
    val_set = inputs.dataset("val")
    chance = chance_level(cfg.select_metric, torch.from_numpy(np.array(val_set.labels)), n_classes)
    cuda = device.type == "cuda"
    sampler = EpochSampler(len(train_set), params.seed, shuffle=True, rank=me.rank, replicas=me.size)
    # A last batch of one image is left out: batch normalisation cannot train on a single value per channel.
    lone = sampler.per_replica % cfg.batch_size == 1 and sampler.per_replica > 1
    train_batches = loader(train_set, cfg.batch_size, sampler, cfg.num_workers, pin_memory=cuda, drop_last=lone)
    val_batches = loader(val_set, params.evaluate.batch_size, pin_memory=cuda)
    n_batches = sampler.per_replica // cfg.batch_size if lone else math.ceil(sampler.per_replica / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.accumulate)

    model = inputs.model(params, paths.INIT, made_by="build").to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.label_smoothing)
    optimizer = build_optimizer(
        model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, decay_norms_and_biases=cfg.decay_norms_and_biases
    )
    scheduler, plateau = make_schedule(cfg, optimizer, steps_per_epoch)
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    recipe = Recipe(cfg.accumulate, cfg.clip_grad_norm, dtype, scaler, cfg.channels_last, scheduler)

    net: torch.nn.Module = model
    if me.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        net = torch.compile(net)

    # What the loop carries from epoch to epoch; a checkpoint holds all of it.
    done: dict = dict(epoch=0, history=[], best_value=None, best_epoch=0, best_state={}, first_loss=None)
    done.update(stop_best=None, stale=0, stopped_early=False)  # early stopping's best, and epochs since
    epoch_state = EpochState()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for part, obj in (("scheduler", scheduler), ("plateau", plateau), ("scaler", scaler)):
            if obj is not None:
                obj.load_state_dict(resume[part])
        done.update(resume["loop"])
        epoch_state = EpochState(
            resume["batches"], resume["steps"], resume["loss_sum"], resume["seen"], resume["first"]
        )
        checkpoint.set_rng_state(resume["rng"][me.rank])  # one per process: the key holds their number

    old_checkpoints = resume is None  # those of other inputs: kept until this run writes its first

    def save(finished: bool = False) -> None:
        """Every process's RNG state is gathered; rank 0 alone writes."""
        nonlocal old_checkpoints
        rng = distributed.gather(checkpoint.rng_state(host))
        if not me.main:
            return
        if old_checkpoints:  # not before: a run that fails before its first checkpoint leaves the outputs as they were
            checkpoint.clear(paths.CHECKPOINTS)
            old_checkpoints = False
        state = {
            "format": checkpoint.FORMAT, "key": key, "inputs": inputs_used, "done": finished,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "plateau": plateau.state_dict() if plateau else None,
            "scaler": scaler.state_dict() if scaler else None,
            "loop": done, "rng": rng, "batches": epoch_state.batches, "steps": epoch_state.steps,
            "loss_sum": epoch_state.loss_sum.detach().cpu(), "seen": epoch_state.seen, "first": epoch_state.first_loss,
        }  # fmt: skip
        writer.save(paths.CHECKPOINTS, state, epoch_state.steps, done["epoch"], cfg.checkpoint.keep, last=finished)

    def every_n_steps(state: EpochState) -> None:
        if cfg.checkpoint.every_steps and state.steps % cfg.checkpoint.every_steps == 0:
            save()

    writer = checkpoint.Writer(background=cuda)  # on a CPU torch's threads have every core: see Writer
    try:
        progress = Progress(me.main)
        metric = cfg.select_metric
        started, first_epoch = time.monotonic(), done["epoch"] + 1
        cpu_started = time.process_time()  # every thread's: the checkpoint writer's and MLflow's included
        for epoch in range(first_epoch, cfg.epochs + 1):
            if done["stopped_early"]:
                break
            tick = time.monotonic()
            host.update(checkpoint.seed_host(params.seed, epoch, me.rank))
            sampler.set_epoch(epoch, skip=epoch_state.batches * cfg.batch_size)
            batches = progress.wrap(train_batches, len(sampler), f"epoch {epoch}/{cfg.epochs}", epoch_state)
            train_one_epoch(net, batches, loss_fn, optimizer, device, n_batches, recipe, epoch_state, every_n_steps)
            seen = torch.tensor(epoch_state.seen, dtype=torch.float64, device=epoch_state.loss_sum.device)
            totals = distributed.all_sum(torch.stack([epoch_state.loss_sum, seen]))  # over every process's share
            train_loss = (totals[0] / totals[1]).item()
            if done["first_loss"] is None:  # the untrained model's loss: what divergence is measured against
                done["first_loss"] = epoch_state.first_loss
            val = validate(net, val_batches, loss_fn, device, recipe)
            lr = optimizer.param_groups[0]["lr"]
            row = {"train/loss": train_loss, "val/loss": val["loss"], "val/accuracy": val["accuracy"], "train/lr": lr}
            done["history"].append({"epoch": epoch, **row})
            value = row[metric]
            marker = ""
            if better(metric, value, done["best_value"]):
                done["best_value"], done["best_epoch"], marker = value, epoch, "  *"
                done["best_state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if improved(metric, value, done["stop_best"], cfg.early_stopping.min_delta):
                done["stop_best"], done["stale"] = value, 0
            else:
                done["stale"] += 1
            if plateau is not None and epoch > cfg.schedule.warmup_epochs:
                plateau.step(value)
            gate(params, epoch, done["first_loss"], train_loss, done["best_value"], chance, n_classes)
            patience = cfg.early_stopping.patience
            done["stopped_early"] = bool(patience) and done["stale"] >= patience and epoch < cfg.epochs
            done["epoch"] = epoch
            epoch_state = EpochState(steps=epoch_state.steps)
            save(finished=done["stopped_early"] or epoch == cfg.epochs)
            if me.main:
                run.log_epoch(row, epoch)
                took = time.monotonic() - tick
                left = (time.monotonic() - started) / (epoch - first_epoch + 1) * (cfg.epochs - epoch)
                print(
                    f"epoch {epoch:3d}/{cfg.epochs}  train/loss {train_loss:.4f}  val/loss {val['loss']:.4f}  "
                    f"val/accuracy {val['accuracy']:.4f}{marker or '   '}  lr {lr:.3g}  {took:.1f}s"
                    + (f"  eta {left:.0f}s" if epoch < cfg.epochs else "")
                )
            if done["stopped_early"]:
                print(
                    f"train: early stop after epoch {epoch}: {metric} has not improved by more than "
                    f"{cfg.early_stopping.min_delta:g} for {patience} epochs (train.early_stopping.patience)"
                )
        writer.wait()  # the last checkpoint is on disk before the outputs are written
    finally:
        with contextlib.suppress(Exception):
            writer.wait()  # after a failure or Ctrl-C too: the checkpoint being written lands
    loop = {"loop_seconds": time.monotonic() - started, "loop_cpu_seconds": time.process_time() - cpu_started}
    return {**done, "device": str(device), **loop}


def improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    """Better than `best` by more than `min_delta`: what resets early stopping's patience."""
    if best is None:
        return True
    return value > best + min_delta if metric.endswith("accuracy") else value < best - min_delta


def gate(params: Params, epoch: int, first_loss: float, train_loss: float, best: float, chance: float, n_classes: int):
    """Stop a run that diverges or stays at chance, naming the epoch, the value and the likely culprit.

    Chance is judged on the best epoch so far: one poor epoch after good ones is not a stuck run.
    """
    cfg = params.train
    if not math.isfinite(train_loss):
        problem = f"training diverged at epoch {epoch}: train/loss is {train_loss}"
    elif train_loss > cfg.divergence_factor * first_loss:
        problem = (
            f"training diverged at epoch {epoch}: train/loss {train_loss:.4g} is {train_loss / first_loss:.3g}x "
            f"the untrained model's {first_loss:.4g} (limit: train.divergence_factor {cfg.divergence_factor:g})"
        )
    elif cfg.chance_epochs and epoch >= cfg.chance_epochs and at_chance(cfg.select_metric, best, chance):
        accuracy = cfg.select_metric.endswith("accuracy")
        baseline = "always predicting the most common class" if accuracy else "uniform guessing"
        problem = (
            f"training is stuck at chance after epoch {epoch}: the best {cfg.select_metric} so far, {best:.4f}, is "
            f"no better than {baseline} ({chance:.4f}; checked from epoch train.chance_epochs = {cfg.chance_epochs})"
        )
    else:
        return
    raise TrainingError(f"{problem}; {suspect(params, first_loss, train_loss, n_classes)}")


class Run:
    """This training's MLflow run (rank 0 only; None elsewhere). Epoch metrics are sent without waiting.

    Epochs shorter than `EVERY` seconds are sent together, at most once per `EVERY` seconds: one
    call to the store costs about 2 ms of CPU, a few per cent of a 100 ms epoch. Each row keeps its
    own step and time, so the curves are the same; a kill loses at most the rows not yet sent,
    which the resume logs again from the checkpoint's history.
    """

    EVERY = 1.0

    def __init__(self, run_id: str | None, logged: set[int] | None = None) -> None:
        self.id = run_id
        self.logged = logged or set()  # epochs the run has already: a resume from an older checkpoint redoes them
        self.pending: list = []
        self.rows: list[tuple[int, int, dict[str, float]]] = []  # not sent yet
        self.handed: dict[int, tuple[int, dict[str, float]]] = {}  # every row sent, in case the store lost some
        self.sent = -math.inf

    def log_epoch(self, row: dict[str, float], epoch: int) -> None:
        if self.id is None or epoch in self.logged:
            return
        self.rows.append((epoch, int(time.time() * 1000), row))
        if time.monotonic() - self.sent >= self.EVERY:
            self.send()

    def send(self) -> None:
        rows, self.rows = self.rows, []
        if rows:
            self.pending += tracking.log_steps(self.id, rows, synchronous=False)
            self.handed.update({epoch: (ms, row) for epoch, ms, row in rows})
            self.sent = time.monotonic()

    def flush(self) -> None:
        """Store every metric logged so far; a failure to store one is a TrackingError here.

        A tracking server away during training does not stop it: MLflow's queue retries each call for
        about 4 minutes. Longer, and those calls fail; their rows are still here, and the epochs the
        run lacks are sent again now (with MLflow's retries once more).
        """
        self.send()
        pending, self.pending = self.pending, []
        try:
            tracking.wait(pending)
        except TrackingError as exc:
            logged = tracking.logged_steps(self.id, "train/loss")
            missing = sorted(epoch for epoch in self.handed if epoch not in logged)
            if missing:
                print(f"train: {len(missing)} epochs' metrics did not reach the store ({exc}); sending them again")
            tracking.log_steps(self.id, [(epoch, *self.handed[epoch]) for epoch in missing])


def latest_checkpoint(key: str, used: dict) -> tuple[dict, Path] | None:
    """The newest whole checkpoint of these very inputs, or None, saying why when one was not used."""
    found = checkpoint.load_latest(paths.CHECKPOINTS, warn=lambda message: print(f"train: warning: {message}"))
    if found is None:
        return None
    state, path = found
    if state["key"] != key:
        changed = why_fresh(state["inputs"], used)
        print(f"train: starting at epoch 1, not from {path.name}: it was made with other inputs ({changed})")
        return None
    return state, path


def run_tags(params: Params, ctx: StepContext) -> dict[str, str]:
    """What a person sees of the run: its name and description, where it was started from, the commit.

    The flow passes the name it gave its own flow run (`mlflow.runName`) and that run's address;
    otherwise the name is made here, the same way.
    """
    committed, changed, differs = naming.compare_with_head(params, ctx.params_path)
    experiment = naming.experiment_name()
    links = {}
    if url := ctx.tags.get("prefect.flow_run_url"):
        links["Prefect flow run"] = url
    if experiment:
        links["DVC experiment"] = f"{experiment} (`dvc exp show`)"
    if ctx.tags.get("orchestrator") == "prefect":
        entry = "flows/pipeline.py"
    elif os.environ.get("DVC_STAGE"):
        entry = "dvc.yaml"
    else:
        entry = "tasks"  # python -m tasks train
    return {
        "mlflow.runName": naming.run_name(params, changed, experiment),
        "mlflow.note.content": naming.describe(params, changed, links, compared=committed is not None),
        "mlflow.source.name": str(Path.cwd().resolve() / entry),
        "mlflow.source.type": "LOCAL",
        **({"dvc.experiment": experiment} if experiment else {}),
        **tracking.git_tags(ctx.params_path, differs),
        **ctx.tags,
    }


def lineage_tags(params: Params, device: torch.device, processes: int) -> dict[str, str]:
    """What made the run besides its commit and data: the effective params' hash, the software, the hardware."""
    import platform

    effective = json.dumps(params.model_dump(), sort_keys=True)  # the validated values, defaults and overrides included
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "lineage.params_sha256": hashlib.sha256(effective.encode()).hexdigest(),
        "lineage.torch": torch.__version__,
        "lineage.cuda": torch.version.cuda or "none",  # the CUDA torch was built with; "none": a CPU-only build
        "lineage.device": f"{device.type} ({hardware})" + (f" x {processes} processes" if processes > 1 else ""),
        "lineage.platform": platform.platform(),
        "lineage.python": platform.python_version(),
    }


def open_run(params: Params, tags: dict[str, str], found: tuple[dict, Path] | None) -> tuple[Run, dict | None]:
    """Continue the MLflow run that wrote the checkpoint, or start one; return its id and the state to resume."""
    key = tags[RESUME_TAG]
    tracking.check_store(must_exist=False)  # an unreachable server: one line now, not minutes of retries
    earlier = tracking.latest_run_with(RESUME_TAG, key)
    state, path = found if found else (None, None)
    # A finished training is resumed only to write its outputs, when a kill stopped it after the last
    # epoch: the checkpoint was then written during that run, the latest, which is not FINISHED. One
    # older than the latest run is an old result (the latest crashed before its first checkpoint),
    # not to be passed off as new. (The run id is not in the checkpoint: it would make the
    # checkpoints, and so dvc.lock, differ between clones that trained the same.)
    if (
        state is not None
        and state["done"]
        and (earlier is None or earlier[1] == "FINISHED" or path.stat().st_mtime < earlier[2])
    ):
        print(f"train: {path.name} ends a finished training; training again from epoch 1")
        state = None
    if state is not None and earlier is not None:
        run_id = earlier[0]
        tracking.reopen_run(run_id, {**tags, "train.resumed_from": path.name})
        print(f"train: resuming MLflow run {run_id} from {path} (epoch {state['loop']['epoch']} done)")
    else:
        run_id = tracking.start_run(params.flat(), tags=tags, name=tags.pop("mlflow.runName", None))
        if state is not None:
            print(
                f"train: resuming from {path} (epoch {state['loop']['epoch']} done) in a new MLflow run, {run_id}: "
                f"the run that wrote it is not in {tracking.tracking_uri()}"
            )
    if state is None:
        return Run(run_id), None  # the old checkpoints go when this run writes its first
    # Epochs checkpointed but not logged (a kill between the two, or a new run): log them now, once.
    logged = tracking.logged_steps(run_id, "train/loss")
    now = int(time.time() * 1000)
    missing = [row for row in state["loop"]["history"] if row["epoch"] not in logged]
    tracking.log_steps(run_id, [(row["epoch"], now, {k: v for k, v in row.items() if k != "epoch"}) for row in missing])
    return Run(run_id, logged | {row["epoch"] for row in state["loop"]["history"]}), state


def run(params: Params, ctx: StepContext = BY_HAND) -> dict:
    me = distributed.world()
    data_hash = sha256_file(require(paths.MANIFEST, made_by="prepare"))  # it holds every array's sha256
    init_hash = sha256_file(require(paths.INIT, made_by="build"))
    device = pick_device(params.train.device, me)
    autocast_dtype(params.train.precision, device)  # refused before any run is opened
    key, used = resume_key(params, data_hash, init_hash, device.type, me.size)
    found = latest_checkpoint(key, used) if me.main else None  # rank 0 reads, and shares what it chose
    distributed.start(device)
    run = Run(None)
    status = "FAILED"
    try:
        state = None
        if me.main:
            tags = {"data.sha256": data_hash, RESUME_TAG: key, **lineage_tags(params, device, me.size)}
            run, state = open_run(params, {**tags, **run_tags(params, ctx)}, found)
            run_id = run.id
            tracking.log_datasets(run_id, [inputs.split_record("train"), inputs.split_record("val")])
            tracking.log_artifacts(run_id, "data", [p for p in DATA_ARTIFACTS if p.exists()])
            tracking.log_artifacts(run_id, "params", [ctx.params_path])
        # The other processes get rank 0's choice, whole: on other machines they may not see its files.
        state = distributed.share(state)
        result = fit(params, device, run, state, key, used)
        if not me.main:
            status = "FINISHED"
            return {"best": str(paths.BEST), "run_id": None, "best_epoch": result["best_epoch"]}
        run_id = run.id
        history = result["history"]
        best = history[result["best_epoch"] - 1]
        metrics = {
            "best_epoch": result["best_epoch"],
            "epochs": len(history),
            "val": {"loss": best["val/loss"], "accuracy": best["val/accuracy"]},
        }
        lines = ["epoch," + ",".join(CURVE_KEYS)]
        lines += [f"{h['epoch']}," + ",".join(f"{h[k]:.6f}" for k in CURVE_KEYS) for h in history]
        # Everything that can fail, MLflow included, happens before the outputs replace the old ones.
        with staged(paths.BEST, paths.TRAIN_METRICS, paths.TRAIN_CURVES) as (best_tmp, metrics_tmp, curves_tmp):
            save_torch(result["best_state"], best_tmp)
            metrics_tmp.write_text(json_text(metrics))
            curves_tmp.write_text("\n".join(lines) + "\n")
            digest = sha256_file(best_tmp)
            run.flush()
            # The kept epoch's validation metrics: the runs list shows a metric's last epoch, not the kept one.
            kept = {"best/val_accuracy": best["val/accuracy"], "best/val_loss": best["val/loss"]}
            tracking.log_metrics(run_id, {"best_epoch": result["best_epoch"], **kept})
            tracking.log_artifacts(run_id, "plots", [curves_tmp])
            tracking.set_tags(run_id, {tracking.MODEL_TAG: digest})
            same = paths.BEST.exists() and sha256_file(paths.BEST) == digest
            if same and (earlier := tracking.carry_over(run_id, digest)):
                print(
                    f"train: the same weights as MLflow run {earlier}: its test metrics and models are linked to "
                    "this run (evaluate and export run again only if their own code or params changed)"
                )
            tracking.end_run(run_id, "FINISHED")
        status = "FINISHED"  # only now: a failed rename above turns the run FAILED again
        tracking.note_run(run_id, digest)
    except BaseException as exc:
        if run.id is not None:
            with contextlib.suppress(PipelineError):
                run.flush()  # what was sent before the failure still belongs to the run
        if isinstance(exc, PipelineError):
            _quietly(tracking.set_tags, run.id, {"pipeline.error": str(exc)[:5000]})
        elif not isinstance(exc, Exception):  # stopped from outside: Ctrl-C, SIGTERM (Prefect's TerminationSignal)
            status = "KILLED"
        raise
    finally:
        if status != "FINISHED" and run.id is not None:
            _quietly(tracking.end_run, run.id, status)
        distributed.stop()
    metric = params.train.select_metric
    print(f"train: best epoch {result['best_epoch']} on {result['device']}, {metric} {best[metric]:.4f}")
    return {
        "best": str(paths.BEST),
        "run_id": run_id,
        "best_epoch": result["best_epoch"],
        "loop_seconds": result["loop_seconds"],  # the epochs alone, for benchmarks/overhead.py
        "loop_cpu_seconds": result["loop_cpu_seconds"],
    }


def _quietly(fn, *args) -> None:
    """Record a failure in MLflow if the store allows it; the failure itself is what the user must see."""
    if args and args[0] is None:
        return
    with contextlib.suppress(PipelineError):
        fn(*args)
