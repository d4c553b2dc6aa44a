"""Where everything lives under DATA: the one place that defines the on-disk layout.

    DATA/frames/<class>/<video>/img_00001.jpg                 256x256 JPEG, all frames, 1-based
    DATA/flow/<class>/<video>/flow_x_00001.jpg, flow_y_...    N-1 TV-L1 pairs per video
    DATA/shards/shard_00000.h5                                HDF5 shards of whole videos
    DATA/features/...                                         cached frozen-teacher features
    DATA/runs/<name>/                                         training runs
    DATA/meta/index.json                                      the dataset index (labels, splits)
    DATA/meta/<stage>.params.json                             parameters that shaped a stage
    DATA/meta/<stage>.ledger.jsonl                            one record per video: done/failed
    DATA/meta/<stage>.lock                                    held while a stage runs
    DATA/show/<class>__<video>.png                            `pipeline show`: frames beside flow

The naming (`img_00001.jpg`, `flow_x_00001.jpg`) is the one mmaction2 and denseflow users know.
A video id is "<class>/<video stem>"; it is also its relative folder under frames/ and flow/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FRAME_PATTERN = "img_{:05d}.jpg"
FLOW_X_PATTERN = "flow_x_{:05d}.jpg"
FLOW_Y_PATTERN = "flow_y_{:05d}.jpg"
SHARD_PATTERN = "shard_{:05d}.h5"


def frame_name(k: int) -> str:
    """File name of frame k (1-based)."""
    return FRAME_PATTERN.format(k)


def flow_names(k: int) -> tuple[str, str]:
    """File names of flow pair k (1-based: from frame k to frame k+1)."""
    return FLOW_X_PATTERN.format(k), FLOW_Y_PATTERN.format(k)


@dataclass(frozen=True)
class DataLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def flow_dir(self) -> Path:
        return self.root / "flow"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    @property
    def index_path(self) -> Path:
        return self.meta_dir / "index.json"

    def stage_output_dir(self, stage: str) -> Path:
        return {"frames": self.frames_dir, "flow": self.flow_dir, "shards": self.shards_dir,
                "teacher-features": self.features_dir}[stage]

    def params_path(self, stage: str) -> Path:
        return self.meta_dir / f"{stage}.params.json"

    def ledger_path(self, stage: str) -> Path:
        return self.meta_dir / f"{stage}.ledger.jsonl"

    def lock_path(self, stage: str) -> Path:
        return self.meta_dir / f"{stage}.lock"

    def frames_video_dir(self, video_id: str) -> Path:
        return self.frames_dir / video_id

    def flow_video_dir(self, video_id: str) -> Path:
        return self.flow_dir / video_id

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name

    @property
    def show_dir(self) -> Path:
        return self.root / "show"

    def show_path(self, video_id: str) -> Path:
        """The `pipeline show` picture of a video: its id with "/" replaced by "__"."""
        return self.show_dir / (video_id.replace("/", "__") + ".png")
