"""The documentation stays true: the config reference is generated from the schema, and the
commands of README.md and docs/*.md run as written on generated data (training commands with
settings appended that shrink them to seconds, analysis commands on small samples)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xdtrain.config_reference import DOC, reference

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the test does not run, each with the reason; everything else must run.
LONG = [
    (r"^(time )?make ", "runs the demo or the suite itself"),
    (r"/data/", "needs a real data set"),
    (r"--nnodes", "several machines meeting at a rendezvous host"),
    (r"--nproc_per_node\s+(?!2\b)\d+", "one process per GPU of a multi-GPU machine"),
    (r"^xd-queue (?!grid\s)", "runs a grid of trainings"),
    (r"/tmp/bench", "reads the full-size benchmark data"),
    (r"tools/", "a benchmark or the GPU check"),
    (r"--size full", "full-size data takes minutes"),
    (r"^xd-report grid/", "needs the grid's runs"),
]

# Training commands (xd-train, torchrun, python -m xdtrain.train) run as written, with these
# settings appended: the config file, every option and every path the command names must
# still be right, but the run takes seconds. --force: the sandbox holds the runs of
# `make demo` at the default run folders, as a user's working folder does.
TRAINING = re.compile(r"^(xd-train|torchrun|python -m (xdtrain\.train|torch\.distributed\.run))\s")
SHRINK = [
    *("--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "data.workers=1"),
    *("--set", "train.epochs=1", "--set", "train.limit_batches=2"),
    *("--set", "monitor.bank_samples=48", "--set", "monitor.query_samples=24"),
    "--force",
]


# xd-analyze commands run as written on a small sample (the flags given later win): every
# encoder, data config and output the command names must still be right.
ANALYSIS = re.compile(r"^xd-analyze (features|cka|probe|map|grid)\s")
SMALL_SAMPLE = {"probe": ["--train-samples", "48"], "grid": ["--train-samples", "48"]}


def test_config_reference_is_generated_from_the_schema():
    assert DOC.read_text() == reference(), (
        "docs/config.md is stale: run `python -m xdtrain.config_reference > docs/config.md`"
    )


def test_every_config_key_has_a_meaning():
    rows = [line for line in reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 40
    for row in rows:
        assert row.rstrip().rstrip("|").split("|")[-1].strip(), row


def commands() -> list[tuple[str, str]]:
    """``(file, command)`` of every ``bash`` block line, continuations joined."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((path.name, line))
    return found


def long_reason(command: str) -> str | None:
    for pattern, reason in LONG:
        if re.search(pattern, command):
            return reason
    return None


@pytest.fixture(scope="module")
def sandbox(packed, tmp_path_factory):
    """A working folder like a user's after `make demo`: configs, data sets in the real
    layouts, the default shard folders, and small finished runs at the documented paths."""
    from xdtrain.train import main as train_main

    root = tmp_path_factory.mktemp("sandbox")
    os.symlink(ROOT / "configs", root / "configs")
    # one intra-op thread per process: beside DALI's thread, more only contend on small CPUs
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    run = lambda argv: subprocess.run(argv, cwd=root, env=env, check=True, capture_output=True)  # noqa: E731
    run([str(BIN / "xd-synth"), "all", "--out", "datasets", "--quiet"])
    for name in ("imagenet", "chestxray8", "brats", "lits"):
        src = "datasets/lits-nifti" if name == "lits" else f"datasets/{name}"
        run([str(BIN / "xd-shard"), "--dataset", name, "--src", src, "--quiet"])
    tiny = SHRINK[:-1]  # finished runs, each of two training steps
    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        train_main(["configs/demo/pt_simclr_imagenet.yaml", *tiny])
        for task in ("brats", "chestxray8", "lits"):
            train_main(
                [f"configs/demo/ft_{task}.yaml", "--set", f"run.name=ft_{task}_scratch_s0", *tiny]
            )
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root, env


def trains(command: str) -> bool:
    return bool(TRAINING.match(command)) and "--print-config" not in command


def effects(argv: list[str], root: Path) -> tuple[set[Path], set[Path]]:
    """What a documented command reads and writes, so that two commands run at once only when
    neither writes what the other touches: the queue's own rule
    (:func:`xdtrain.queue.depends.effects`), widened to be safe where a command writes beside
    what it reads (xd-analyze stores features in the run folders it reads; xd-shard writes its
    pseudonym key)."""
    from xdtrain.queue.depends import effects as queue_effects

    if "xdtrain.train" in argv:  # torchrun / python -m: the xd-train command it runs
        argv = ["xd-train", *argv[argv.index("xdtrain.train") + 1 :]]
    elif argv[0] == "python":  # python -m xdtrain.config / xdtrain.data CONFIG: reads its data
        config = [a for a in argv[3:] if a.endswith(".yaml")][:1]
        none: tuple[set, set] = (set(), set())
        reads, _ = effects(["xd-train", *config, "--print-config"], root) if config else none
        return {(root / c).resolve() for c in config} | set(reads), set()
    found = queue_effects(argv, root, "docs")
    reads, writes = set(found.reads), set(found.writes) | set(found.touches)
    if argv[0] in ("xd-analyze", "xd-shard"):
        writes |= reads
    if argv[0] == "xd-train" and "--print-config" in argv:
        writes = set()
    return reads, writes


def _overlap(a: set[Path], b: set[Path]) -> bool:
    return any(p == q or p in q.parents or q in p.parents for p in a for q in b)


def conflict(a: tuple[set[Path], set[Path]], b: tuple[set[Path], set[Path]]) -> bool:
    """Whether one of two commands writes what the other reads or writes."""
    return _overlap(a[1], b[0] | b[1]) or _overlap(b[1], a[0])


# Commands run at once: one per core, each with one thread (the sandbox's OMP_NUM_THREADS=1)
WORKERS = 2


def test_documented_commands_run_as_written(sandbox, tmp_path):
    """Every documented command, in the docs' order, several at a time where none writes what
    another reads or writes (the sandbox runs one thread per process)."""
    root, env = sandbox
    ran, skipped, planned, seen = [], [], [], set()
    for source, command in commands():
        reason = long_reason(command)
        if reason:
            skipped.append((command, reason))
            continue
        if trains(command) and command in seen:  # documented twice: once is proof enough
            continue
        seen.add(command)
        argv = shlex.split(command)
        if trains(command):
            argv += SHRINK
        analysis = ANALYSIS.match(command)
        if analysis:
            argv += ["--samples", "24", *SMALL_SAMPLE.get(analysis.group(1), [])]
        planned.append((source, command, argv, effects(argv, root)))
    waits = [
        {j for j in range(i) if conflict(planned[j][3], planned[i][3])} for i in range(len(planned))
    ]
    finished: set[int] = set()
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    todo = list(range(len(planned)))
    while todo or running:
        for i in [i for i in todo if waits[i] <= finished][: WORKERS - len(running)]:
            todo.remove(i)
            with open(tmp_path / f"{i}.out", "w") as out, open(tmp_path / f"{i}.err", "w") as err:
                proc = subprocess.Popen(planned[i][2], cwd=root, env=env, stdout=out, stderr=err)
            running[i] = (proc, time.monotonic())
        for i, (proc, started) in list(running.items()):
            if proc.poll() is None:
                assert time.monotonic() - started < 300, f"`{planned[i][1]}` took over 300 s"
                continue
            del running[i]
            source, command = planned[i][:2]
            stdout = (tmp_path / f"{i}.out").read_text()
            stderr = (tmp_path / f"{i}.err").read_text()
            assert proc.returncode == 0, f"{source}: `{command}` failed:\n{stderr[-2000:]}"
            if trains(command):
                # it trained and finished where it says, not merely started
                folders = re.findall(r"^run: (.+)$", stdout, flags=re.M)
                assert len(folders) == 1, f"{source}: `{command}`:\n{stdout[-2000:]}"
                assert (root / folders[0] / "final.pt").is_file(), (command, folders[0])
            finished.add(i)
            ran.append(command)
        time.sleep(0.05)
    trained = [c for c in ran if trains(c)]
    assert len(ran) >= 20, ran
    kinds = {c.split()[0] if not c.startswith("python") else " ".join(c.split()[:3]) for c in ran}
    assert {"xd-shard", "xd-synth", "xd-eval", "xd-report", "xd-queue", "xd-analyze"} <= kinds
    assert {"xd-train", "torchrun"} <= kinds, kinds
    # every training command of the docs ran but the few that need several GPUs or machines
    left = [c for c, _ in skipped if TRAINING.match(c)]
    assert all(re.search("--nnodes|--nproc_per_node", c) for c in left), left
    assert len(trained) >= 8, sorted(trained)
