"""pipeline/pretrained.py: checkpoints in Hara's, torchvision's and timm's formats land in place."""

import logging
import re

import pytest
import torch

from models.efficientnet import efficientnet_tiny
from models.mat import mat_effnet_tiny
from models.resnext3d import resnext3d_tiny
from pipeline.pretrained import (
    LoadReport,
    inflate_first_conv,
    load_efficientnet_checkpoint,
    load_resnext3d_checkpoint,
)


def _randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Distinct random values, so a tensor found in place cannot be a fresh initialisation."""
    gen = torch.Generator().manual_seed(1)
    return {
        k: (v.clone() if k.endswith("num_batches_tracked") else torch.randn(v.shape, generator=gen))
        for k, v in state.items()
    }


# --- 3D-ResNeXt, Hara et al.'s format --------------------------------------------------------


def _hara_checkpoint(tmp_path, *, num_classes: int = 400) -> tuple[str, dict[str, torch.Tensor]]:
    state = _randomised(resnext3d_tiny(num_classes=num_classes).state_dict())
    # Hara's training script saves the DataParallel-wrapped model with epoch and arch beside it.
    checkpoint = {"epoch": 200, "arch": "resnext-101",
                  "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "resnext-101-kinetics.pth"
    torch.save(checkpoint, path)
    return str(path), state


def test_hara_checkpoint_fills_every_backbone_tensor(tmp_path) -> None:
    path, source = _hara_checkpoint(tmp_path)
    model = resnext3d_tiny(num_classes=400, excitation="ce")
    report = load_resnext3d_checkpoint(model, path)
    own = model.state_dict()
    for key, tensor in source.items():
        assert torch.equal(own[key], tensor), key
    assert sorted(report.loaded) == sorted(source)
    assert report.missing == [f"excitations.{i}.conv.weight" for i in range(4)]
    assert report.unexpected == [] and report.mismatched == []


def test_hara_head_is_replaced_for_another_class_count(tmp_path, caplog) -> None:
    path, source = _hara_checkpoint(tmp_path)
    model = resnext3d_tiny(num_classes=51)
    fresh_fc = model.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrained"):
        report = load_resnext3d_checkpoint(model, path)
    assert sorted(report.mismatched) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.fc.weight, fresh_fc)
    assert torch.equal(model.layer4[0].conv2.weight, source["layer4.0.conv2.weight"])
    assert report.missing == [] and report.unexpected == []
    assert "fc.weight" in caplog.text and "(400, 128)" in caplog.text


def test_hara_rgb_checkpoint_inflates_conv1_for_flow(tmp_path) -> None:
    path, source = _hara_checkpoint(tmp_path)
    model = resnext3d_tiny(in_channels=2, num_classes=400)
    report = load_resnext3d_checkpoint(model, path)
    rgb = source["conv1.weight"]  # (8, 3, 7, 7, 7)
    assert model.conv1.weight.shape == (8, 2, 7, 7, 7)
    for channel in range(2):
        torch.testing.assert_close(model.conv1.weight[:, channel], rgb.mean(dim=1))
    assert "conv1.weight" in report.loaded and report.mismatched == []


def test_bare_state_dict_and_misfits_are_reported(tmp_path) -> None:
    state = resnext3d_tiny().state_dict()
    state["layer1.0.conv2.weight"] = torch.zeros(3, 3, 3, 3, 3)  # wrong shape
    state["layer9.0.conv1.weight"] = torch.zeros(1)  # no such module
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    report = load_resnext3d_checkpoint(resnext3d_tiny(), path)
    assert report.mismatched == ["layer1.0.conv2.weight"]
    assert report.unexpected == ["layer9.0.conv1.weight"]
    assert report.missing == []  # a misfit is reported once, as mismatched


def test_loading_is_weights_only(tmp_path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": resnext3d_tiny().state_dict(), "extra": LoadReport()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_resnext3d_checkpoint(resnext3d_tiny(), path)


# --- EfficientNet, torchvision's and timm's formats ------------------------------------------
# The foreign names are written out here independently of pipeline/pretrained.py.


def _to_torchvision(key: str, expands: set[tuple[int, int]]) -> str:
    key = re.sub(r"^stem\.conv\.", "features.0.0.", key)
    key = re.sub(r"^stem\.bn\.", "features.0.1.", key)
    key = re.sub(r"^head\.conv\.", "features.8.0.", key)
    key = re.sub(r"^head\.bn\.", "features.8.1.", key)
    key = re.sub(r"^classifier\.", "classifier.1.", key)
    match = re.match(r"^stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)\.(\w+)$", key)
    if match:
        s, b, part, sub, leaf = match.groups()
        offset = 1 if (int(s), int(b)) in expands else 0
        index = {"expand": 0, "depthwise": offset, "se": offset + 1, "project": offset + 2}[part]
        sub = {"conv": "0", "bn": "1", "reduce": "fc1", "expand": "fc2"}[sub]
        key = f"features.{int(s) + 1}.{b}.block.{index}.{sub}.{leaf}"
    return key


def _to_timm(key: str, expands: set[tuple[int, int]]) -> str:
    for mine, theirs in (("stem.conv", "conv_stem"), ("stem.bn", "bn1"),
                         ("head.conv", "conv_head"), ("head.bn", "bn2")):
        if key.startswith(mine + "."):
            return theirs + key[len(mine):]
    match = re.match(r"^stages\.(\d+)\.(\d+)\.(\w+\.\w+)\.(\w+)$", key)
    if match:
        s, b, part, leaf = match.groups()
        if (int(s), int(b)) in expands:  # InvertedResidual
            table = {"expand.conv": "conv_pw", "expand.bn": "bn1", "depthwise.conv": "conv_dw",
                     "depthwise.bn": "bn2", "project.conv": "conv_pwl", "project.bn": "bn3"}
        else:  # DepthwiseSeparableConv
            table = {"depthwise.conv": "conv_dw", "depthwise.bn": "bn1",
                     "project.conv": "conv_pw", "project.bn": "bn2"}
        table |= {"se.reduce": "se.conv_reduce", "se.expand": "se.conv_expand"}
        return f"blocks.{s}.{b}.{table[part]}.{leaf}"
    return key


_FOREIGN_SAMPLES = {
    "torchvision": ["features.0.0.weight", "features.1.0.block.0.0.weight",
                    "features.1.0.block.1.fc1.weight", "features.1.0.block.2.1.running_var",
                    "features.2.0.block.0.0.weight", "features.2.0.block.2.fc2.bias",
                    "features.2.0.block.3.1.running_mean", "features.8.1.weight",
                    "classifier.1.weight"],
    "timm": ["conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight",
             "blocks.0.0.se.conv_reduce.weight", "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.bias",
             "blocks.1.0.conv_pw.weight", "blocks.1.0.bn3.running_var",
             "blocks.1.0.conv_pwl.weight",
             "conv_head.weight", "bn2.weight", "classifier.bias"],
}


def _effnet_checkpoint(tmp_path, style: str, *, wrap: bool) -> tuple[str, dict[str, torch.Tensor]]:
    model = efficientnet_tiny(num_classes=1000)
    expands = {(s, b) for s, stage in enumerate(model.stages)
               for b, block in enumerate(stage) if block.expand is not None}
    rename = _to_torchvision if style == "torchvision" else _to_timm
    own = _randomised(model.state_dict())
    foreign = {rename(k, expands): v for k, v in own.items()}
    assert set(_FOREIGN_SAMPLES[style]) <= set(foreign)
    path = tmp_path / f"effnet_{style}.pth"
    torch.save({"state_dict": foreign} if wrap else foreign, path)
    return str(path), own


@pytest.mark.parametrize(("style", "wrap"), [("torchvision", False), ("timm", True)])
def test_efficientnet_formats_land_in_place(tmp_path, style, wrap) -> None:
    path, source = _effnet_checkpoint(tmp_path, style, wrap=wrap)
    model = efficientnet_tiny(num_classes=1000)
    report = load_efficientnet_checkpoint(model, path)
    own = model.state_dict()
    for key, tensor in source.items():
        assert torch.equal(own[key], tensor), key
    assert sorted(report.loaded) == sorted(source)
    assert report.missing == report.unexpected == report.mismatched == []


def test_efficientnet_rgb_weights_into_a_flow_stream(tmp_path) -> None:
    path, source = _effnet_checkpoint(tmp_path, "torchvision", wrap=False)
    stream = mat_effnet_tiny(in_channels=20, num_classes=101)
    report = load_efficientnet_checkpoint(stream, path)
    stem = stream.backbone.stem.conv.weight
    assert stem.shape == (8, 20, 3, 3)
    expected = source["stem.conv.weight"].mean(dim=1, keepdim=True).expand(-1, 20, -1, -1)
    torch.testing.assert_close(stem, expected)
    # The stream's backbone is headless: the ImageNet classifier has nowhere to go.
    assert sorted(report.unexpected) == ["classifier.1.bias", "classifier.1.weight"]
    assert torch.equal(stream.backbone.head.bn.running_var, source["head.bn.running_var"])


def test_efficientnet_unknown_naming_is_refused(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"backbone.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="unrecognised"):
        load_efficientnet_checkpoint(efficientnet_tiny(), path)


def test_inflate_first_conv_averages_and_repeats() -> None:
    rgb = torch.tensor([[1.0, 2.0, 6.0], [0.0, -3.0, 3.0]]).view(2, 3, 1, 1)
    flow = inflate_first_conv(rgb, 4)
    assert flow.shape == (2, 4, 1, 1)
    torch.testing.assert_close(flow[:, :, 0, 0], torch.tensor([[3.0] * 4, [0.0] * 4]))
    video = torch.randn(5, 3, 3, 3, 3)
    assert inflate_first_conv(video, 2).shape == (5, 2, 3, 3, 3)
