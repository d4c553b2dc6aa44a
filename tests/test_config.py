"""Training configs: the papers' defaults, TOML overrides, unknown keys, option precedence."""
from __future__ import annotations

import json

import pytest

from pipeline.config import (TrainConfig, apply_overrides, config_diff, config_from_dict,
                             dump_json, load_train_config)


def test_defaults_are_seed_000_section_4_2_2():
    cfg = load_train_config("teacher")
    assert (cfg.arch, cfg.excitation, cfg.epochs, cfg.batch_size) == ("101", "ce", 80, 32)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.plateau_patience, cfg.plateau_factor) == (10, 0.1)
    assert (cfg.clip_len, cfg.crop, cfg.modality, cfg.name) == (16, 112, "flow", "teacher_split1")
    assert load_train_config("rgb").modality == "rgb"
    d = load_train_config("distill")
    assert (d.lambda1, d.lambda2, d.teacher, d.online_teacher) == (50.0, 200.0, "teacher_split1",
                                                                   False)


def test_finetuning_from_a_pretrained_file_uses_lr_0_001(tmp_path):
    cfg = load_train_config("rgb", options={"pretrained": str(tmp_path / "k400.pth")})
    assert cfg.lr == 0.001
    assert load_train_config("rgb", options={"pretrained": "x.pth", "lr": 0.01}).lr == 0.01


def test_two_stream_defaults_are_seed_004_section_4_2():
    for kind in ("spatial", "temporal"):
        cfg = load_train_config(kind)
        assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.dropout, cfg.crop) == ("b0", 16, 1e-2,
                                                                             0.2, 224)
    assert load_train_config("temporal").modality == "flow"


def test_toml_overrides_then_options_win(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('arch = "tiny"\nepochs = 3\nbatch_size = 4\nlr = 0.05\nexcitation = "se"\n')
    cfg = load_train_config("teacher", config_file=f, options={"epochs": 5, "lr": None})
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.excitation) == ("tiny", 5, 4,
                                                                              0.05, "se")
    # an integer arch in TOML (arch = 50) is read as the string it names
    f.write_text("arch = 50\n")
    assert load_train_config("rgb", config_file=f).arch == "50"


def test_unknown_keys_and_bad_values_are_errors_naming_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*unknown key.*learning_rate"):
        load_train_config("teacher", config_file=f)
    f.write_text('epochs = "many"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: epochs = 'many'"):
        load_train_config("teacher", config_file=f)
    f.write_text("epochs = [\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_train_config("teacher", config_file=f)
    f.write_text('kind = "rgb"\n')
    with pytest.raises(ValueError, match="trains 'teacher'"):
        load_train_config("teacher", config_file=f)
    with pytest.raises(ValueError, match="arch for spatial"):
        load_train_config("spatial", options={"arch": "101"})
    with pytest.raises(ValueError, match="split must be"):
        load_train_config("teacher", options={"split": 4})


def test_resolved_config_round_trips_through_json_and_diffs_ignore_runtime_fields():
    cfg = load_train_config("distill", options={"arch": "tiny", "workers": 0})
    back = config_from_dict(json.loads(dump_json(cfg)))
    assert back == cfg
    assert config_diff(cfg, apply_overrides(cfg, {"workers": 8, "device": "cpu"}, "x")) == []
    diffs = config_diff(cfg, apply_overrides(cfg, {"lr": 0.5}, "x"))
    assert diffs == ["lr: recorded 0.1, now 0.5"]
    assert TrainConfig().to_dict()["kind"] == "teacher"
