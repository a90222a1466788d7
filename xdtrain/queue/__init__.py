"""The experiment queue: a jobs file (:mod:`~xdtrain.queue.jobsfile`), which job waits for
which (:mod:`~xdtrain.queue.depends`), one module per executor (:mod:`~xdtrain.queue.local`,
:mod:`~xdtrain.queue.slurm` with :mod:`~xdtrain.queue.accounting`), ``xd-queue status``
(:mod:`~xdtrain.queue.status`) and ``xd-queue grid`` (:mod:`~xdtrain.queue.grid`); the
command is :mod:`~xdtrain.queue.cli`."""

from xdtrain.queue.cli import entry, main
from xdtrain.queue.jobsfile import parse

__all__ = ["entry", "main", "parse"]
