"""The training loop shared by every run: resumable checkpoints, SIGTERM, DDP, bf16, determinism.

Optimisation follows seed 000 section 4.2.2 (SGD with momentum and weight decay, lr x0.1 when the
validation loss has not improved for `plateau_patience` epochs: ReduceLROnPlateau). What a run
trains is a `Task`: a model whose forward returns (features, logits), the datasets, and a loss
function of (outputs, batch); the builders for each command are at the bottom of this module.

Crash safety (after mmaction2's --resume, made exact): DATA/runs/<name>/checkpoint.pt is written
atomically (temp + os.replace) after every epoch, every `checkpoint_every` steps and on SIGTERM
(the step in flight finishes, the checkpoint is saved, the process exits with status 143). It
holds model, optimizer, scheduler, AMP scaler, the RNG states of every rank (python, numpy,
torch, cuda), the epoch, the steps done in it and the partial epoch sums. Rerunning the same
command resumes there. The data order never depends on how far a process got: the sampler's
permutation is a function of (seed, epoch), and each item's augmentation RNG is seeded from
(seed, epoch, index), so workers and restarts cannot change it. In deterministic mode on CPU a
kill -9 mid-epoch and a rerun end with bit-identical weights to an uninterrupted run.

Distributed: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU); each global batch of `batch_size` clips is split between the ranks,
rank 0 alone writes files, and buffers (BatchNorm statistics) are broadcast from rank 0 before
the final weights are saved, so every rank ends with identical weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from preprocess.atomic import clean_stale_temps, open_atomic, write_text_atomic
from preprocess.ledger import StageLock
from .config import FAMILY, TrainConfig, config_diff, config_from_dict, dump_json
from .precision import apply_precision, autocast, resolve_precision

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Interrupted(RuntimeError):
    """SIGTERM arrived: the current step finished and a checkpoint was saved."""


class RunConfigMismatch(ValueError):
    """The run folder holds a run made with another config."""


# ----------------------------------------------------------------------------- run folder

@dataclass(frozen=True)
class RunPaths:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def model(self) -> Path:
        """Final weights; its presence means the run is complete."""
        return self.dir / "model.pt"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"


def save_torch_atomic(obj, final: Path) -> None:
    """torch.save under a temporary name, then renamed: a final name is a whole, synced file."""
    with open_atomic(final) as f:
        torch.save(obj, f)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_log(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun (or a test's spawn) described in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device_kind == "cuda" else "gloo",
                                      rank=rank, world_size=world)
    return DistInfo(rank, world, local)


def resolve_device(spec: str, dist: DistInfo) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and dist.enabled:
        spec = f"cuda:{dist.local_rank}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA device is available here")
        if device.index is None:  # set_device wants an index (torch 2.11)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _all_reduce(values: list[float], device: torch.device, dist: DistInfo) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- determinism

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_deterministic(on: bool, device: torch.device) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index), stable across processes and machines."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch(CPU) RNGs seeded, then restore the previous states."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


class SeededItems(Dataset):
    """Wrap a dataset so that item (epoch, index) draws its augmentation from item_seed(...)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded(item_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochBatchSampler(Sampler):
    """Global batches from a (seed, epoch) permutation; this rank takes its share of each.

    steps = `steps` if given, else len // batch_size (at least 1): the incomplete last batch is
    dropped, as is usual for BatchNorm networks. An epoch longer than the data wraps around
    through further permutations. `start_step` resumes mid-epoch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 steps: int = 0):
        if n < 1:
            raise ValueError("the training set is empty")
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} does not divide between {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps = steps or max(1, n // batch_size)
        self.epoch, self.start_step = 0, 0
        self._cache: tuple[int, list[int]] = (-1, [])

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self, epoch: int, need: int) -> list[int]:
        if self._cache[0] != epoch:
            self._cache = (epoch, [])
        order = self._cache[1]
        while len(order) < need:
            rounds = len(order) // self.n
            g = torch.Generator().manual_seed(item_seed(self.seed, epoch, -1 - rounds))
            order += torch.randperm(self.n, generator=g).tolist()
        return order

    def global_batch(self, epoch: int, step: int) -> list[int]:
        need = (step + 1) * self.batch_size
        order = self._order(epoch, need)
        batch = order[step * self.batch_size:need]
        if len(batch) < self.batch_size:  # only when n < batch_size
            batch = order[:min(self.n, self.batch_size)]
        return batch

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(self.epoch, step)
            yield [(self.epoch, i) for i in batch[self.rank::self.world]]


# ----------------------------------------------------------------------------- the task

@dataclass
class Task:
    """What a run trains.

    model: forward(x) returns (features (B, D), logits (B, K)); see `FeaturesAndLogits`.
    loss: (outputs, batch) -> {"loss": scalar, ...}; other keys are logged as epoch means.
    input_key: the batch entry fed to the model ("rgb" or "flow").
    prepare: optional (batch on device) -> batch, e.g. running a frozen online teacher.
    """
    model: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    loss: Callable[[tuple, dict], dict]
    input_key: str
    prepare: Callable[[dict], dict] | None = None
    meta: dict = field(default_factory=dict)  # recorded in model.pt (classes, arch ...)


class FeaturesAndLogits(nn.Module):
    """forward(x) -> (forward_features(x), forward_head(features)), so DDP sees one forward."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(x)
        return features, self.backbone.forward_head(features)


def cross_entropy_loss(outputs: tuple, batch: dict) -> dict:
    return {"loss": nn.functional.cross_entropy(outputs[1], batch["label"])}


# ----------------------------------------------------------------------------- the loop

@dataclass
class FitResult:
    run_dir: Path
    history: list[dict]
    completed: bool = True
    resumed_from: tuple[int, int] | None = None


class _SigtermFlag:
    """Set by SIGTERM; the loop checks it after each step. Installed in the main thread only."""

    def __init__(self):
        self.set, self._old = False, None

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.dim() == 5 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last_3d)
        out[k] = v
    return out


def _use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """channels_last_3d for the 3D ResNeXt where it is faster. On an H200 (train_bench.py,
    batch 32) it speeds up bf16 steps 1.09x (compiled 1.11x) and TF32 ones 1.21x, and slows
    strict fp32 ones (0.95x)."""
    if FAMILY[cfg.kind] != "resnext":  # MAT-EffNet is 2D: its 5D input is (B, L, C, H, W)
        return False
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda"
                                         and resolve_precision(cfg.amp, device) != "fp32")


def check_run_config(paths: RunPaths, cfg: TrainConfig) -> None:
    """Refuse to resume or overwrite a run folder holding another config."""
    if not paths.config.exists():
        return
    recorded = config_from_dict(json.loads(paths.config.read_text(encoding="utf-8")))
    diffs = config_diff(recorded, cfg)
    if diffs:
        raise RunConfigMismatch(
            f"{paths.dir} holds a run made with another config ({'; '.join(diffs)}). Use "
            f"another --name, or delete that folder to start over.")


def fit(task: Task, cfg: TrainConfig, run_dir: Path, *, progress: bool = True,
        on_step: Callable[[int, int], None] | None = None,
        log: Callable[[str], None] = print) -> FitResult:
    """Train `task` under `cfg` in `run_dir`, resuming from its checkpoint if there is one.

    `on_step(epoch, steps_done)` runs after each step (and after any checkpoint of that step).
    Raises Interrupted after saving a checkpoint when SIGTERM arrives.
    """
    paths = RunPaths(Path(run_dir))
    dist = init_distributed("cuda" if cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg.device, dist)
    set_deterministic(cfg.deterministic, device)
    with contextlib.ExitStack() as held:
        # rank 0 holds DATA/runs/NAME/run.lock while it trains; taking it clears the
        # temporary files a killed run left (a torn checkpoint write is checkpoint-sized)
        locked = dist.main and paths.dir.exists()
        if locked:
            _lock_run(held, paths, cfg)
        check_run_config(paths, cfg)
        if paths.model.exists():
            log(f"{cfg.name}: already trained ({paths.model}); delete it to train again")
            return FitResult(paths.dir, read_log(paths.log))
        if not paths.config.exists():
            # a bad geometry (crop larger than the frames ...) fails here, before the run exists
            SeededItems(task.train_set, cfg.seed)[(0, 0)]
            if dist.main:
                paths.dir.mkdir(parents=True, exist_ok=True)
                if not locked:
                    _lock_run(held, paths, cfg)
                write_text_atomic(paths.config, dump_json(cfg))
        return _train(task, cfg, paths, dist, device, progress, on_step, log)


RUN_COMMANDS = {"teacher": "train-teacher", "rgb": "train-rgb", "distill": "distill",
                "spatial": "train-two-stream", "temporal": "train-two-stream"}


def _lock_run(held: contextlib.ExitStack, paths: RunPaths, cfg: TrainConfig) -> None:
    held.enter_context(StageLock(paths.dir / "run.lock", f"{RUN_COMMANDS[cfg.kind]} --name "
                                                          f"{cfg.name}"))
    clean_stale_temps(paths.dir)


def _train(task: Task, cfg: TrainConfig, paths: RunPaths, dist: DistInfo, device: torch.device,
           progress: bool, on_step, log) -> FitResult:
    """fit's body once the run folder is locked and its config recorded."""
    amp = apply_precision(cfg.amp, device)
    channels_last = _use_channels_last(cfg, device)
    model = task.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # compiled on the first step; checkpoints hold the bare model's weights
        net = torch.compile(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
    # bf16 needs no loss scaling; the (disabled) scaler keeps checkpoints in one format.
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    start_epoch, start_step, sums, history, resumed = 0, 0, {}, [], None
    if paths.checkpoint.exists():
        ckpt = torch.load(paths.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        sums, history = ckpt["sums"], ckpt["history"]
        states = ckpt["rng"]
        set_rng_state(states[dist.rank] if len(states) == dist.world else states[0])
        resumed = (start_epoch, start_step)
        log(f"{cfg.name}: resuming at epoch {start_epoch + 1}, step {start_step}")

    sampler = EpochBatchSampler(len(task.train_set), cfg.batch_size, seed=cfg.seed,
                                rank=dist.rank, world=dist.world, steps=cfg.steps_per_epoch)
    loader = DataLoader(SeededItems(task.train_set, cfg.seed), batch_sampler=sampler,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # never draws from the global RNG

    def save(epoch: int, step: int, epoch_sums: dict) -> None:
        states = [rng_state()]
        if dist.enabled:
            gathered: list = [None] * dist.world
            torch_dist.all_gather_object(gathered, states[0])
            states = gathered
        if dist.main:
            save_torch_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(),
                               "scaler": scaler.state_dict(), "rng": states, "epoch": epoch,
                               "step": step, "sums": _host_sums(epoch_sums), "history": history,
                               "config": cfg.to_dict()}, paths.checkpoint)
            write_text_atomic(paths.log, "".join(json.dumps(h) + "\n" for h in history))
        if dist.enabled:
            torch_dist.barrier()

    with _SigtermFlag() as sigterm:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch, start_step)
            net.train()
            bar = _progress(len(sampler), f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}",
                            progress and dist.main)
            for step, batch in enumerate(loader, start=start_step):
                batch = _to_device(batch, device, channels_last)
                outputs, losses = train_step(net, task, batch, optimizer, amp)
                _accumulate(sums, losses, outputs[1], batch["label"])
                done = step + 1
                stop = _all_reduce([float(sigterm.set)], device, dist)[0] > 0
                if stop or (done % cfg.checkpoint_every == 0 and done < sampler.steps):
                    save(epoch, done, sums)
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(epoch, done)
                if stop:
                    if bar is not None:
                        bar.close()
                    raise Interrupted(f"{cfg.name}: stopped by SIGTERM at epoch {epoch + 1}, "
                                      f"step {done}; checkpoint saved, rerun to resume")
            if bar is not None:
                bar.close()
            record = {"epoch": epoch + 1, **_epoch_means(sums, device, dist),
                      "lr": optimizer.param_groups[0]["lr"]}
            if task.val_set is not None:
                val = evaluate_loss(net, task, cfg, device, dist, amp, channels_last)
                record.update(val)
                scheduler.step(val["val_loss"])
            else:
                scheduler.step(record["train_loss"])
            record["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(record)
            sums, start_step = {}, 0
            save(epoch + 1, 0, sums)
            if dist.main:
                log(_format_record(cfg.name, record))

    if dist.enabled:  # BatchNorm statistics differ per rank: rank 0's become everyone's
        for buf in model.buffers():
            torch_dist.broadcast(buf, src=0)
    if dist.main:
        bare = model.backbone if isinstance(model, FeaturesAndLogits) else model
        save_torch_atomic({"state_dict": bare.state_dict(), "config": cfg.to_dict(),
                           "history": history, **task.meta}, paths.model)
    if dist.enabled:
        torch_dist.barrier()
    return FitResult(paths.dir, history, True, resumed)


def train_step(net: nn.Module, task: Task, batch: dict, optimizer: torch.optim.Optimizer,
               amp: bool) -> tuple[tuple, dict]:
    """One optimisation step on a batch already on the device (what benchmarks time too)."""
    if task.prepare is not None:
        batch = task.prepare(batch)
    device = batch[task.input_key].device
    with autocast(device, amp):
        outputs = net(batch[task.input_key])
        losses = task.loss(outputs, batch)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return outputs, losses


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                leave=False)


def _accumulate(sums: dict, losses: Mapping[str, torch.Tensor], logits: torch.Tensor,
                labels: torch.Tensor) -> None:
    """Epoch sums in float64 on the device: reading them every step would make the host wait
    for each step's kernels before queueing the next one's."""
    n = labels.shape[0]
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + v.detach().double() * n
    sums["correct"] = sums.get("correct", 0.0) + (logits.argmax(1) == labels).sum().double()
    sums["n"] = sums.get("n", 0.0) + n


def _host_sums(sums: dict) -> dict:
    return {k: float(v) for k, v in sums.items()}


def _epoch_means(sums: dict, device: torch.device, dist: DistInfo) -> dict:
    keys = sorted(sums)
    totals = dict(zip(keys, _all_reduce([float(sums[k]) for k in keys], device, dist)))
    n = max(totals.get("n", 0.0), 1.0)
    out = {f"train_{k}": totals[k] / n for k in keys if k not in ("n", "correct")}
    out["train_acc"] = totals.get("correct", 0.0) / n
    out["train_clips"] = int(totals.get("n", 0))
    return out


@torch.no_grad()
def evaluate_loss(net: nn.Module, task: Task, cfg: TrainConfig, device: torch.device,
                  dist: DistInfo, amp: bool, channels_last: bool) -> dict:
    """Cross-entropy and clip accuracy on the validation set, split between ranks."""
    net.eval()
    indices = list(range(dist.rank, len(task.val_set), dist.world))
    loader = DataLoader(torch.utils.data.Subset(task.val_set, indices),
                        batch_size=cfg.val_batch_size or cfg.batch_size,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    loss_sum, correct, n = 0.0, 0.0, 0.0
    for batch in loader:
        batch = _to_device(batch, device, channels_last)
        with autocast(device, amp):
            # the bare model: DDP's forward would expect a matching backward
            _, logits = net.module(batch[task.input_key]) if isinstance(
                net, nn.parallel.DistributedDataParallel) else net(batch[task.input_key])
        labels = batch["label"]
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels,
                                                      reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        n += labels.shape[0]
    loss_sum, correct, n = _all_reduce([loss_sum, correct, n], device, dist)
    return {"val_loss": loss_sum / max(n, 1), "val_acc": correct / max(n, 1),
            "val_clips": int(n)}


def _format_record(name: str, r: dict) -> str:
    parts = [f"{name} epoch {r['epoch']}", f"loss {r['train_loss']:.4f}",
             f"acc {r['train_acc']:.3f}"]
    if "val_loss" in r:
        parts += [f"val_loss {r['val_loss']:.4f}", f"val_acc {r['val_acc']:.3f}"]
    parts += [f"lr {r['lr']:.2g}", f"{r['seconds']:.1f}s"]
    return "  ".join(parts)


# ----------------------------------------------------------------------------- models and runs

def build_model(cfg: TrainConfig, num_classes: int, *, flow_stack: int = 10) -> nn.Module:
    """The network a config names (config -> keyword arguments happens here, once).

    ResNeXt clips are (B, 3|2, T, H, W); MAT-EffNet segments are (B, L, 3|2*flow_stack, H, W).
    """
    from models.mat import mat_effnet_b0, mat_effnet_tiny
    from models.resnext3d import resnext3d_50, resnext3d_101, resnext3d_tiny
    if FAMILY[cfg.kind] == "resnext":
        builder = {"101": resnext3d_101, "50": resnext3d_50, "tiny": resnext3d_tiny}[cfg.arch]
        return builder(in_channels=2 if cfg.modality == "flow" else 3, num_classes=num_classes,
                       excitation=cfg.excitation)
    builder = {"b0": mat_effnet_b0, "tiny": mat_effnet_tiny}[cfg.arch]
    return builder(in_channels=2 * flow_stack if cfg.modality == "flow" else 3,
                   num_classes=num_classes, dropout=cfg.dropout)


def load_trained(run_dir: Path,
                 device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """A finished run's network (eval mode, frozen) and its resolved config."""
    paths = RunPaths(Path(run_dir))
    if not paths.model.exists():
        raise FileNotFoundError(f"{paths.model} does not exist: the run {paths.dir.name} has "
                                f"not finished training")
    saved = torch.load(paths.model, map_location="cpu", weights_only=False)
    cfg = config_from_dict(saved["config"])
    model = build_model(cfg, saved["num_classes"], flow_stack=saved.get("flow_stack", 10))
    model.load_state_dict(saved["state_dict"])
    model.eval().requires_grad_(False)
    return model.to(device), cfg


def run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run recorded in its config.json."""
    path = RunPaths(Path(run_dir)).config
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: no run in {Path(run_dir)}")
    return config_from_dict(json.loads(path.read_text(encoding="utf-8")))


FLOW_STACK = 10  # MAT-EffNet temporal input: 10 flow pairs per segment (seed 004 section 4.2)


def _num_classes(layout) -> tuple[str, ...]:
    from preprocess.dataset_index import DatasetIndex
    if not layout.index_path.exists():
        raise FileNotFoundError(f"{layout.index_path} does not exist: run `pipeline frames` "
                                f"on {layout.root} first")
    return DatasetIndex.load(layout.index_path).classes


def _clip_sets(data: Path, cfg: TrainConfig):
    from .datasets import ClipDataset
    train = ClipDataset(data, split=cfg.split, subset="train", modalities=(cfg.modality,),
                        clip_len=cfg.clip_len, crop=cfg.crop, train=True)
    val = ClipDataset(data, split=cfg.split, subset="test", modalities=(cfg.modality,),
                      clip_len=cfg.clip_len, crop=cfg.crop, train=False)
    return train, val


def _segment_sets(data: Path, cfg: TrainConfig):
    from .datasets import SegmentDataset
    kw = dict(split=cfg.split, modalities=(cfg.modality,), num_segments=cfg.segments,
              new_length=FLOW_STACK, crop=cfg.crop)
    return (SegmentDataset(data, subset="train", train=True, **kw),
            SegmentDataset(data, subset="test", train=False, **kw))


def build_eval_dataset(layout, cfg: TrainConfig, split: int) -> Dataset:
    """Every test clip (ResNeXt: all non-overlapping centre clips) or one segment sample."""
    from .datasets import EvalClipDataset, SegmentDataset
    if FAMILY[cfg.kind] == "resnext":
        return EvalClipDataset(layout.root, split=split, subset="test",
                               modalities=(cfg.modality,), clip_len=cfg.clip_len, crop=cfg.crop)
    return SegmentDataset(layout.root, split=split, subset="test", modalities=(cfg.modality,),
                          num_segments=cfg.segments, new_length=FLOW_STACK, crop=cfg.crop,
                          train=False)


def _load_pretrained(model: nn.Module, cfg: TrainConfig, log) -> None:
    from .pretrained import load_efficientnet_checkpoint, load_resnext3d_checkpoint
    path = Path(cfg.pretrained)
    if not path.exists():
        raise FileNotFoundError(f"--pretrained {path}: no such file")
    loader = (load_resnext3d_checkpoint if FAMILY[cfg.kind] == "resnext"
              else load_efficientnet_checkpoint)
    report = loader(model, path)
    log(f"{cfg.name}: {len(report.loaded)} tensors from {path} ({len(report.missing)} missing, "
        f"{len(report.mismatched)} mismatched, {len(report.unexpected)} unused)")


def build_task(data: Path, cfg: TrainConfig, *, feature_spec=None, log=print) -> Task:
    """The model, datasets and loss of a run of `cfg.kind` over DATA's shards."""
    from preprocess.layout import DataLayout
    layout = DataLayout(data)
    classes = _num_classes(layout)
    seed_all(cfg.seed)  # the same initial weights on every rank and every rerun
    model = build_model(cfg, len(classes), flow_stack=FLOW_STACK)
    if cfg.pretrained:
        _load_pretrained(model, cfg, log)
    meta = {"num_classes": len(classes), "classes": list(classes), "flow_stack": FLOW_STACK}
    if cfg.kind in ("teacher", "rgb"):
        train_set, val_set = _clip_sets(data, cfg)
        return Task(FeaturesAndLogits(model), train_set, val_set, cross_entropy_loss,
                    cfg.modality, meta=meta)
    if cfg.kind in ("spatial", "temporal"):
        train_set, val_set = _segment_sets(data, cfg)
        return Task(FeaturesAndLogits(model), train_set, val_set, cross_entropy_loss,
                    cfg.modality, meta=meta)
    return _distill_task(data, layout, cfg, model, meta, feature_spec, log)


def _distill_task(data, layout, cfg: TrainConfig, model, meta, feature_spec, log) -> Task:
    """IMRS (eq. 8): the student's pooled feature and logits against the teacher's feature."""
    from .config import FeatureConfig
    from .features import DistillDataset, find_cache
    teacher_cfg = run_config(layout.run_dir(cfg.teacher))
    if teacher_cfg.kind != "teacher" or teacher_cfg.split != cfg.split:
        raise ValueError(f"run {cfg.teacher} is a {teacher_cfg.kind} run on split "
                         f"{teacher_cfg.split}; distillation on split {cfg.split} needs the flow "
                         f"teacher of that split")
    if (teacher_cfg.clip_len, teacher_cfg.crop) != (cfg.clip_len, cfg.crop):
        raise ValueError(f"the teacher saw {teacher_cfg.clip_len}x{teacher_cfg.crop}px clips, "
                         f"the student would see {cfg.clip_len}x{cfg.crop}px")
    prepare = None
    if cfg.online_teacher:
        teacher, _ = load_trained(layout.run_dir(cfg.teacher))
        train_set = DistillDataset(data, split=cfg.split, spec=feature_spec or FeatureConfig(),
                                   clip_len=cfg.clip_len, crop=cfg.crop, online=True)
        prepare = online_teacher(teacher, amp=cfg.amp)
        teacher_dim = teacher.num_features
    else:
        cache = find_cache(data, cfg.teacher, feature_spec)
        train_set = DistillDataset(data, split=cfg.split, clip_len=cfg.clip_len, crop=cfg.crop,
                                   cache=cache, log=log)
        import h5py
        with h5py.File(cache, "r") as f:
            teacher_dim = f["features"].shape[2]
    if teacher_dim != model.num_features:
        raise ValueError(f"the student's feature has {model.num_features} dimensions, the "
                         f"teacher's {teacher_dim}: eq. 8 needs the same (use the teacher's "
                         f"--arch)")
    _, val_set = _clip_sets(data, cfg)
    return Task(FeaturesAndLogits(model), train_set, val_set, eq8_loss(cfg), "rgb", prepare,
                meta)


def eq8_loss(cfg: TrainConfig) -> Callable[[tuple, dict], dict]:
    """Eq. 8 on (student features, logits) against batch["teacher_features"]."""
    from models.losses import distillation_loss

    def loss(outputs: tuple, batch: dict) -> dict:
        features, logits = outputs
        return distillation_loss(logits.float(), batch["label"], features.float(),
                                 batch["teacher_features"], lambda1=cfg.lambda1,
                                 lambda2=cfg.lambda2)
    return loss


def online_teacher(teacher: nn.Module, *, amp: str) -> Callable[[dict], dict]:
    """A Task.prepare that runs the frozen teacher on batch["flow"] (--online-teacher), in the
    student's precision (`amp` as TrainConfig.amp)."""
    teacher.eval().requires_grad_(False)
    state: dict = {}

    def prepare(batch: dict) -> dict:
        flow = batch["flow"]
        if not state:  # the device is known once batches arrive
            teacher.to(flow.device)
            if flow.is_contiguous(memory_format=torch.channels_last_3d):
                teacher.to(memory_format=torch.channels_last_3d)
            state["bf16"] = resolve_precision(amp, flow.device) == "bf16"
        with torch.no_grad(), autocast(flow.device, state["bf16"]):
            batch["teacher_features"] = teacher.forward_features(flow).float()
        return batch
    return prepare


def train_run(data: Path, cfg: TrainConfig, *, feature_spec=None, progress: bool = True,
              on_step=None, log=print) -> FitResult:
    """What each training command does: build the task of `cfg.kind` and fit it."""
    from preprocess.layout import DataLayout
    paths = RunPaths(DataLayout(data).run_dir(cfg.name))
    check_run_config(paths, cfg)
    if paths.model.exists():  # finished: don't even open the shards
        log(f"{cfg.name}: already trained ({paths.model})")
        return FitResult(paths.dir, read_log(paths.log))
    task = build_task(data, cfg, feature_spec=feature_spec, log=log)
    return fit(task, cfg, paths.dir, progress=progress, on_step=on_step, log=log)
