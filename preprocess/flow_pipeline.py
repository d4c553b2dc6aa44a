"""The torch flow backend as a whole-stage pipeline: keep every GPU busy (issue 8, items 3-5).

One video per worker would leave a GPU idle while its worker decodes and encodes JPEGs, so the
torch backend runs, per device, a pipeline that batches pairs across videos:

    decode threads --chunks--> device thread --uint8 flow--> encode threads --> publish
    (cv2.imdecode,             (one tvl1_flow call on a     (cv2.imencode into the video's
     BGR2GRAY; releases         batch of pairs from many     temporary folder; the last chunk
     the GIL)                   videos, quantized on the     of a video publishes it atomically)
                                device)

A video's pairs are streamed in chunks of `chunk_pairs`, and at most `chunks_in_flight` chunks
exist at once, so host and device memory stay bounded whatever the video's length (a 10-minute
video is just more chunks). The batch size halves when the device runs out of memory.

With one device the pipeline runs in this process; with several, one spawned worker process per
device, each fed videos by the parent (least-loaded first). Either way the stage itself is
`run_stage` with joblib's threading backend: each of its threads hands one video to the
pipeline and waits for it to be published, so the parent writes the ledger as each video
completes, exactly as for the other backends. Worker processes die with the parent
(PR_SET_PDEATHSIG), so a killed stage leaves nothing running that could race its rerun.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from joblib import parallel_config

from .atomic import publishing_dir
from .flow import check_same_size, published_info, read_gray, write_flow_pair
from .flow_quant import quantize
from .layout import DataLayout, frame_name
from .runner import StageSummary, run_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes of one device's pipeline. Memory: chunks_in_flight x (chunk_pairs + 1) frames."""
    batch_pairs: int = 256        # pairs per tvl1_flow call (halved on out-of-memory)
    chunk_pairs: int = 32         # a video's pairs travel in chunks of at most this many
    chunks_in_flight: int = 48    # decoded, computing or being written, per device
    io_threads: int = 4           # decode threads and, as many again, encode threads
    videos_in_flight: int = 64    # videos handed to one device at once (stage threads)
    jpeg_quality: int = 95


def default_devices() -> list[str]:
    import torch
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


class _Video:
    """A video in flight: its temporary folder, how many chunks are still out, its first error."""

    def __init__(self, final: Path, frames_dir: Path, n_frames: int, n_chunks: int,
                 future: Future):
        self.final, self.frames_dir, self.n_frames = final, frames_dir, n_frames
        self.future = future
        self._publish = publishing_dir(final)
        self.tmp = self._publish.__enter__()
        self._lock = threading.Lock()
        self._remaining = n_chunks
        self.error: BaseException | None = None
        self._shape: tuple[int, ...] | None = None

    def check_shape(self, path: Path, img: np.ndarray) -> None:
        """Every frame of a video must have one size (chunks are decoded in parallel)."""
        with self._lock:
            if self._shape is None:
                self._shape = img.shape
        check_same_size(path, img, self._shape)

    def chunk_finished(self, error: BaseException | None = None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        e = self.error
        if e is not None:
            self._publish.__exit__(type(e), e, e.__traceback__)  # removes the temporary folder
            self.future.set_exception(e)
            return
        try:
            self._publish.__exit__(None, None, None)  # fsync, then rename to the final name
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result({"frames": self.n_frames, "flows": max(self.n_frames - 1, 0)})


@dataclass
class _Chunk:
    video: _Video
    first: int              # the 1-based index of its first pair (= of its first frame)
    frames: np.ndarray      # (m + 1, H, W) uint8 grayscale: frames first .. first + m


_STOP = object()


def _out_of_memory_error() -> type:
    import torch
    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class DevicePipeline:
    """Decode, batched TV-L1 and encode for one device, in threads of this process."""

    def __init__(self, device: str, data: Path, cfg: PipelineConfig):
        import torch
        from .tvl1_torch import tvl1_flow
        self.device = torch.device(device)
        self.layout = DataLayout(data)
        self.cfg = cfg
        self._tvl1 = tvl1_flow
        self._batch = cfg.batch_pairs
        self._caps: dict[tuple[int, ...], int] = {}
        self.stats = {"pairs": 0, "batches": 0, "device_s": 0.0}  # device_s: inside tvl1 calls
        self._started = time.monotonic()
        self._chunk = max(1, min(cfg.chunk_pairs, cfg.batch_pairs))
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(cfg.chunks_in_flight)
        self._decode = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="flow-decode")
        self._encode = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="flow-encode")
        self._outstanding: set[Future] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._device_loop, name=f"flow-{device}",
                                        daemon=True)
        self._thread.start()

    # --- feeding ------------------------------------------------------------------------------
    def submit(self, video_id: str, n_frames: int) -> Future:
        """Start a video; the future gives its ledger info once it is published, or its error.

        Blocks while the pipeline is full (back-pressure on the stage's threads).
        """
        fut: Future = Future()
        final = self.layout.flow_video_dir(video_id)
        try:
            if final.is_dir():
                fut.set_result(published_info(final, n_frames))
                return fut
            starts = list(range(1, n_frames, self._chunk))
            video = _Video(final, self.layout.frames_video_dir(video_id), n_frames,
                           max(1, len(starts)), fut)
        except Exception as e:
            fut.set_exception(e)
            return fut
        with self._lock:
            self._outstanding.add(fut)
        fut.add_done_callback(self._forget)
        if not starts:  # one frame: an empty, published folder
            video.chunk_finished()
        for first in starts:
            last_frame = min(first + self._chunk, n_frames)
            self._slots.acquire()
            self._decode.submit(self._decode_chunk, video, first, last_frame)
        return fut

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._outstanding.discard(fut)

    def _decode_chunk(self, video: _Video, first: int, last_frame: int) -> None:
        try:
            if video.error is not None:
                raise video.error
            frames = []
            for k in range(first, last_frame + 1):
                path = video.frames_dir / frame_name(k)
                img = read_gray(path)
                video.check_shape(path, img)
                frames.append(img)
            self._ready.put(_Chunk(video, first, np.stack(frames)))
        except BaseException as e:
            self._done(video, e)

    def _done(self, video: _Video, error: BaseException | None = None) -> None:
        try:
            video.chunk_finished(error)
        finally:
            self._slots.release()

    # --- the device -----------------------------------------------------------------------------
    def _device_loop(self) -> None:
        if self.device.type == "cuda":  # the current device is per thread: this one's GPU
            import torch
            torch.cuda.set_device(self.device)
        pending: list[_Chunk] = []
        stop = False
        while not (stop and not pending):
            if not pending:
                item = self._ready.get()
                if item is _STOP:
                    stop = True
                    continue
                pending.append(item)
            stop = self._gather(pending) or stop
            batch, rest = self._take_batch(pending)
            pending = rest
            try:
                flows = self._flow_batch(batch)
            except Exception as e:  # every video of the batch fails with this reason
                for c in batch:
                    self._done(c.video, e)
                continue
            offset = 0
            for c in batch:
                m = len(c.frames) - 1
                self._encode.submit(self._write_chunk, c, flows[offset:offset + m])
                offset += m

    def _gather(self, pending: list[_Chunk]) -> bool:
        """Add what is ready, waiting briefly while less than a batch is; True at _STOP."""
        deadline_waits = 5
        while sum(len(c.frames) - 1 for c in pending) < self._batch:
            try:
                item = self._ready.get(timeout=0.01) if deadline_waits else \
                    self._ready.get_nowait()
            except queue.Empty:
                if not deadline_waits:
                    return False
                deadline_waits -= 1
                continue
            if item is _STOP:
                return True
            pending.append(item)
        return False

    def _take_batch(self, pending: list[_Chunk]) -> tuple[list[_Chunk], list[_Chunk]]:
        """Chunks of the first chunk's frame size, up to a batch of pairs (at least one chunk)."""
        shape = pending[0].frames.shape[1:]
        batch, rest, n = [], [], 0
        for c in pending:
            m = len(c.frames) - 1
            if c.frames.shape[1:] == shape and (not batch or n + m <= self._batch):
                batch.append(c)
                n += m
            else:
                rest.append(c)
        return batch, rest

    def _flow_batch(self, batch: list[_Chunk]) -> np.ndarray:
        """Quantized flow (P, 2, H, W) uint8 of every pair of the batch's chunks, in order."""
        import torch
        prev = np.concatenate([c.frames[:-1] for c in batch])
        nxt = np.concatenate([c.frames[1:] for c in batch])
        out = np.empty((len(prev), 2) + prev.shape[1:], np.uint8)
        cap = self._budget_cap(prev.shape[1:])
        i = 0
        while i < len(prev):
            b = min(self._batch, cap, len(prev) - i)
            try:
                t = time.monotonic()
                out[i:i + b] = self._flow(prev[i:i + b], nxt[i:i + b])
                self.stats["device_s"] += time.monotonic() - t
                self.stats["pairs"] += b
                self.stats["batches"] += 1
            except _out_of_memory_error():
                if b == 1:
                    raise
                self._batch = max(1, b // 2)
                torch.cuda.empty_cache()
                log.warning("flow on %s: out of memory; batches of %d pairs from now on",
                            self.device, self._batch)
                continue
            i += b
        return out

    def _budget_cap(self, shape: tuple[int, ...]) -> int:
        """Pairs of this frame size that fit tvl1_torch's memory budget for the device."""
        if shape not in self._caps:
            from .tvl1_torch import batch_size_for
            self._caps[shape] = batch_size_for(int(shape[0]), int(shape[1]), device=self.device)
        return self._caps[shape]

    def _padded_size(self, b: int) -> int:
        """The batch size to run `b` pairs at: on CUDA the next power of two (at most the batch).

        The fused CUDA TV-L1 keeps one solver (buffers, CUDA graphs) per batch size, so sizes
        must come from a small set; the padding pairs are blank and stop after one iteration.
        """
        if self.device.type != "cuda":
            return b
        return max(b, min(self._batch, 1 << (b - 1).bit_length()))

    def _flow(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        import torch
        b, size = len(prev), self._padded_size(len(prev))
        with torch.inference_mode():
            p = torch.zeros((size,) + prev.shape[1:], dtype=torch.float32, device=self.device)
            n = torch.zeros_like(p)
            p[:b] = torch.from_numpy(prev).to(self.device)
            n[:b] = torch.from_numpy(nxt).to(self.device)
            flow = self._tvl1(p, n)[:b]  # (b, 2, H, W): x then y, in pixels
            return quantize(flow).cpu().numpy()

    # --- writing --------------------------------------------------------------------------------
    def _write_chunk(self, chunk: _Chunk, q: np.ndarray) -> None:
        video = chunk.video
        try:
            if video.error is None:
                for j in range(len(q)):
                    write_flow_pair(video.tmp, chunk.first + j, q[j, 0], q[j, 1],
                                    self.cfg.jpeg_quality)
        except BaseException as e:
            self._done(video, e)
        else:
            self._done(video)

    def close(self) -> None:
        """Finish every video handed in, then stop the threads."""
        with self._lock:
            outstanding = list(self._outstanding)
        wait(outstanding)
        self._ready.put(_STOP)
        self._thread.join()
        self._decode.shutdown()
        self._encode.shutdown()
        wall = time.monotonic() - self._started
        if self.stats["pairs"]:
            log.info("flow on %s: %d pairs in %d batches, %.1f pairs/s; the device computed "
                     "%.0f%% of the %.1f s", self.device, self.stats["pairs"],
                     self.stats["batches"], self.stats["pairs"] / wall,
                     100 * self.stats["device_s"] / wall, wall)


# --- several devices: one worker process each ---------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """Be SIGKILLed when the parent dies, so that no orphan races the stage's rerun."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _portable(e: BaseException) -> BaseException:
    import pickle
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _worker_main(device: str, data: str, cfg: PipelineConfig, inbox, outbox,
                 parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    import cv2
    cv2.setNumThreads(1)
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(torch.device(device))
    pipe = DevicePipeline(device, Path(data), cfg)

    def report(job: int, fut: Future) -> None:
        e = fut.exception()
        outbox.put((job, None, _portable(e)) if e else (job, fut.result(), None))

    while (msg := inbox.get()) is not None:
        job, video_id, n = msg
        pipe.submit(video_id, n).add_done_callback(lambda f, job=job: report(job, f))
    pipe.close()


class WorkerPool:
    """One spawned DevicePipeline process per device; videos go to the least-loaded one."""

    def __init__(self, devices: Sequence[str], data: Path, cfg: PipelineConfig):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self.devices = list(devices)
        self._outbox = ctx.Queue()
        self._inboxes = [ctx.Queue() for _ in self.devices]
        self._procs = [ctx.Process(target=_worker_main, name=f"flow-{d}", daemon=True,
                                   args=(d, str(data), cfg, q, self._outbox, os.getpid()))
                       for d, q in zip(self.devices, self._inboxes)]
        for p in self._procs:
            p.start()
        self._load = [0] * len(self.devices)
        self._alive = [True] * len(self.devices)
        self._pending: dict[int, tuple[int, Future]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._closing = False
        self._collector = threading.Thread(target=self._collect, name="flow-collect",
                                           daemon=True)
        self._collector.start()

    def submit(self, video_id: str, n_frames: int) -> Future:
        fut: Future = Future()
        with self._lock:
            alive = [w for w in range(len(self.devices)) if self._alive[w]]
            if not alive:
                fut.set_exception(RuntimeError("every flow worker process has died"))
                return fut
            w = min(alive, key=lambda i: self._load[i])
            job = next(self._ids)
            self._pending[job] = (w, fut)
            self._load[w] += 1
        self._inboxes[w].put((job, video_id, n_frames))
        return fut

    def _collect(self) -> None:
        last_reap = time.monotonic()
        while True:
            try:
                job, info, error = self._outbox.get(timeout=0.5)
            except queue.Empty:
                pass
            else:
                with self._lock:
                    w, fut = self._pending.pop(job)
                    self._load[w] -= 1
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(info)
            if time.monotonic() - last_reap > 0.5:
                last_reap = time.monotonic()
                self._reap()
            with self._lock:
                if self._closing and not self._pending:
                    return

    def _reap(self) -> None:
        """Fail the videos of a worker process that died (their folders stay temporary)."""
        for w, p in enumerate(self._procs):
            if self._alive[w] and not p.is_alive():
                with self._lock:
                    self._alive[w] = False
                    lost = [(j, f) for j, (i, f) in self._pending.items() if i == w]
                    for j, _ in lost:
                        del self._pending[j]
                for _, f in lost:
                    f.set_exception(RuntimeError(
                        f"the flow worker process for {self.devices[w]} died "
                        f"(exit code {p.exitcode}) while computing this video"))

    def close(self) -> None:
        for q in self._inboxes:
            q.put(None)
        with self._lock:
            self._closing = True
        self._collector.join()
        for p in self._procs:
            p.join(timeout=60)


def run_torch_stage(layout: DataLayout, items: Sequence[str], counts: Mapping[str, int],
                    params: dict, *, jobs: int, force: bool, known_failures: Mapping[str, str],
                    published, progress: bool, jpeg_quality: int,
                    devices: Sequence[str] | None = None,
                    config: PipelineConfig | None = None) -> StageSummary:
    """run_stage for the torch backend: stage threads hand videos to the device pipelines."""
    devices = list(devices or default_devices())
    cfg = config or PipelineConfig()
    cfg = replace(cfg, io_threads=max(2, jobs), jpeg_quality=jpeg_quality)
    # Started here, in the main thread: a worker's PR_SET_PDEATHSIG follows the thread that
    # started it, and the stage's threads end before the pool does.
    pool = DevicePipeline(devices[0], layout.root, cfg) if len(devices) == 1 else \
        WorkerPool(devices, layout.root, cfg)
    try:
        work = _Handoff(pool, counts)
        with parallel_config(backend="threading"):
            return run_stage("flow", layout, items, work, params,
                             jobs=cfg.videos_in_flight * len(devices), force=force,
                             known_failures=known_failures, published=published,
                             progress=progress)
    finally:
        pool.close()


@dataclass(frozen=True)
class _Handoff:
    pool: object
    counts: Mapping[str, int]

    def __call__(self, video_id: str) -> dict:
        return self.pool.submit(video_id, self.counts[video_id]).result()
