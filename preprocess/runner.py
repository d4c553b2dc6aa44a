"""Run one stage over many videos: joblib workers, the ledger, the lock, progress and summary.

Every stage (frames, flow, shards) hands this module its items and a picklable per-item
function. The parent alone writes the ledger, one record per finished item, so a kill loses at
most the items in flight; a rerun redoes exactly the items not recorded as done.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from .atomic import clean_stale_temps, remove_published
from .layout import DataLayout
from .ledger import DONE, FAILED, Ledger, Record, StageLock, check_params


class DataNotWritable(RuntimeError):
    """DATA (or a folder in it) cannot be written: said at start, before any work."""


class StorageFull(RuntimeError):
    """The disk filled up (or became read-only) mid-stage: no later video could succeed either."""


# Errors of the storage, not of the video: the stage stops instead of failing every video.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
FATAL = "fatal"


@dataclass
class StageSummary:
    stage: str
    total: int
    done_now: int = 0
    already_done: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        done = self.done_now + self.already_done
        return (f"{self.stage}: {done}/{self.total} done ({self.done_now} now, "
                f"{self.already_done} already), {len(self.failed)} failed")

    def report(self) -> str:
        lines = [self.line()]
        for item, reason in sorted(self.failed.items()):
            lines.append(f"  FAILED {item}: {reason}")
        return "\n".join(lines)


def ensure_writable(path: Path) -> None:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataNotWritable(f"cannot create {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataNotWritable(f"{path} is not writable")


def _limit_threads() -> None:
    """One OpenCV/torch thread per worker: parallelism comes from the workers."""
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


_DIES_WITH_PARENT = False


def _die_with_parent(parent: int | None) -> None:
    """In a local worker process, be SIGKILLed when the stage's process dies.

    Without this, a worker orphaned by `kill -9` of the stage finishes its video and publishes
    it while the rerun is redoing the same video (a race on the final name). Only direct
    children of the stage's process are affected: in-process runs and cluster workers are not.
    """
    global _DIES_WITH_PARENT
    if _DIES_WITH_PARENT or parent is None or os.getpid() == parent:
        return
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    _DIES_WITH_PARENT = True
    if os.getppid() != parent:  # the parent died before prctl took effect, or before this
        os._exit(1)             # task (dispatched ahead) reached this worker: do not run it


def _run_one(work: Callable[[str], dict], item: str, parent: int | None = None) -> Record:
    _die_with_parent(parent)
    _limit_threads()
    try:
        info = work(item) or {}
        return Record(item, DONE, "", info)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            return Record(item, FATAL, f"{e.strerror} while writing {e.filename or item}")
        return Record(item, FAILED, f"{type(e).__name__}: {e}")
    except Exception as e:  # recorded per item, summarised, reflected in the exit status
        msg = str(e).strip() or repr(e)
        return Record(item, FAILED, f"{type(e).__name__}: {msg}")


def run_stage(stage: str, layout: DataLayout, items: Sequence[str],
              work: Callable[[str], dict], params: dict, *, jobs: int = 1, force: bool = False,
              known_failures: Mapping[str, str] | None = None,
              published: Callable[[str], bool] | None = None,
              progress: bool = True, scheduler: str | None = None) -> StageSummary:
    """Run `work(item)` for every item not yet done; return the summary.

    `params` are recorded with the outputs and must match on reruns unless `force` (which
    deletes the stage's outputs first). `known_failures` are items that fail before any work
    (a listed video missing on disk). `published(item)` lets the stage say that a ledger "done"
    is stale because its output is gone; such items are redone. `scheduler` is the address of
    a dask.distributed scheduler: the items then run as tasks on that cluster (joblib's Dask
    backend), writing to the shared filesystem, while this process alone keeps the ledger.
    """
    ensure_writable(layout.root)
    ensure_writable(layout.meta_dir)
    out_dir = layout.stage_output_dir(stage)
    with StageLock(layout.lock_path(stage), stage):
        ledger = Ledger(layout.ledger_path(stage))
        if check_params(layout.params_path(stage), stage, params, force=force):
            remove_published(out_dir)
            ledger.reset()
        ensure_writable(out_dir)
        clean_stale_temps(out_dir, max_depth=2)  # temporaries are <class>/.tmp-<video>

        records = ledger.load()
        summary = StageSummary(stage, total=len(items) + len(known_failures or {}))
        upfront = [Record(i, FAILED, r) for i, r in (known_failures or {}).items()]
        ledger.append([r for r in upfront if records.get(r.item) != r])  # only what changed
        summary.failed.update({r.item: r.reason for r in upfront})

        todo = []
        for item in items:
            rec = records.get(item)
            if rec is not None and rec.status == DONE and (published is None or published(item)):
                summary.already_done += 1
            else:
                todo.append(item)

        bar = tqdm(total=len(todo), desc=stage, unit="video", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            if todo:
                parent = None if scheduler else os.getpid()  # cluster workers: no parent
                results = run_parallel(_run_one, [(work, i, parent) for i in todo], jobs=jobs,
                                       scheduler=scheduler)
                for rec in results:
                    if rec.status == FATAL:  # left pending; the temporary output is gone
                        raise StorageFull(f"{stage}: {rec.reason} (under {out_dir}); "
                                          f"{summary.done_now} videos finished before it. "
                                          f"Free space and rerun.")
                    ledger.append([rec])
                    if rec.status == DONE:
                        summary.done_now += 1
                    else:
                        summary.failed[rec.item] = rec.reason
                    bar.update(1)
        finally:
            bar.close()
        return summary


def run_parallel(fn: Callable, calls: Sequence[tuple], *, jobs: int = 1,
                 scheduler: str | None = None) -> Iterator:
    """Yield `fn(*args)` for each args in `calls`, in completion order: on `jobs` local joblib
    workers, or as tasks on the dask.distributed scheduler at `scheduler`."""
    with ExitStack() as stack:
        if scheduler:
            stack.enter_context(dask_client(scheduler))
            stack.enter_context(parallel_config(backend="dask"))
            n_jobs = -1
        else:
            n_jobs = max(1, min(jobs, len(calls)))
        yield from Parallel(n_jobs=n_jobs, return_as="generator_unordered", batch_size=1)(
            delayed(fn)(*args) for args in calls)


def dask_client(address: str):
    """A client of the dask.distributed scheduler at `address` (the optional `cluster` extra)."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise RuntimeError("--scheduler needs dask.distributed: pip install '.[cluster]'") from None
    return Client(address)


def stage_status(layout: DataLayout, stage: str, items: Sequence[str]) -> dict:
    """Done, failed (with reasons) and pending counts for a stage, from its ledger."""
    records = Ledger(layout.ledger_path(stage)).load()
    done, failed, pending = 0, {}, 0
    seen = set(items)
    for item in items:
        rec = records.get(item)
        if rec is None:
            pending += 1
        elif rec.status == DONE:
            done += 1
        else:
            failed[item] = rec.reason
    for item, rec in records.items():  # failures of items outside the index (missing videos)
        if item not in seen and rec.status == FAILED:
            failed[item] = rec.reason
    return {"stage": stage, "done": done, "failed": failed, "pending": pending,
            "started": layout.params_path(stage).exists()}
