"""Batches from a DALI pipeline as torch tensors, per rank, epoch by epoch.

Each epoch reads the order :mod:`xdtrain.data.order` gives for (run seed, epoch, rank):
for training, runs of consecutive samples of every shard shuffled together, written as
per-epoch DALI index files that the reader follows; its pipeline is seeded from (run seed,
rank, epoch). A run resumed at an epoch therefore sees the samples in the same order, with
the same augmentations, as one that was never stopped. Training epochs have the same number
of full batches on every rank (so DDP never waits for a rank that ran out), evaluation
epochs every sample of the rank's part once.

DALI cannot skip a sample that fails to decode: the whole batch fails. The loader then
replays the reader without decoding to learn which samples the failed batch held, decodes
them in Python to find the bad ones, logs each with its key and shard, and rebuilds the
batch through the same graph with the bad samples replaced by good ones of the batch. Later
epochs' index files swap the bad samples for neighbours, so the cost is paid once. With
``debug`` the first bad sample raises instead.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from xdtrain.data import dali_pipelines
from xdtrain.data.batch import key_of, labels
from xdtrain.data.dali_pipelines import Graph
from xdtrain.data.order import reader_pieces
from xdtrain.data.shardset import ShardSet, rank_batches
from xdtrain.errors import UserError
from xdtrain.rng import rng_for
from xdtrain.shards.tar import INDEX_VERSION

log = logging.getLogger("xdtrain.data")

TORCH_TYPES = {
    types.FLOAT: torch.float32,
    types.UINT8: torch.uint8,
    types.INT32: torch.int32,
    types.INT64: torch.int64,
    types.FLOAT16: torch.float16,
}
SHUFFLE_FILL = 1024  # samples in the reader's shuffle buffer, after the run shuffle


class DaliLoader:
    """Iterate batches of ``shardset`` through ``graph``; see the module docstring."""

    def __init__(
        self,
        shardset: ShardSet,
        graph: Graph,
        *,
        batch_size: int,
        threads: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        debug: bool = False,
        device_id: int | None = None,
    ):
        self.shardset, self.graph = shardset, graph
        self.batch_size, self.threads, self.seed = batch_size, threads, seed
        self.rank, self.world_size, self.train, self.debug = rank, world_size, train, debug
        self.device_id = device_id
        self.device = torch.device("cuda", device_id) if graph.device == "gpu" else None
        self.rank_samples, self._len = rank_batches(shardset, batch_size, rank, world_size, train)
        self.epoch = 0
        self.bad_samples = 0  # replaced so far, over all epochs
        self._bad: dict[str, set[str]] = {}  # shard path -> keys of bad samples
        self._indexes = EpochIndexes(shardset, seed, rank, world_size, train)
        self._planned = None  # (epoch, bad samples known, future of the written indexes)
        self._helper: ThreadPoolExecutor | None = None
        self._next = None  # (epoch, future of (pipeline, reader args)) built ahead

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_seed(self, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        return int(rng_for(self.seed, "data", self.rank, epoch).integers(2**31 - 1))

    def reader_args(self, epoch: int | None = None) -> dict:
        """Reader arguments of ``epoch``: this rank's pieces as index files of their own
        (those planned ahead, or written now; always on the helper thread, one at a time)."""
        epoch = self.epoch if epoch is None else epoch
        return self._reader(epoch, self._take_plan(epoch).result())

    def _reader(self, epoch: int, written: tuple[list[str], list[str]]) -> dict:
        paths, index_paths = written
        return {
            "paths": paths,
            "index_paths": index_paths,
            "random_shuffle": self.train,
            "initial_fill": max(1, min(SHUFFLE_FILL, self.rank_samples)),
            "pad_last_batch": True,
            "seed": self.epoch_seed(epoch),
        }

    def __iter__(self):
        if self._len == 0:  # an evaluation rank whose share of the split is empty
            self.epoch += 1
            return
        pipe, reader, primed = self._pipeline(self.epoch)
        self._plan(self.epoch + 1)  # the next epoch's index files, written meanwhile
        try:
            if not primed:
                pipe.schedule_run()  # fills the prefetch queue
            for step in range(self._len):
                replaced: list[int] = []
                try:
                    outputs = pipe.outputs()
                except RuntimeError as exc:
                    outputs, replaced = self._recover(exc, reader, step)
                valid = min(self.batch_size, self.rank_samples - step * self.batch_size)
                batch = self._batch(outputs, self.batch_size if self.train else valid, replaced)
                if step < self._len - 1:
                    pipe.schedule_run()
                else:
                    self._prepare(self.epoch + 1)  # overlaps the next start-up with this step
                yield batch
        finally:
            del pipe
        self.epoch += 1

    def _build(self, epoch: int):
        reader = self.reader_args(epoch)
        return _make_pipeline(
            self.graph, reader, self.batch_size, self.threads, self.device_id, start=False
        )

    def _executor(self) -> ThreadPoolExecutor:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdtrain-data")
        return self._helper

    def _plan(self, epoch: int) -> None:
        """Write the index files of ``epoch`` on the helper thread (it holds no reference to
        the loader, so the loader is never freed there)."""
        known = _known(self._bad)
        future = self._executor().submit(self._indexes.write, epoch, known)
        self._planned = (epoch, known, future)

    def _take_plan(self, epoch: int):
        """The future of ``epoch``'s index files: the planned one unless it is for another
        epoch or predates a bad sample found since, else a new one."""
        planned, self._planned = self._planned, None
        if planned is None or planned[0] != epoch or planned[1] != _known(self._bad):
            self._plan(epoch)
            planned, self._planned = self._planned, None
        return planned[2]

    def _prepare(self, epoch: int) -> None:
        """Build the pipeline of ``epoch`` and start its reading on a helper thread, so an
        epoch boundary costs no pipeline start-up (GPU decoder set-up, shuffle-buffer fill)."""
        written = self._take_plan(epoch)
        reader = self._reader(epoch, ([], []))  # paths filled in by the helper
        args = (self.graph, reader, written, self.batch_size, self.threads, self.device_id)
        self._next = (epoch, self._executor().submit(_make_prepared, *args))

    def _pipeline(self, epoch: int):
        """``(pipeline, reader args, primed)`` for ``epoch``, the prepared one if it fits."""
        prepared, self._next = self._next, None
        if prepared is not None:
            ready_epoch, future = prepared
            try:
                pipe, reader = future.result()
            except RuntimeError:
                pipe = None  # its first batch failed before outputs(); start afresh
            if pipe is not None and ready_epoch == epoch:
                return pipe, reader, True
            del pipe
        pipe, reader = self._build(epoch)
        return pipe, reader, False

    # ------------------------------------------------------------------ conversion

    def _tensor(self, tensor_list) -> torch.Tensor:
        tensor = tensor_list.as_tensor()
        device = self.device if isinstance(tensor_list, _GPU_LISTS) else torch.device("cpu")
        out = torch.empty(tensor.shape(), dtype=TORCH_TYPES[tensor.dtype], device=device)
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        feed_ndarray(tensor, out, cuda_stream=stream)
        return out

    def _batch(self, outputs, valid: int, replaced: list[int]) -> dict:
        """The batch's first ``valid`` samples; in evaluation without the ``replaced`` ones
        (a bad sample is left out of the scores, never counted twice through a stand-in)."""
        named = dict(zip(self.graph.outputs, outputs, strict=True))
        batch: dict = {}
        if self.graph.purpose == "simclr":
            views = [self._tensor(named[f"view{i}"])[:valid] for i in range(self.graph.views)]
            batch["views"] = views
        else:
            batch["image"] = self._tensor(named["image"])[:valid]
        if "mask" in named:
            mask = self._tensor(named["mask"])[:valid, :, :, 0].long()
            batch["mask"] = mask.masked_fill_(mask == dali_pipelines.MASK_PAD, -1)
        raw = self._tensor(named["label"])[:valid]
        if self.device is not None:
            raw = raw.to(self.device, non_blocking=True)
        batch.update(labels(self.shardset.layout, raw))
        info = self._tensor(named["info"])[:valid].numpy()
        batch["keys"] = [key_of(row.tobytes())[1] for row in info]
        batch["bad_samples"] = len(replaced)
        if replaced and not self.train:
            keep = [i for i in range(valid) if i not in set(replaced)]
            batch = _select(batch, keep)
        return batch

    # ------------------------------------------------------------------ bad samples

    def _recover(self, exc: RuntimeError, reader: dict, step: int):
        """Rebuild batch ``step`` after DALI failed on it; see the module docstring."""
        infos = self._replay(reader, step)
        samples, bad = [], []
        refs = {}
        for info in infos:
            path, key = key_of(info)
            if path not in refs:
                shard = self.shardset.paths.index(path)
                refs[path] = {r.key: r for r in self.shardset.sample_refs(shard)}
            with open(path, "rb") as fh:
                sample = refs[path][key].read(fh)
            samples.append(sample)
            problem = self._check(sample)
            if problem:
                bad.append((path, key, problem))
        if not bad:
            raise RuntimeError(f"DALI failed on a batch whose samples all decode: {exc}") from exc
        what = "replaced within its batch" if self.train else "left out of the scores"
        for path, key, problem in bad:
            if self.debug:
                raise UserError(f"{path}: sample {key} {problem}; run `xd-shard verify` on it")
            log.warning("%s: sample %s %s; %s", path, key, problem, what)
            if self.train:  # evaluation reads it again (and leaves it out again) next time
                self._bad.setdefault(path, set()).add(key)
        bad_keys = {(p, k) for p, k, _ in bad}
        good = [i for i, info in enumerate(infos) if key_of(info) not in bad_keys]
        if not good:
            raise UserError(
                f"{bad[0][0]}: every sample of a batch failed to decode ({bad[0][2]}); "
                f"run `xd-shard verify {self.shardset.folder}`"
            )
        pick = [i if i in good else good[n % len(good)] for n, i in enumerate(range(len(infos)))]
        replaced = [i for i in range(len(infos)) if i not in good]
        self.bad_samples += len(bad)
        rebuilt = self._run_fallback([samples[i] for i in pick], [infos[i] for i in pick], step)
        return rebuilt, replaced

    def _replay(self, reader: dict, step: int) -> list[bytes]:
        """``source_info`` of batch ``step``: the same reader, seed and order, no decoding."""
        label = self.shardset.layout.label

        @pipeline_def
        def probe():
            part = fn.readers.webdataset(ext=[label], **reader)
            return fn.pad(fn.get_property(part, key="source_info"), fill_value=0)

        pipe = probe(batch_size=self.batch_size, num_threads=1, device_id=None, seed=0)
        pipe.build()
        for _ in range(step + 1):
            (out,) = pipe.run()
        return [bytes(np.asarray(out[i])) for i in range(len(out))]

    def _check(self, sample: dict[str, bytes]) -> str | None:
        for ext in self.graph.components:
            if ext == self.shardset.layout.label:
                continue
            data = sample.get(ext)
            if data is None:
                return f"has no {ext}"
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                return f"{ext} does not decode"
        return None

    def _run_fallback(self, samples, infos, step: int):
        """The batch rebuilt through the same graph from ``samples``, by a pipeline seeded
        from (seed, rank, epoch, step): a resumed run rebuilds it the same way."""
        seed = int(rng_for(self.seed, "fallback", self.rank, self.epoch, step).integers(2**31))
        pipe = dali_pipelines.build(
            self.graph,
            batch_size=self.batch_size,
            threads=self.threads,
            seed=seed,
            device_id=self.device_id,
            reader=None,
        )
        for name, data in dali_pipelines.external_batch(self.graph, samples, infos).items():
            pipe.feed_input(name, data)
        return pipe.run()

    def state_dict(self) -> dict:
        """What a resumed run needs to read as this loader would: the bad samples it knows
        (later epochs read around them)."""
        return {"bad": {path: sorted(keys) for path, keys in self._bad.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._bad = {path: set(keys) for path, keys in state.get("bad", {}).items()}

    def close(self) -> None:
        self._next = None
        if getattr(self, "_helper", None) is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)
            self._helper = None
        if getattr(self, "_indexes", None) is not None:
            self._indexes.remove()

    def __del__(self):
        self.close()


def _make_prepared(graph, reader, written, batch_size, threads, device_id):
    """:func:`_make_pipeline` once the planned index files (a future) are written."""
    paths, index_paths = written.result()
    reader = {**reader, "paths": paths, "index_paths": index_paths}
    return _make_pipeline(graph, reader, batch_size, threads, device_id, start=True)


def _make_pipeline(graph, reader, batch_size, threads, device_id, start):
    """A built pipeline reading with ``reader``; ``start`` schedules its first batches."""
    pipe = dali_pipelines.build(
        graph,
        batch_size=batch_size,
        threads=threads,
        seed=reader["seed"] + 1,
        device_id=device_id,
        reader=reader,
    )
    if start:
        pipe.schedule_run()
    return pipe, reader


def _select(batch: dict, keep: list[int]) -> dict:
    """``batch`` with only the samples at ``keep``."""
    out: dict = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[keep]
        elif key == "views":
            out[key] = [v[keep] for v in value]
        elif key == "keys":
            out[key] = [value[i] for i in keep]
        else:
            out[key] = value
    return out


def _known(bad: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    """A frozen copy of the bad samples known so far, for the helper thread."""
    return {path: frozenset(keys) for path, keys in bad.items()}


class EpochIndexes:
    """Writes one rank's DALI index files for an epoch: one per piece of the epoch's order
    (:mod:`xdtrain.data.order`), with the samples known to be bad swapped for a good one of
    the piece. Reads only the lines it needs, by byte offset, so a rank of a large data set
    reads its part of the indexes, not all of them. Holds no reference to the loader: it
    runs on the helper thread."""

    def __init__(self, shardset: ShardSet, seed: int, rank: int, world_size: int, train: bool):
        self.shardset, self.seed, self.rank = shardset, seed, rank
        self.world_size, self.train = world_size, train
        self.folder: Path | None = None
        self._offsets: dict[int, np.ndarray] = {}

    def write(self, epoch: int, bad) -> tuple[list[str], list[str]]:
        """``(tar paths, index paths)`` of ``epoch``, in reading order."""
        pieces = reader_pieces(self, epoch)
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="xdtrain-idx-"))
        folder = self.folder / f"epoch{epoch}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for old in self.folder.glob("epoch*"):  # the epoch before stays: its batches may replay
            if int(old.name[5:]) < epoch - 1:
                shutil.rmtree(old, ignore_errors=True)
        paths, index_paths = [], []
        for n, piece in enumerate(pieces):
            path = self.shardset.paths[piece.shard]
            lines = _swap_bad(self._lines(piece.shard, piece.positions), bad.get(path, ()))
            target = folder / f"{n:06d}.idx"
            target.write_text("\n".join([f"{INDEX_VERSION} {len(lines)}", *lines]) + "\n")
            paths.append(path)
            index_paths.append(str(target))
        return paths, index_paths

    def _lines(self, shard: int, positions: tuple[int, ...]) -> list[str]:
        """Index lines ``positions`` of ``shard`` (runs of consecutive positions)."""
        ends = self._offsets.get(shard)
        index = self.shardset.index_paths[shard]
        if ends is None:
            data = np.frombuffer(Path(index).read_bytes(), np.uint8)
            ends = np.flatnonzero(data == 10)  # newline after the header and after each sample
            if len(data) and data[-1] != 10:
                ends = np.append(ends, len(data))
            self._offsets[shard] = ends
        out: list[str] = []
        with open(index, "rb") as fh:
            start = 0
            for stop in range(1, len(positions) + 1):
                if stop < len(positions) and positions[stop] == positions[stop - 1] + 1:
                    continue
                a, b = positions[start], positions[stop - 1] + 1
                fh.seek(int(ends[a]) + 1)
                out += fh.read(int(ends[b]) - int(ends[a]) - 1).decode().split("\n")
                start = stop
        return out

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _swap_bad(lines: list[str], bad) -> list[str]:
    """Index ``lines`` with the samples whose key is in ``bad`` swapped for the first good
    one (kept when every sample is bad: the batch then fails and says so)."""
    if not bad:
        return lines
    keys = [line.split()[3].partition(".")[0] for line in lines]
    good = [line for line, key in zip(lines, keys, strict=True) if key not in bad]
    if not good:
        return lines
    return [good[0] if key in bad else line for line, key in zip(lines, keys, strict=True)]


try:  # the GPU list type exists in every wheel; guarded so CPU-only builds import cleanly
    from nvidia.dali.tensors import TensorListGPU as _GPU_LISTS
except ImportError:  # pragma: no cover
    _GPU_LISTS = ()
