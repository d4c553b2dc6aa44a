"""`pipeline demo` end to end at toy sizes: every step runs, a rerun redoes nothing."""
from __future__ import annotations

import pytest

from pipeline.demo import DemoConfig, DemoRun, load_demo_config, run_demo

TOY = DemoConfig(classes=("FallFast", "RiseFast", "SlideFast"), videos_per_class=6, frames=8,
                 frame_size=32, clip_len=4, crop=24, mat_crop=24, segments=2, stride=2,
                 workers=0,
                 teacher=DemoRun(2, 4, 0.05), distill=DemoRun(1, 4, 0.05),
                 rgb=DemoRun(1, 4, 0.05), spatial=DemoRun(1, 4, 0.01),
                 temporal=DemoRun(1, 4, 0.01))


def test_demo_chain_runs_every_step_and_a_rerun_redoes_nothing(tmp_path):
    data, videos = tmp_path / "data", tmp_path / "videos"
    logs: list[str] = []
    rows = run_demo(data, videos, jobs=2, cfg=TOY, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert [r.model for r in rows] == [
        "Flow teacher (3D-ResNeXt+CE)", "RGB-only (3D-ResNeXt+CE)", "IMRS (distilled RGB)",
        "MAT-EffNet spatial", "MAT-EffNet temporal", "MAT-EffNet fused (spatial+temporal)",
        "IMRS + flow teacher"]
    assert all(r.videos == 6 for r in rows)                # split 1 tests 1 group of 2 x 3
    assert "| IMRS (distilled RGB) | distill_split1 | 1 |" in text
    assert "RGB-only" in text and "(chance " in text and (data / "runs" / "results.md").exists()
    logs.clear()
    run_demo(data, videos, jobs=2, cfg=TOY, progress=False, log=logs.append)
    text = "\n".join(logs)
    for stage in ("frames", "flow", "shards"):
        assert f"{stage}: 18/18 done (0 now, 18 already), 0 failed" in text
    assert "teacher-features: 12/12 done (0 now, 12 already)" in text
    assert text.count("already trained") == 5


def test_demo_config_toml_overrides_keys_and_run_tables(tmp_path):
    f = tmp_path / "demo.toml"
    f.write_text('frame_size = 64\nclasses = ["FallFast", "RiseFast"]\n'
                 '[teacher]\nepochs = 3\n[rgb]\nlr = 0.2\n')
    cfg = load_demo_config(f)
    assert (cfg.frame_size, cfg.classes, cfg.teacher.epochs, cfg.rgb.lr) == (
        64, ("FallFast", "RiseFast"), 3, 0.2)
    assert cfg.train_config("teacher").epochs == 3 and cfg.train_config("rgb").lr == 0.2
    assert cfg.train_config("spatial").arch == "tiny"
    f.write_text("[teacher]\nepoch = 3\n")
    with pytest.raises(ValueError, match=r"\[teacher\]: unknown key"):
        load_demo_config(f)
    assert load_demo_config(None) == DemoConfig()
