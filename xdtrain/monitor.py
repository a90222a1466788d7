"""The kNN monitor: what the encoder's embeddings know about labels, while it trains.

SimCLR's loss says how well a view finds its partner, not what the features are good for.
Every ``monitor.every`` epochs (and after the last), the encoder embeds a fixed, seeded
sample of a labelled split (the memory bank, ``monitor.bank_split``) and of another
(``monitor.query_split``) through their evaluation graph, and each query is classified by
its ``k`` nearest bank samples in cosine similarity, votes weighted by
``exp(similarity / temperature)`` (Wu et al., CVPR 2018, sec. 3.4; k = 20, temperature
0.07 as in solo-learn and DINO): ``knn_top1`` for class labels, ``knn_auroc`` (mean
one-vs-rest AUROC of the vote shares) for multi-label findings or, for segmentation data,
which structures a slice shows. Each score is a ``monitor`` row of ``metrics.jsonl`` and
TensorBoard (``monitor/knn_top1``), with ``knn_chance`` (the majority class's share, or 0.5
for AUROC) and ``knn_seconds``, the monitor's own cost; the first row, at epoch 0, scores
the encoder before any training, the baseline SimCLR must rise above.

The cost is bounded by the two sample sizes, whatever the size of the data set. Under DDP
each rank embeds its part of both samples and rank 0 receives all of them, in the order one
process would read them, and votes on its device, so the score does not depend on the
number of ranks.
The monitor never changes the weights, the batch-norm statistics or the training's random
streams: a run with it trains exactly as one without.
"""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import torch

from xdtrain import distributed
from xdtrain.config import Config
from xdtrain.data.batch import label_kind, sample_labels, scored_classes
from xdtrain.errors import UserError
from xdtrain.knn import knn_chance, knn_metrics


def monitor_data(config: Config):
    """The data section the monitor reads: the run's image size and channels, the
    monitor's shards, the evaluation graph of their data set."""
    m = config.monitor
    same = m.dataset is None or m.dataset == config.data.dataset
    return dataclasses.replace(
        config.data,
        dataset=m.dataset or config.data.dataset,
        shards=m.shards or (config.data.shards if same else ""),
        augment="",
        fraction=1.0,
    )


class KnnMonitor:
    """The loaders of the bank and the query sample of one rank, and the scoring."""

    def __init__(self, config: Config, rank: int, world_size: int):
        from xdtrain.data import build_loader

        self.config, m = config, config.monitor
        if m.bank_split == m.query_split:
            raise UserError(
                f"monitor: bank_split and query_split are both {m.bank_split!r}: a query would "
                "find itself in the bank; score another split (e.g. bank train, query val)"
            )
        data = monitor_data(config)
        common = dict(rank=rank, world_size=world_size, seed=config.run.seed, train=False)
        try:
            self.bank = build_loader(
                data, m.bank_split, sample=m.bank_samples, sample_seed=config.run.seed, **common
            )
            self.query = build_loader(
                data, m.query_split, sample=m.query_samples, sample_seed=config.run.seed + 1,
                **common,
            )  # fmt: skip
        except UserError as exc:
            text = str(exc)
            if text.startswith("data.channels:"):  # the run's channels are the encoder's
                text = (
                    f"the encoder takes data.channels={data.channels}, which "
                    f"{data.dataset} shards cannot give ({text.partition(': ')[2]}); "
                    "monitor a data set with 1 or 3 channels"
                )
            raise UserError(f"monitor: {text}") from None
        shardset = self.bank.shardset
        self.kind, self.classes = label_kind(shardset.layout.kind, list(shardset.classes))
        self.columns = scored_classes(self.kind, self.classes)  # "No Finding" is not scored
        if not self.classes:
            raise UserError(
                f"monitor: {shardset.folder} holds no labels (packed without --labels?); set "
                "monitor.dataset and monitor.shards to labelled shards, or monitor.every: 0"
            )
        self.name = f"{shardset.folder.name} {m.bank_split}->{m.query_split}"

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether the monitor runs after ``epoch`` (1-based) of ``epochs``."""
        every = self.config.monitor.every
        return every > 0 and (epoch % every == 0 or epoch == epochs)

    @torch.no_grad()
    def __call__(self, encoder: torch.nn.Module, device: torch.device, amp) -> dict:
        """``{knn_top1 | knn_auroc (+ knn_auroc_classes), knn_chance, knn_seconds}`` on rank 0
        (``{}`` on the others). Every rank must call it: the embeddings are gathered."""
        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        state = random.getstate(), np.random.get_state()
        gpus = [device] if device.type == "cuda" else []
        try:  # a loader may draw a seed from the global streams: training's stay untouched
            with torch.random.fork_rng(devices=gpus):
                bank = self._embed(self.bank, encoder, device, amp)
                query = self._embed(self.query, encoder, device, amp)
        finally:
            encoder.train(was_training)
            random.setstate(state[0])
            np.random.set_state(state[1])
        parts = distributed.gather_to_main((bank, query))  # rank 0 alone votes
        if parts is None:
            return {}
        bank_x, bank_y = _joined([p[0] for p in parts])
        query_x, query_y = _joined([p[1] for p in parts])
        if self.kind != "multiclass":
            bank_y, query_y = bank_y[:, self.columns], query_y[:, self.columns]
        m = self.config.monitor
        on = device  # the votes on rank 0's device: the GPU where there is one
        result = knn_metrics(
            torch.from_numpy(bank_x).to(on),
            torch.from_numpy(bank_y).to(on),
            torch.from_numpy(query_x).to(on),
            torch.from_numpy(query_y).to(on),
            len(self.columns),
            k=m.k,
            temperature=m.temperature,
        )
        chance = knn_chance(query_y, len(self.columns))
        return result | {"knn_chance": chance, "knn_seconds": time.perf_counter() - start}

    def _embed(self, loader, encoder, device, amp) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            if self.config.train.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with amp.autocast():
                features.append(encoder(image).float().cpu().numpy())
            labels.append(sample_labels(batch, self.kind, len(self.classes)))
        if not features:  # a rank whose share of the sample is empty
            width = 0 if self.kind == "multiclass" else len(self.classes)
            empty = np.zeros((0,) if width == 0 else (0, width), np.int64)
            return np.zeros((0, 0), np.float32), empty
        return np.concatenate(features), np.concatenate(labels)


def _joined(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The ranks' embeddings and labels in rank order (one process's reading order)."""
    kept = [p for p in parts if len(p[0])]
    return np.concatenate([p[0] for p in kept]), np.concatenate([p[1] for p in kept])
