"""The experiment queue: a jobs file (:mod:`~xdtrain.queue.jobsfile`), which job waits for
which (:mod:`~xdtrain.queue.depends`), one module per executor (:mod:`~xdtrain.queue.local`,
:mod:`~xdtrain.queue.slurm` with :mod:`~xdtrain.queue.accounting`, what a Slurm job asks
for, :mod:`~xdtrain.queue.slurm_options`, and what runs on its node,
:mod:`~xdtrain.queue.slurm_job`), ``xd-queue status``
(:mod:`~xdtrain.queue.status`) and ``xd-queue grid`` (:mod:`~xdtrain.queue.grid`); the
command is :mod:`~xdtrain.queue.cli`."""

from xdtrain.queue.cli import entry, main
from xdtrain.queue.jobsfile import parse

__all__ = ["entry", "main", "parse"]
