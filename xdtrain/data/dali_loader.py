"""Batches from a DALI pipeline as torch tensors, per rank, epoch by epoch.

Each epoch builds its pipeline with a seed derived from (run seed, rank, epoch), so a run
resumed at an epoch sees the samples in the same order, with the same augmentations, as
one that was never stopped. Each rank reads its own contiguous part of the split (DALI's
``shard_id``/``num_shards``); training epochs have the same number of full batches on every
rank (so DDP never waits for a rank that ran out), evaluation epochs every sample once.

DALI cannot skip a sample that fails to decode: the whole batch fails. The loader then
replays the reader without decoding to learn which samples the failed batch held, decodes
them in Python to find the bad ones, logs each with its key and shard, and rebuilds the
batch through the same graph with the bad samples replaced by good ones of the batch. Later
epochs read an index with the bad samples swapped for their neighbours, so the cost is paid
once. With ``debug`` the first bad sample raises instead.
"""

from __future__ import annotations

import logging
import math
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
from xdtrain.data.shardset import ShardSet, rank_range
from xdtrain.errors import UserError
from xdtrain.rng import rng_for
from xdtrain.shards.tar import INDEX_VERSION, parse_index

log = logging.getLogger("xdtrain.data")

TORCH_TYPES = {
    types.FLOAT: torch.float32,
    types.UINT8: torch.uint8,
    types.INT32: torch.int32,
    types.INT64: torch.int64,
    types.FLOAT16: torch.float16,
}
SHUFFLE_FILL = 1024  # samples in the reader's shuffle buffer (shards are shuffled at pack time)


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
        start, stop = rank_range(shardset.samples, rank, world_size)
        self.rank_samples = stop - start
        if train:
            # every rank yields the batches of the smallest rank, all full
            self._len = (shardset.samples // world_size) // batch_size
        else:
            self._len = math.ceil(self.rank_samples / batch_size)
        if self._len == 0:
            raise UserError(
                f"{shardset.folder}: the {shardset.split} split has {shardset.samples} samples, "
                f"fewer than one batch of {batch_size} per rank ({world_size} ranks); "
                "lower data.batch_size"
            )
        self.epoch = 0
        self.bad_samples = 0  # replaced so far, over all epochs
        self._bad: dict[str, set[str]] = {}  # shard path -> keys of bad samples
        self._tmp: Path | None = None
        self._fallback = None
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
        return {
            "paths": list(self.shardset.paths),
            "index_paths": self._index_paths(),
            "shard_id": self.rank,
            "num_shards": self.world_size,
            "random_shuffle": self.train,
            "initial_fill": max(1, min(SHUFFLE_FILL, self.rank_samples)),
            "pad_last_batch": True,
            "stick_to_shard": True,
            "seed": self.epoch_seed(epoch),
        }

    def __iter__(self):
        pipe, reader, primed = self._pipeline(self.epoch)
        try:
            if not primed:
                pipe.schedule_run()  # fills the prefetch queue
            for step in range(self._len):
                bad = 0
                try:
                    outputs = pipe.outputs()
                except RuntimeError as exc:
                    outputs, bad = self._recover(exc, reader, step)
                valid = min(self.batch_size, self.rank_samples - step * self.batch_size)
                batch = self._batch(outputs, self.batch_size if self.train else valid, bad)
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

    def _prepare(self, epoch: int) -> None:
        """Build the pipeline of ``epoch`` and start its reading on a helper thread, so an
        epoch boundary costs no pipeline start-up (GPU decoder set-up, shuffle-buffer fill)."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdtrain-data")
        reader = self.reader_args(epoch)
        args = (self.graph, reader, self.batch_size, self.threads, self.device_id, True)
        # the helper gets no reference to the loader, so the loader is never freed there
        self._next = (epoch, self._helper.submit(_make_pipeline, *args))

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

    def _batch(self, outputs, valid: int, bad: int) -> dict:
        named = dict(zip(self.graph.outputs, outputs, strict=True))
        batch: dict = {}
        if self.graph.purpose == "simclr":
            views = [self._tensor(named[f"view{i}"])[:valid] for i in range(self.graph.views)]
            batch["views"] = views
        else:
            batch["image"] = self._tensor(named["image"])[:valid]
        if "mask" in named:
            batch["mask"] = self._tensor(named["mask"])[:valid, :, :, 0].long()
        raw = self._tensor(named["label"])[:valid]
        if self.device is not None:
            raw = raw.to(self.device, non_blocking=True)
        batch.update(labels(self.shardset.layout, raw))
        info = self._tensor(named["info"])[:valid].numpy()
        batch["keys"] = [key_of(row.tobytes())[1] for row in info]
        batch["bad_samples"] = bad
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
                refs[path] = {r.key: r for r in parse_index(_read_index(path, self.shardset))}
            with open(path, "rb") as fh:
                sample = refs[path][key].read(fh)
            samples.append(sample)
            problem = self._check(sample)
            if problem:
                bad.append((path, key, problem))
        if not bad:
            raise RuntimeError(f"DALI failed on a batch whose samples all decode: {exc}") from exc
        for path, key, problem in bad:
            if self.debug:
                raise UserError(f"{path}: sample {key} {problem}; run `xd-shard verify` on it")
            log.warning("%s: sample %s %s; replaced within its batch", path, key, problem)
            self._bad.setdefault(path, set()).add(key)
        bad_keys = {(p, k) for p, k, _ in bad}
        good = [i for i, info in enumerate(infos) if key_of(info) not in bad_keys]
        if not good:
            raise UserError(
                f"{bad[0][0]}: every sample of a batch failed to decode ({bad[0][2]}); "
                f"run `xd-shard verify {self.shardset.folder}`"
            )
        pick = [i if i in good else good[n % len(good)] for n, i in enumerate(range(len(infos)))]
        self.bad_samples += len(bad)
        return self._run_fallback([samples[i] for i in pick], [infos[i] for i in pick]), len(bad)

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

    def _run_fallback(self, samples, infos):
        if self._fallback is None:
            self._fallback = dali_pipelines.build(
                self.graph,
                batch_size=self.batch_size,
                threads=self.threads,
                seed=self.epoch_seed() + 2,
                device_id=self.device_id,
                reader=None,
            )
        for name, data in dali_pipelines.external_batch(self.graph, samples, infos).items():
            self._fallback.feed_input(name, data)
        return self._fallback.run()

    def _index_paths(self) -> list[str]:
        """The shards' indexes, with every known bad sample swapped for a good neighbour."""
        if not self._bad:
            return list(self.shardset.index_paths)
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="xdtrain-idx-"))
        out = []
        for path, index in zip(self.shardset.paths, self.shardset.index_paths, strict=True):
            bad = self._bad.get(path)
            if not bad:
                out.append(index)
                continue
            lines = Path(index).read_text().splitlines()
            samples = lines[1:]
            keys = [line.split()[3].partition(".")[0] for line in samples]
            good = [line for line, key in zip(samples, keys, strict=True) if key not in bad]
            if good:
                samples = [
                    good[0] if key in bad else line for line, key in zip(samples, keys, strict=True)
                ]
            target = self._tmp / Path(index).name
            target.write_text("\n".join([f"{INDEX_VERSION} {len(samples)}", *samples]) + "\n")
            out.append(str(target))
        return out

    def close(self) -> None:
        self._next = None
        if getattr(self, "_helper", None) is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)
            self._helper = None
        if getattr(self, "_tmp", None) is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        self.close()


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


def _read_index(path: str, shardset: ShardSet) -> str:
    return Path(shardset.index_paths[shardset.paths.index(path)]).read_text()


try:  # the GPU list type exists in every wheel; guarded so CPU-only builds import cleanly
    from nvidia.dali.tensors import TensorListGPU as _GPU_LISTS
except ImportError:  # pragma: no cover
    _GPU_LISTS = ()
