"""Training configs: frozen dataclasses holding the papers' values, overridable by TOML and options.

Defaults: seed 000 section 4.2.2 for the 3D-ResNeXt-101+CE runs (SGD, momentum 0.9, weight decay
5e-4, lr 0.1 from scratch or 0.001 when fine-tuning, x0.1 after 10 epochs without improvement,
80 epochs, batch 32, 16-frame 112x112 clips) and section 4.3.2 for the distillation weights
(lambda1 = 50, lambda2 = 200); seed 004 section 4.2 for MAT-EffNet (batch 16, lr 1e-2, dropout
0.2, 224x224 crops, 50 epochs as in its Fig. 8).

Precedence, lowest first: the kind's defaults, a TOML file (unknown keys are an error), options.
The resolved config is what a run records in DATA/runs/<name>/config.json.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

KINDS = ("teacher", "rgb", "distill", "spatial", "temporal")
RESNEXT_ARCHS = ("101", "50", "tiny")
EFFNET_ARCHS = ("b0", "tiny")

# What each kind trains on and with which network family.
MODALITY = {"teacher": "flow", "rgb": "rgb", "distill": "rgb", "spatial": "rgb", "temporal": "flow"}
FAMILY = {"teacher": "resnext", "rgb": "resnext", "distill": "resnext",
          "spatial": "mat_effnet", "temporal": "mat_effnet"}

# Fields that change how fast a run goes but not what it computes: a resumed run may differ here.
RUNTIME_FIELDS = frozenset({"workers", "device", "checkpoint_every", "name", "compile"})
# TrainConfig.amp: the numeric precision (pipeline/precision.py says what each means on CUDA).
PRECISIONS = ("auto", "bf16", "tf32", "off")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. `lr=None` resolves to `lr_scratch`, or `lr_finetune` with --pretrained."""
    kind: str = "teacher"
    name: str = ""                   # DATA/runs/<name>; "" -> "<kind>_split<split>"
    arch: str = "101"                # 101 | 50 | tiny (ResNeXt); b0 | tiny (MAT-EffNet)
    excitation: str | None = "ce"    # ce | se | None (ResNeXt only)
    split: int = 1
    epochs: int = 80
    batch_size: int = 32             # global: divided between DDP ranks
    lr: float | None = None
    lr_scratch: float = 0.1
    lr_finetune: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    plateau_patience: int = 10       # ReduceLROnPlateau on the validation loss
    plateau_factor: float = 0.1
    clip_len: int = 16
    crop: int = 112
    segments: int = 3                # MAT-EffNet: L snippets per video
    dropout: float = 0.2             # MAT-EffNet
    pretrained: str | None = None    # a local checkpoint (pipeline/pretrained.py)
    seed: int = 0
    deterministic: bool = False
    workers: int = 4
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: str = "auto"                # auto (bf16 on CUDA) | bf16 | tf32 | off: pipeline/precision.py
    compile: bool = False            # torch.compile the network (CUDA: ~1.35x bf16 steps)
    channels_last: str = "auto"      # auto (CUDA bf16/tf32) | on | off: channels_last_3d, ResNeXt
    checkpoint_every: int = 200      # steps between mid-epoch checkpoints
    steps_per_epoch: int = 0         # 0: one clip per training video per epoch
    val_batch_size: int = 0          # 0: same as batch_size
    # distillation (eq. 8)
    lambda1: float = 50.0
    lambda2: float = 200.0
    teacher: str = ""                # teacher run name; "" -> "teacher_split<split>"
    online_teacher: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        archs = RESNEXT_ARCHS if FAMILY[self.kind] == "resnext" else EFFNET_ARCHS
        if self.arch not in archs:
            raise ValueError(f"arch for {self.kind} must be one of {', '.join(archs)}, "
                             f"got {self.arch!r}")
        if self.excitation not in (None, "ce", "se"):
            raise ValueError(f"excitation must be ce, se or none, got {self.excitation!r}")
        if self.amp not in PRECISIONS:
            raise ValueError(f"amp must be one of {', '.join(PRECISIONS)}, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last must be auto, on or off, got {self.channels_last!r}")
        for key in ("epochs", "batch_size", "clip_len", "crop", "segments", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.split not in (1, 2, 3):
            raise ValueError(f"split must be 1, 2 or 3, got {self.split}")

    @property
    def modality(self) -> str:
        return MODALITY[self.kind]

    @property
    def run_name(self) -> str:
        return self.name or f"{self.kind}_split{self.split}"

    @property
    def teacher_name(self) -> str:
        return self.teacher or f"teacher_split{self.split}"

    def resolved(self) -> "TrainConfig":
        """Fill the derived values (lr, name, teacher) so that config.json says what ran."""
        lr = self.lr if self.lr is not None else (
            self.lr_finetune if self.pretrained else self.lr_scratch)
        return replace(self, lr=lr, name=self.run_name,
                       teacher=self.teacher_name if self.kind == "distill" else self.teacher)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The seed papers' values per kind, on top of the dataclass defaults (seed 000).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": {},
    "rgb": {},
    "distill": {},
    # seed 004 section 4.2: EfficientNet-B0 at 224x224, batch 16, lr 1e-2, dropout 0.2; Fig. 8: 50
    "spatial": {"arch": "b0", "excitation": None, "batch_size": 16, "lr_scratch": 1e-2,
                "lr_finetune": 1e-2, "crop": 224, "epochs": 50},
    "temporal": {"arch": "b0", "excitation": None, "batch_size": 16, "lr_scratch": 1e-2,
                 "lr_finetune": 1e-2, "crop": 224, "epochs": 50},
}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _check_type(key: str, value: Any, hint: Any, source: str) -> Any:
    """Accept a TOML value for a field of type `hint`, or say which key and file are wrong."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if type(None) in allowed:
            return None
    for t in allowed:
        if t is type(None):
            continue
        if typing.get_origin(t) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)  # TOML arrays for tuple fields
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)  # `arch = 101` reads as an int in TOML
    raise ValueError(f"{source}: {key} = {value!r} is not a {hint}")


def apply_overrides(base, overrides: Mapping[str, Any], source: str):
    """`base` with `overrides` applied; unknown keys and wrong types are errors naming `source`."""
    types_ = _field_types(type(base))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: "
                         f"{', '.join(sorted(types_))}")
    clean = {k: _check_type(k, v, types_[k], source) for k, v in overrides.items()}
    return replace(base, **clean)


def read_toml(path: Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def load_train_config(kind: str, *, config_file: Path | None = None,
                      options: Mapping[str, Any] | None = None) -> TrainConfig:
    """The kind's defaults, then the TOML file, then options whose value is not None."""
    cfg = TrainConfig(kind=kind, **KIND_DEFAULTS[kind])
    if config_file is not None:
        data = read_toml(config_file)
        if "kind" in data and data["kind"] != kind:
            raise ValueError(f"{config_file}: kind = {data['kind']!r} but this command trains "
                             f"{kind!r}")
        cfg = apply_overrides(cfg, data, str(config_file))
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if given:
        cfg = apply_overrides(cfg, given, "command-line options")
    return cfg.resolved()


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Read back a config.json (the resolved config of a run)."""
    kind = d.get("kind", "teacher")
    if kind not in KINDS:
        raise ValueError(f"config.json: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return apply_overrides(TrainConfig(kind=kind, **KIND_DEFAULTS[kind]), dict(d), "config.json")


def config_diff(recorded: TrainConfig, now: TrainConfig) -> list[str]:
    """Fields that would change what a resumed run computes (runtime-only fields excluded)."""
    a, b = recorded.to_dict(), now.to_dict()
    return [f"{k}: recorded {a[k]!r}, now {b[k]!r}" for k in sorted(a)
            if k not in RUNTIME_FIELDS and a[k] != b.get(k)]


def dump_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n"


# The fixed spatial views of the teacher-feature cache: centre + 4 corners, each unflipped and
# flipped, as (top, left) fractions of the free crop range (pipeline.datasets.View).
FIVE_CROPS = ((0.5, 0.5), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0))


@dataclass(frozen=True)
class FeatureConfig:
    """The grid of teacher inputs cached by `teacher-features` (part of the cache key).

    Windows start at 0, stride, 2*stride, ... while a clip of clip_len flows fits (one looped
    window for shorter videos); each window is cut by every view in `crops` x `flips`.
    """
    stride: int = 8
    crops: tuple[tuple[float, float], ...] = FIVE_CROPS
    flips: tuple[bool, ...] = (False, True)
    subset: str = "train"            # which videos of the teacher's split are cached
    amp: str = "off"                 # off: strict fp32 teacher; bf16: autocast on CUDA
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not self.crops or not self.flips:
            raise ValueError("the view grid needs at least one crop and one flip setting")
        if self.subset not in ("train", "test", "all"):
            raise ValueError(f"subset must be train, test or all, got {self.subset!r}")
        if self.amp not in ("off", "bf16"):
            raise ValueError(f"amp must be off or bf16, got {self.amp!r}")
