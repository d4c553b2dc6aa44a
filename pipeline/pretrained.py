"""Pretrained weights from local checkpoint files, with every unused or unfilled key reported.

- 3D-ResNeXt: Hara et al.'s Kinetics checkpoints (seed 000 section 4.2.2 fine-tunes from them): a
  dict whose 'state_dict' has DataParallel `module.` prefixes and Hara's module names, which
  models/resnext3d.py keeps, so the names map one to one.
- EfficientNet-B0 ImageNet weights (seed 004 section 3.3) in torchvision's naming
  (`features.N...block.I...`, `classifier.1`) or timm's (`conv_stem`, `blocks.S.B.conv_pw`, ...),
  translated to models/efficientnet.py's names from the model's own structure.
- Cross-modality initialisation (Wang et al., TSN): a first conv whose checkpoint has 3 input
  channels and whose model has another count (2 for flow clips, 2L for flow stacks) gets the RGB
  filters averaged over input channels and repeated for each flow channel.

A head whose class count differs from the checkpoint's is left at its fresh initialisation and
reported as mismatched. Nothing is downloaded; files are read with weights_only=True.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike

import torch
from torch import nn

from models.efficientnet import EfficientNet
from models.mat import MATStream
from models.resnext3d import ResNeXt3D

logger = logging.getLogger(__name__)

# Old checkpoints predate BatchNorm's batch counter; it is bookkeeping, not a weight.
_COUNTER = "num_batches_tracked"


@dataclass
class LoadReport:
    """What a checkpoint load did. Model-side names, except `unexpected` (checkpoint names).

    loaded: parameters/buffers filled from the checkpoint.
    missing: model entries the checkpoint has no tensor for (they keep their initialisation).
    unexpected: checkpoint entries with no place in the model.
    mismatched: model entries whose checkpoint tensor had another shape (left unfilled).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


def inflate_first_conv(weight_rgb: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(O, 3, *k) RGB filters -> (O, in_channels, *k): their mean over inputs, repeated."""
    mean = weight_rgb.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, *([1] * (weight_rgb.dim() - 2))).contiguous()


def _read_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state_dict or a dict holding 'state_dict'")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _load_mapped(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    names: dict[str, str],
    *,
    first_conv: str,
    source: str,
) -> LoadReport:
    """Copy state[foreign] into model[names[foreign]] where shapes agree; report the rest."""
    own = model.state_dict()
    report = LoadReport()
    accepted: dict[str, torch.Tensor] = {}
    for foreign, tensor in state.items():
        name = names.get(foreign)
        if name is None or name not in own:
            report.unexpected.append(foreign)
            continue
        target = own[name]
        if (
            name == first_conv
            and tensor.dim() == target.dim()
            and tensor.shape[1] != target.shape[1]
            and tensor.shape[0] == target.shape[0]
            and tensor.shape[2:] == target.shape[2:]
        ):
            logger.info("%s: %s inflated from %d to %d input channels (cross-modality init)",
                        source, name, tensor.shape[1], target.shape[1])
            tensor = inflate_first_conv(tensor, target.shape[1])
        if tensor.shape != target.shape:
            logger.warning("%s: %s has shape %s in the checkpoint but %s in the model; kept fresh",
                           source, name, tuple(tensor.shape), tuple(target.shape))
            report.mismatched.append(name)
            continue
        accepted[name] = tensor
        report.loaded.append(name)
    report.missing = [
        k for k in own
        if k not in accepted and k not in report.mismatched and not k.endswith(_COUNTER)
    ]
    model.load_state_dict(accepted, strict=False)
    logger.info("%s: loaded %d tensors", source, len(report.loaded))
    if report.missing:
        logger.warning("%s: %d model entries not in the checkpoint: %s",
                       source, len(report.missing), ", ".join(report.missing))
    if report.unexpected:
        logger.warning("%s: %d checkpoint entries unused: %s",
                       source, len(report.unexpected), ", ".join(report.unexpected))
    return report


def load_resnext3d_checkpoint(model: ResNeXt3D, path: str | PathLike[str]) -> LoadReport:
    """Load Hara et al.'s 3D-ResNeXt checkpoint (or a bare state_dict) into `model`.

    Names match after dropping `module.`; CE/SE modules are reported missing, a head for another
    class count mismatched, and a 3-channel conv1 is inflated for a flow model.
    """
    state = _read_state_dict(path)
    names = {k: k for k in model.state_dict()}
    return _load_mapped(model, state, names, first_conv="conv1.weight", source=str(path))


def _efficientnet_prefixes(model: EfficientNet, style: str) -> dict[str, str]:
    """Own module prefix -> the same module's prefix in torchvision's or timm's naming."""
    tv = style == "torchvision"
    prefixes = {
        "stem.conv": "features.0.0" if tv else "conv_stem",
        "stem.bn": "features.0.1" if tv else "bn1",
        "head.conv": f"features.{len(model.stages) + 1}.0" if tv else "conv_head",
        "head.bn": f"features.{len(model.stages) + 1}.1" if tv else "bn2",
        "classifier": "classifier.1" if tv else "classifier",
    }
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            own = f"stages.{s}.{b}"
            if tv:
                # torchvision's MBConv.block: [expand], depthwise, SE, project (each conv, bn, act).
                base = f"features.{s + 1}.{b}.block"
                parts = ["depthwise", "se", "project"]
                if block.expand is not None:
                    parts.insert(0, "expand")
                for i, part in enumerate(parts):
                    if part == "se":
                        prefixes[f"{own}.se.reduce"] = f"{base}.{i}.fc1"
                        prefixes[f"{own}.se.expand"] = f"{base}.{i}.fc2"
                    else:
                        prefixes[f"{own}.{part}.conv"] = f"{base}.{i}.0"
                        prefixes[f"{own}.{part}.bn"] = f"{base}.{i}.1"
            else:
                # timm: InvertedResidual (conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3) or, with no
                # expansion, DepthwiseSeparableConv (conv_dw, bn1, se, conv_pw, bn2).
                base = f"blocks.{s}.{b}"
                if block.expand is not None:
                    pairs = [("expand.conv", "conv_pw"), ("expand.bn", "bn1"),
                             ("depthwise.conv", "conv_dw"), ("depthwise.bn", "bn2"),
                             ("project.conv", "conv_pwl"), ("project.bn", "bn3")]
                else:
                    pairs = [("depthwise.conv", "conv_dw"), ("depthwise.bn", "bn1"),
                             ("project.conv", "conv_pw"), ("project.bn", "bn2")]
                pairs += [("se.reduce", "se.conv_reduce"), ("se.expand", "se.conv_expand")]
                for mine, theirs in pairs:
                    prefixes[f"{own}.{mine}"] = f"{base}.{theirs}"
    return prefixes


def _efficientnet_names(model: EfficientNet, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Checkpoint key -> model key, for whichever naming the checkpoint uses."""
    own_keys = list(model.state_dict())
    if "stem.conv.weight" in state:
        return {k: k for k in own_keys}
    if any(k.startswith("features.") for k in state):
        style = "torchvision"
    elif "conv_stem.weight" in state:
        style = "timm"
    else:
        raise ValueError("unrecognised EfficientNet checkpoint: neither torchvision's "
                         "('features.*'), timm's ('conv_stem.*') nor this project's naming")
    names = {}
    for mine, theirs in _efficientnet_prefixes(model, style).items():
        for key in own_keys:
            if key.startswith(mine + ".") and "." not in key[len(mine) + 1 :]:
                names[f"{theirs}.{key[len(mine) + 1:]}"] = key
    return names


def load_efficientnet_checkpoint(
    model: EfficientNet | MATStream, path: str | PathLike[str]
) -> LoadReport:
    """Load torchvision- or timm-format (or this project's) EfficientNet weights into `model`.

    A MATStream receives them in its backbone (report names are then the backbone's). The
    naming is detected from the keys; a 3-channel stem is inflated for a flow model.
    """
    target = model.backbone if isinstance(model, MATStream) else model
    state = _read_state_dict(path)
    names = _efficientnet_names(target, state)
    return _load_mapped(target, state, names, first_conv="stem.conv.weight", source=str(path))
