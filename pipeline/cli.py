"""The `pipeline` command: one click command per stage, each a few lines over importable functions."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from preprocess.layout import DataLayout
from preprocess.ledger import ParamsMismatch, StageLocked
from preprocess.runner import DataNotWritable, StageSummary, StorageFull

DATA_OPTION = click.option("--data", "data", required=True,
                           type=click.Path(file_okay=False, path_type=Path),
                           help="The dataset's working folder (frames/, flow/, shards/, runs/ ...).")
JOBS_OPTION = click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
                           help="Videos processed in parallel (one OpenCV thread each).")
FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Redo the stage with new parameters, deleting its outputs.")


def clear_errors(fn):
    """Turn the pipeline's expected errors into one clear line (click's exit status 1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ParamsMismatch, StageLocked, DataNotWritable, StorageFull, FileNotFoundError,
                ValueError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def finish(summary: StageSummary) -> None:
    """Print the stage summary; a non-zero exit status when any video failed."""
    click.echo(summary.report())
    if not summary.ok:
        click.echo("(rerun the same command to retry only the failed videos)")
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def cli():
    """Two-stream action recognition: videos -> frames -> flow -> shards -> training."""


@cli.command("demo-data")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to create (UCF101 layout, split files in OUT/splits).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Same seed, byte-identical videos.")
@clear_errors
def demo_data(out: Path, seed: int):
    """Write the demo dataset: small videos whose classes differ only in motion."""
    from preprocess.demo_data import generate_demo_dataset
    click.echo(str(generate_demo_dataset(out, seed=seed)))


@cli.command("frames")
@click.option("--videos", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of videos: <class>/<video>.<ext> (UCF101 and HMDB51 archives as is).")
@DATA_OPTION
@click.option("--dataset", default="folders", show_default=True,
              type=click.Choice(["folders", "ucf101", "hmdb51"]),
              help="Layout of labels and splits (see preprocess/dataset_index.py).")
@click.option("--splits", default=None, type=click.Path(exists=True, file_okay=False,
                                                        path_type=Path),
              help="Folder of the official split files [default: VIDEOS or VIDEOS/splits].")
@click.option("--size", default=256, show_default=True, type=click.IntRange(1),
              help="Frame size: SIZE x SIZE (squash) or short side (short-side).")
@click.option("--resize", default="squash", show_default=True,
              type=click.Choice(["squash", "short-side"]),
              help="squash: IMRS's 256x256, aspect ignored; short-side: aspect kept.")
@click.option("--jpeg-quality", default=95, show_default=True, type=click.IntRange(1, 100))
@JOBS_OPTION
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask.distributed scheduler to run the videos on.")
@FORCE_OPTION
@clear_errors
def frames(videos: Path, data: Path, dataset: str, splits: Path | None, size: int, resize: str,
           jpeg_quality: int, jobs: int, scheduler: str | None, force: bool):
    """Decode every frame of every video to DATA/frames/<class>/<video>/img_00001.jpg ..."""
    from preprocess.frames import extract_frames
    finish(extract_frames(videos, data, dataset=dataset, splits=splits, jobs=jobs, size=size,
                          resize=resize, jpeg_quality=jpeg_quality, force=force,
                          scheduler=scheduler))


@cli.command("flow")
@DATA_OPTION
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "opencv", "opencv-cuda", "torch"]),
              help="TV-L1 implementation; auto: torch on a CUDA machine, else opencv-cuda if "
                   "OpenCV has CUDA, else opencv (CPU, the reference).")
@JOBS_OPTION
@click.option("--jpeg-quality", default=95, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality of the flow_x/flow_y images (a recorded parameter).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask.distributed scheduler to run the videos on (opencv backends).")
@FORCE_OPTION
@clear_errors
def flow(data: Path, backend: str, jobs: int, jpeg_quality: int, scheduler: str | None,
         force: bool):
    """TV-L1 flow between consecutive frames: DATA/flow/<class>/<video>/flow_{x,y}_00001.jpg.

    With --backend torch, --jobs is the JPEG decode/encode threads per GPU (every visible GPU
    is used, one worker process each).
    """
    from preprocess.flow import compute_flow
    finish(compute_flow(data, backend=backend, jobs=jobs, jpeg_quality=jpeg_quality,
                        force=force, scheduler=scheduler))


@cli.command("show")
@DATA_OPTION
@click.argument("video")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write [default: DATA/show/<class>__<video>.png].")
@click.option("--rows", default=4, show_default=True, type=click.IntRange(1, 32),
              help="How many flows (evenly spaced through the video) to show.")
@clear_errors
def show(data: Path, video: str, out: Path | None, rows: int):
    """A PNG of a few frames of VIDEO (an id like Class/v_x) beside their flow."""
    from preprocess.flow_show import show as write_show
    click.echo(str(write_show(data, video, out=out, rows=rows)))


@cli.command("shards")
@DATA_OPTION
@click.option("--shard-size", default="1GiB", show_default=True,
              help="Bound on a shard's JPEG bytes (1GiB, 200MB, ...); a larger video gets a "
                   "shard of its own.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
              help="Shards written in parallel.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask.distributed scheduler to write the shards on.")
@FORCE_OPTION
@clear_errors
def shards(data: Path, shard_size: str, jobs: int, scheduler: str | None, force: bool):
    """Pack each video's frame and flow JPEGs (as they are) into DATA/shards/shard_00000.h5 ..."""
    from preprocess.shards import build_shards, parse_size
    finish(build_shards(data, shard_bytes=parse_size(shard_size), jobs=jobs, force=force,
                        scheduler=scheduler))


@cli.command("verify")
@DATA_OPTION
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1),
              help="Shards checked in parallel.")
@clear_errors
def verify(data: Path, jobs: int):
    """Check every shard (checksums, counts, every JPEG decodes); exit 1 naming any damage."""
    from preprocess.shards import verify as verify_shards
    report = verify_shards(data, jobs=jobs)
    click.echo(report.report())
    if not report.ok:
        sys.exit(1)


@cli.command("status")
@DATA_OPTION
@click.option("--max-failures", default=20, show_default=True, type=click.IntRange(0),
              help="Failed videos listed per stage (all are in DATA/meta/<stage>.ledger.jsonl).")
@clear_errors
def status(data: Path, max_failures: int):
    """Per stage: how many videos are done, failed (with reasons) and pending."""
    click.echo(status_report(DataLayout(data), max_failures=max_failures))


STATUS_STAGES = ("frames", "flow", "shards")


def status_report(layout: DataLayout, *, max_failures: int = 20) -> str:
    """The text of `pipeline status`: the index, then a table of stages, then the failures."""
    from preprocess.dataset_index import DatasetIndex
    from preprocess.runner import stage_status
    if not layout.index_path.is_file():
        raise FileNotFoundError(f"{layout.root} has no dataset index ({layout.index_path}); "
                                f"run `pipeline frames` first")
    index = DatasetIndex.load(layout.index_path)
    items = [v.video_id for v in index.videos]
    extra = sorted(p.name[:-len(".ledger.jsonl")] for p in layout.meta_dir.glob("*.ledger.jsonl"))
    stages = list(STATUS_STAGES) + [s for s in extra if s not in STATUS_STAGES]
    lines = [f"{layout.root}: {index.dataset} dataset, {len(items)} videos in "
             f"{len(index.classes)} classes from {index.videos_root}"
             + (f" ({len(index.missing)} listed but missing)" if index.missing else ""),
             f"{'stage':<18}{'done':>8}{'failed':>8}{'pending':>9}"]
    failures = []
    for stage in stages:
        st = stage_status(layout, stage, items)
        note = "" if st["started"] else "  (not started)"
        lines.append(f"{stage:<18}{st['done']:>8}{len(st['failed']):>8}{st['pending']:>9}{note}")
        for n, (item, reason) in enumerate(sorted(st["failed"].items())):
            if n == max_failures:
                failures.append(f"  {stage}: ... and {len(st['failed']) - n} more in "
                                f"{layout.ledger_path(stage)}")
                break
            failures.append(f"  {stage} FAILED {item}: {reason}")
    return "\n".join(lines + (["failed videos:"] + failures if failures else []))


# --- training, teacher features, evaluation, demo (pipeline/train.py, features.py, evaluate.py)

def _train_options(fn):
    """Options shared by the training commands; None means: from --config, else the paper."""
    opts = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                                 path_type=Path),
                     help="TOML file of TrainConfig keys (pipeline/config.py); unknown keys "
                          "are an error."),
        click.option("--name", help="Run folder DATA/runs/NAME [default: <kind>_split<N>]."),
        click.option("--split", type=click.IntRange(1, 3), help="Official split [1]."),
        click.option("--epochs", type=click.IntRange(1)),
        click.option("--batch-size", type=click.IntRange(1),
                     help="Global batch, divided between torchrun processes."),
        click.option("--lr", type=float,
                     help="[0.1 from scratch, 0.001 with --pretrained; MAT-EffNet 0.01]"),
        click.option("--workers", type=click.IntRange(0), help="DataLoader workers [4]."),
        click.option("--device", help="auto | cpu | cuda | cuda:N [auto]."),
        click.option("--pretrained", type=click.Path(exists=True, dir_okay=False),
                     help="Local checkpoint to fine-tune from (pipeline/pretrained.py)."),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="Deterministic algorithms: a resumed run equals an uninterrupted one."),
        click.option("--seed", type=int),
        click.option("--amp", type=click.Choice(["auto", "bf16", "tf32", "off"]),
                     help="Precision on CUDA: bf16 autocast, TF32 or strict fp32 (off) "
                          "[auto: bf16 on CUDA, fp32 on CPU]."),
        click.option("--compile/--no-compile", "compile", default=None,
                     help="torch.compile the network: slower start, faster steps [off]."),
        click.option("--checkpoint-every", type=click.IntRange(1),
                     help="Steps between mid-epoch checkpoints [200]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return DATA_OPTION(fn)


def _run_training(kind: str, data: Path, config_file: Path | None, feature_spec=None, **options):
    from pipeline.config import load_train_config
    from pipeline.train import SIGTERM_EXIT, Interrupted, train_run
    cfg = load_train_config(kind, config_file=config_file, options=options)
    try:
        train_run(data, cfg, feature_spec=feature_spec)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(SIGTERM_EXIT)


@cli.command("train-teacher")
@_train_options
@click.option("--arch", type=click.Choice(["101", "50", "tiny"]), help="3D-ResNeXt depth [101].")
@clear_errors
def train_teacher(data: Path, config_file: Path | None, **options):
    """The flow teacher: 3D-ResNeXt+CE on TV-L1 flow clips, cross-entropy (seed 000 eq. 7).

    Rerunning resumes from DATA/runs/NAME/checkpoint.pt. Multi-GPU: torchrun --nproc_per_node
    N $(which pipeline) train-teacher ...
    """
    _run_training("teacher", data, config_file, **options)


@cli.command("train-rgb")
@_train_options
@click.option("--arch", type=click.Choice(["101", "50", "tiny"]), help="3D-ResNeXt depth [101].")
@clear_errors
def train_rgb(data: Path, config_file: Path | None, **options):
    """The RGB-only baseline: the teacher's network and loss on RGB clips."""
    _run_training("rgb", data, config_file, **options)


@cli.command("teacher-features")
@DATA_OPTION
@click.option("--teacher", default="teacher_split1", show_default=True,
              help="The teacher run (DATA/runs/TEACHER/model.pt).")
@click.option("--stride", default=8, show_default=True, type=click.IntRange(1),
              help="Frames between the starts of cached windows.")
@click.option("--subset", default="train", show_default=True,
              type=click.Choice(["train", "test", "all"]),
              help="Videos of the teacher's split to cache.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0))
@click.option("--device", default="auto", show_default=True)
@click.option("--amp", default="off", show_default=True, type=click.Choice(["off", "bf16"]))
@clear_errors
def teacher_features(data: Path, teacher: str, stride: int, subset: str, batch_size: int,
                     workers: int, device: str, amp: str):
    """Cache the frozen teacher's features over windows x (5 crops x 2 flips) in DATA/features."""
    from pipeline.config import FeatureConfig
    from pipeline.features import compute_teacher_features
    spec = FeatureConfig(stride=stride, subset=subset, batch_size=batch_size, workers=workers,
                         device=device, amp=amp)
    summary = compute_teacher_features(data, teacher=teacher, spec=spec)
    click.echo(f"cache: {summary.cache}")
    finish(summary)


@cli.command("distill")
@_train_options
@click.option("--arch", type=click.Choice(["101", "50", "tiny"]),
              help="The student's 3D-ResNeXt depth (the teacher's, for eq. 8) [101].")
@click.option("--teacher", help="Teacher run [teacher_split<N>].")
@click.option("--online-teacher", is_flag=True, default=None,
              help="Run the teacher on flow during training instead of reading the cache.")
@click.option("--lambda1", type=float, help="Feature-distance weight [50].")
@click.option("--lambda2", type=float, help="KL weight [200].")
@click.option("--stride", default=None, type=click.IntRange(1),
              help="Window stride of the grid: selects the cache made with it [default: the "
                   "newest valid cache of the teacher; 8 with --online-teacher].")
@clear_errors
def distill(data: Path, config_file: Path | None, stride: int | None, **options):
    """IMRS: an RGB student distilled from cached flow-teacher features (seed 000, eq 8)."""
    from pipeline.config import FeatureConfig
    spec = FeatureConfig(stride=stride) if stride else None
    _run_training("distill", data, config_file, feature_spec=spec, **options)


@cli.command("train-two-stream")
@_train_options
@click.option("--stream", default="both", show_default=True,
              type=click.Choice(["spatial", "temporal", "both"]))
@click.option("--arch", type=click.Choice(["b0", "tiny"]), help="EfficientNet [b0].")
@click.option("--segments", type=click.IntRange(1), help="Segments L per video [3].")
@click.option("--dropout", type=float, help="[0.2]")
@clear_errors
def train_two_stream(data: Path, config_file: Path | None, stream: str, name: str | None,
                     **options):
    """MAT-EffNet spatial (RGB) and/or temporal (10 stacked flows) streams (seed 004)."""
    for kind in (("spatial", "temporal") if stream == "both" else (stream,)):
        _run_training(kind, data, config_file, name=f"{name}_{kind}" if name else None,
                      **options)


@cli.command("evaluate")
@DATA_OPTION
@click.option("--run", "runs", multiple=True, help="Run to score [default: every finished run].")
@click.option("--fuse", "fusions", multiple=True, metavar="A+B",
              help="Average the softmax scores of runs A and B [default: spatial+temporal and "
                   "distill+teacher of each split].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0))
@click.option("--device", default="auto", show_default=True)
@clear_errors
def evaluate_cmd(data: Path, runs: tuple[str, ...], fusions: tuple[str, ...], batch_size: int,
                 workers: int, device: str):
    """Video-level top-1/top-5 per run and fusion: DATA/runs/results.md, .csv and PNGs."""
    from pipeline.evaluate import EvalConfig, evaluate
    evaluate(data, runs=runs or None, fusions=fusions or None,
             cfg=EvalConfig(batch_size=batch_size, workers=workers, device=device))


@cli.command("demo")
@DATA_OPTION
@click.option("--videos", default=Path("data/demo_videos"), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the demo videos are generated (kept if already there).")
@JOBS_OPTION
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="TOML overriding DemoConfig (pipeline/demo.py).")
@clear_errors
def demo(data: Path, videos: Path, jobs: int, config_file: Path | None):
    """The whole chain on the demo dataset; rerun after a crash to finish what is left."""
    from pipeline.demo import load_demo_config, run_demo
    from pipeline.train import SIGTERM_EXIT, Interrupted
    try:
        run_demo(data, videos, jobs=jobs, cfg=load_demo_config(config_file))
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(SIGTERM_EXIT)


def main():
    cli()


if __name__ == "__main__":
    main()
