"""Raw data sets generated in the exact on-disk layouts of the real downloads.

``generate("brats", out)`` writes ``out/brats/MICCAI_BraTS2020_TrainingData/...``; every data
set lives in its own module, listed once in :data:`GENERATORS`.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.progress import Progress

from xdtrain import __version__
from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.synth import brats, chestxray8, dicom, imagenet, lits
from xdtrain.synth.common import SIZES, Generator, Job

GENERATORS: dict[str, Generator] = {
    "imagenet": imagenet,
    "chestxray8": chestxray8,
    "brats": brats,
    "lits": lits.png_release,
    "lits-nifti": lits.nifti_release,
    "dicom": dicom,
}
MARKER = ".xd-synth.json"


def _settings(name: str, size: str, seed: int, count: int | None) -> dict:
    return {"dataset": name, "size": size, "seed": seed, "count": count}


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _render(args: tuple[str, Job, str, int]) -> dict[str, bytes]:
    name, job, size, seed = args
    return GENERATORS[name].render(job, size, seed)


def generate(
    name: str,
    out: str | os.PathLike,
    *,
    size: str = "small",
    seed: int = 0,
    count: int | None = None,
    workers: int = 1,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write data set ``name`` into ``out/<name>`` and return that folder.

    The data set is built in ``out/.<name>.partial`` and renamed when complete, so a folder
    named ``<name>`` is always whole. A killed run resumes from the partial folder; a finished
    one with the same settings is left as it is.
    """
    if name not in GENERATORS:
        raise UserError(f"unknown data set {name!r}; choose from {', '.join(GENERATORS)}")
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose small or full")
    if count is not None and count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    try:
        return _generate(
            GENERATORS[name], name, Path(out), size, seed, count, workers, force, progress
        )
    except OSError as exc:
        where = exc.filename or out
        raise UserError(
            f"{where}: {exc.strerror or exc}; check --out (a finished part is kept for a rerun)"
        ) from None


def _generate(generator, name, root, size, seed, count, workers, force, progress) -> Path:
    settings = _settings(name, size, seed, count)
    final, partial = root / name, root / f".{name}.partial"
    if final.exists():
        if _read_marker(final) == settings and not force:
            return final
        if not force:
            raise UserError(
                f"{final} already exists with other settings or was not written by xd-synth; "
                "pass --force to replace it or choose another --out"
            )
        shutil.rmtree(final)
    if partial.exists() and _read_marker(partial) != settings:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.rglob(".*.tmp"):  # half-written files of a killed run
        stale.unlink()
    marker = {"settings": settings, "tool": f"xdtrain {__version__}"}
    atomic_write(partial / MARKER, json.dumps(marker, indent=2) + "\n")

    plan = generator.plan(size, seed, count)
    todo = [job for job in plan.jobs if not all((partial / f).exists() for f in job.files)]
    task = progress.add_task(name, total=len(plan.jobs)) if progress else None
    if progress:
        progress.update(task, completed=len(plan.jobs) - len(todo))
    args = [(name, job, size, seed) for job in todo]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_render, args, chunksize=max(1, len(todo) // (workers * 8)))
            _write_all(partial, results, progress, task)
    else:
        _write_all(partial, map(_render, args), progress, task)
    for rel, data in plan.extra_files.items():
        atomic_write(partial / rel, data)
    os.replace(partial, final)
    return final


def _write_all(folder: Path, results, progress: Progress | None, task) -> None:
    for files in results:
        for rel, data in files.items():
            atomic_write(folder / rel, data, fsync=False)
        if progress:
            progress.advance(task)
