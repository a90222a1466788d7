"""The jobs file: CSV ``command,status``, read, checked and written back atomically; the
``xd-*`` programs its commands name, and a command run again (:func:`resumed`), as both
executors need them.

Like the study's ``Jobs.csv``; lines starting with ``#`` and blank lines are kept as they are.
Only ``xd-*`` commands run, as argument lists, never through a shell; every command is checked
before the first one starts. The file is rewritten atomically (temporary file, rename) whenever a
status changes, so neither Ctrl-C nor SIGKILL can leave it half written.

Statuses:

- empty or ``open``: to do;
- ``running: pid N``: started by the local executor (a line found so when the queue starts was
  interrupted and runs again, an ``xd-train`` job with ``--resume``);
- ``submitting: slurm NAME``: about to be given to Slurm under the job name NAME (written before
  ``sbatch``, so a queue killed in between finds the job by its name instead of submitting it
  twice); ``… again``: a job that failed, submitted again (an ``xd-train`` job resumed);
- ``submitted: slurm N``: Slurm job N;
- ``done`` or ``completed``: finished, never rerun (the study's file says ``open``/``completed``;
  a file that uses those words gets ``completed`` written back, any other ``done``);
- ``failed: <log>``: runs again.

Any other status stops the queue before a job starts: a misspelt word must not rerun a finished
job. Two options of a line are the queue's, taken off before the command runs (repeatable):
``--after REF``, the job waits for the line REF, a line number of this file or the run name (or
run folder) of an ``xd-train`` line; ``--slurm KEY=VALUE``, what this job asks Slurm for in place
of the queue's option of that name (``--slurm gpus-per-job=8 --slurm time=3-00:00:00``); the
local executor ignores it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import fcntl
import io
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.fileio import atomic_write
from xdtrain.progress import clock, stamp

HEADER = "command,status"
TO_DO = ("", "open")
FINISHED = ("done", "completed")
SHELL = re.compile(r"[;&|`$<>(){}*?!~\\\n]")
RUNNING = re.compile(r"running: pid (\d+)")
SUBMITTING = re.compile(r"submitting: slurm (\S+)( again)?")
SUBMITTED = re.compile(r"submitted: slurm (\d+(?:_\d+)?)")
# the same, as a person may type them (any case, any spacing): read back in the forms above
TYPED = {
    "running: pid {}": re.compile(r"running\s*:\s*pid\s+(\d+)", re.I),
    "submitting: slurm {}{}": re.compile(r"submitting\s*:\s*slurm\s+(\S+)(\s+again)?", re.I),
    "submitted: slurm {}": re.compile(r"submitted\s*:\s*slurm\s+(\d+(?:_\d+)?)", re.I),
}
AGAIN = re.compile(r"\s+again", re.I)


@dataclass
class Line:
    """One line of the jobs file; ``command`` is None for the header, comments and blanks."""

    text: str  # the line as read
    command: str | None = None
    status: str = ""
    argv: list[str] = field(default_factory=list)  # the command without the queue's options
    after: list[str] = field(default_factory=list)  # the --after references
    slurm: dict[str, str] = field(default_factory=dict)  # the --slurm KEY=VALUE settings
    number: int = 0  # 1-based line number in the file

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def slurm_id(self) -> str | None:
        """The Slurm job id of a ``submitted: slurm N`` line."""
        match = SUBMITTED.fullmatch(self.status)
        return match.group(1) if match else None

    @property
    def slurm_name(self) -> str | None:
        """The job name of a ``submitting: slurm NAME`` line."""
        match = SUBMITTING.fullmatch(self.status)
        return match.group(1) if match else None

    @property
    def pid(self) -> int | None:
        """The process id of a ``running: pid N`` line."""
        match = RUNNING.fullmatch(self.status)
        return int(match.group(1)) if match else None


def parse(path: Path) -> list[Line]:
    """Every line of the jobs file at ``path``; raises :class:`UserError` naming the line for a
    bad header, row, status or command."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets write a byte-order mark
    except FileNotFoundError:
        raise UserError(
            f"{path}: no jobs file; write one (command,status) or use xd-queue grid"
        ) from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a jobs file (command,status)") from None
    except UnicodeDecodeError:
        raise UserError(
            f"{path}: not UTF-8 text; save it as CSV UTF-8 (a spreadsheet's 'CSV UTF-8' format)"
        ) from None
    lines = text.splitlines()
    if not lines or lines[0].replace(" ", "").lower() != HEADER:
        raise UserError(f"{path}: line 1 must be the header {HEADER!r}")
    out = [Line(lines[0], number=1)]
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip() or raw.lstrip().startswith("#"):
            out.append(Line(raw, number=number))
            continue
        try:
            (fields,) = list(csv.reader([raw]))
        except ValueError:
            raise UserError(f"{path}: line {number}: not a CSV row") from None
        if len(fields) not in (1, 2):
            raise UserError(f"{path}: line {number}: expected command,status; quote commas")
        command = fields[0].strip()
        status = fields[1].strip() if len(fields) == 2 else ""
        argv, after, slurm = queue_options(check_command(command, path, number), path, number)
        status = check_status(status, path, number)
        out.append(Line(raw, command, status, argv, after, slurm, number))
    return out


def jobs(lines: list[Line]) -> list[Line]:
    """The lines that hold a command."""
    return [line for line in lines if line.command is not None]


def check_status(status: str, path: Path, number: int) -> str:
    """``status`` as the queue reads it (the words in lower case); refuses unknown words."""
    word = status.lower()
    if word in TO_DO or word in FINISHED:
        return word
    for form, pattern in TYPED.items():
        match = pattern.fullmatch(status.strip())
        if match:
            values = [" again" if g and AGAIN.fullmatch(g) else g or "" for g in match.groups()]
            return form.format(*values)
    if word.startswith("failed"):
        return "failed" + status[len("failed") :]
    raise UserError(
        f"{path}: line {number}: unknown status {status!r}; write open (or leave it empty) to "
        "run the job, completed or done to skip it"
    )


def check_command(command: str, path: Path, number: int) -> list[str]:
    """The argument list of ``command``; refuses anything but a plain ``xd-*`` command."""
    where = f"{path}: line {number}"
    if SHELL.search(command):
        raise UserError(
            f"{where}: shell syntax is not run ({command[:60]!r}); write a plain xd-* command"
        )
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    if not argv or not re.fullmatch(r"xd-[a-z]+", argv[0]):
        raise UserError(f"{where}: only xd-* commands run, not {argv[0] if argv else 'nothing'!r}")
    return argv


def queue_options(argv: list[str], path: Path, number: int):
    """``argv`` without the queue's ``--after REF`` and ``--slurm KEY=VALUE`` options; the
    REFs; the Slurm settings (keys without leading dashes)."""
    kept, after, slurm = [], [], {}
    items = iter(argv)
    for item in items:
        name, eq, value = item.partition("=")
        if name not in ("--after", "--slurm"):
            kept.append(item)
            continue
        if not eq:
            value = next(items, None)
        if not value:
            raise UserError(
                f"{path}: line {number}: {name} needs a value: --after 12 (a line number or run "
                "name), --slurm gpus-per-job=8"
            )
        if name == "--after":
            after.append(value)
            continue
        key, eq, setting = value.partition("=")
        key = key.strip().lstrip("-")
        if not key or (eq and not setting):
            raise UserError(
                f"{path}: line {number}: --slurm {value!r}: write KEY=VALUE (or a KEY alone for "
                "a flag such as hold)"
            )
        slurm[key] = setting if eq else True
    return kept, after, slurm


def alive(pid: int, program: str) -> bool:
    """Whether process ``pid`` runs ``program`` (not a reused pid of another program)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return program in cmdline


def announce(line: Line, seconds: float | None = None) -> None:
    """Say that a job ended: ``12:00:07 done: line 7 after 0:01:05: xd-train …`` (how long it
    ran, where known) or ``… failed: line 7 …``, a failure followed by its log and the log's
    last line (the one-line error of an ``xd-*`` program; see :func:`last_words`)."""
    word, _, log = line.status.partition(": ")
    took = f" after {clock(seconds)}" if seconds is not None else ""
    print(f"{stamp()} {word}: line {line.number}{took}: {line.command}", flush=True)
    if word == "failed" and log:
        path = Path(LOST.sub("", log))
        last = last_words(path)
        print(f"  its log: {log}" + (f"; it ends: {last}" if last else ""), flush=True)


LOST = re.compile(r" \(lost\)$")  # the Slurm executor's mark on a job Slurm forgot
CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|[\x00-\x1f\x7f]")


def last_words(path: Path, limit: int = 200) -> str:
    """The last line a job wrote to its log at ``path``, without terminal control sequences
    or other control characters, at most ``limit`` characters; ``(no output)`` when the job
    wrote nothing after the ``$ command`` line the queue starts its log with; ``""`` when the
    log cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 8192))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [CONTROL.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines or lines[-1].startswith("$ "):
        return "(no output)"
    last = lines[-1]
    return last if len(last) <= limit else last[: limit - 1] + "…"


def executable(name: str) -> str:
    """The ``xd-*`` program beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserError(
            f"{name}: no such xd-* program here (a typo, or xdtrain is not installed in this "
            "environment)"
        )
    return found


def check_programs(path: Path, lines: list[Line]) -> None:
    """Every job to do names an installed ``xd-*`` program; else one line naming the line."""
    for line in jobs(lines):
        if not line.finished:
            try:
                executable(line.argv[0])
            except UserError as exc:
                raise UserError(f"{path}: line {line.number}: {exc}") from None


def resumed(argv: list[str]) -> list[str]:
    """``argv`` to run a job again that was interrupted or failed: an ``xd-train`` job
    continues its run folder (``--resume``, in place of a ``--force`` that would start it
    over)."""
    if argv[0] != "xd-train":
        return list(argv)
    out = [a for a in argv if a != "--force"]
    return out if "--resume" in out else [*out, "--resume"]


def done_word(lines: list[Line]) -> str:
    """``completed`` in a file that uses the study's words (open/completed), else ``done``."""
    used = {line.status for line in jobs(lines)}
    return "completed" if used & {"open", "completed"} else "done"


def render(lines: list[Line], newline: str = "\n") -> str:
    """The jobs file's text, each line ending in ``newline``."""
    out = []
    for line in lines:
        if line.command is None:
            out.append(line.text)
            continue
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([line.command, line.status])
        out.append(buffer.getvalue())
    return newline.join(out) + newline


def writer(path: Path):
    """A function that writes the statuses of ``lines`` back to ``path`` as it was written:
    with its byte-order mark and line endings (CRLF from Windows spreadsheets), atomically.

    A queue follows its jobs for days: when the file was edited since the queue last read or
    wrote it (lines added, removed or moved), the statuses are written into the file as it
    is now, each onto the line with the same command (in order, for repeated commands), and
    the edits are kept; lines added there run at the next ``xd-queue``."""
    raw = path.read_bytes()
    mark = "\ufeff" if raw.startswith(codecs.BOM_UTF8) else ""
    newline = "\r\n" if b"\r\n" in raw else "\n"
    state: dict = {"bytes": raw, "base": None}  # the file as last seen; its lines, once edited

    def save(lines: list[Line]) -> None:
        try:
            now = path.read_bytes()
        except FileNotFoundError:
            now = state["bytes"]
        if now != state["bytes"]:
            # edited meanwhile: write into its lines (an edit that does not parse yet: into
            # the last one that did)
            with contextlib.suppress(UserError):
                state["base"] = parse(path)
        out = lines
        if state["base"] is not None:
            out = state["base"]
            pending: dict[str, list[Line]] = {}
            for line in jobs(lines):
                pending.setdefault(line.command, []).append(line)
            for line in jobs(out):
                matched = pending.get(line.command)
                if matched:
                    line.status = matched.pop(0).status
        text = (mark + render(out, newline)).encode("utf-8")
        atomic_write(path, text)
        state["bytes"] = text

    return save


@contextlib.contextmanager
def locked(jobs_file: Path):
    """Hold ``.<jobs file>.lock`` beside the jobs file while a queue runs it: a second
    ``xd-queue`` on the same file would start or submit its jobs twice. Released when the
    process ends, however it ends (an ``flock``: on a file system shared by several hosts it
    holds where the file system supports it)."""
    path = jobs_file.with_name(f".{jobs_file.name}.lock")
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise UserError(
                f"{path}: another xd-queue (pid {holder}) runs this jobs file; wait for it or "
                "stop it (xd-queue status shows the jobs meanwhile)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
