"""No identifier of a DICOM export reaches anything xdtrain writes.

A synthetic export (:mod:`xdtrain.synth.dicom`: names, IDs, dates, addresses, physicians,
UIDs, descriptions holding the surname, an SR, a presentation state and an RT structure set
carrying them too, a DICOMDIR listing them) is made harder the way real exports are: one
series is moved into a folder named by the PatientID with files named by their
SOPInstanceUID (the missing-slice series: its split note names one of them), and a damaged
file sits in a folder named ``Surname_Given`` under a name made of the birth date and the
accession number (the error that skips its series names it).

Every identifying value is collected here from the headers with pydicom (all person names and
their parts, IDs, addresses, institutions, station, descriptions and free text and the
random words in them, all dates, times and date-times, all UIDs but the well-known SOP class
and transfer syntax ones), and searched for, in several spellings, in every byte of every
file the whole flow writes (an interrupted ``xd-shard`` run as it was left, the resumed run,
``xd-shard info``/``verify``, ``xd-train``, ``xd-eval``, ``xd-report``: shards, indexes,
manifest, state and spool, run folder with checkpoints, TensorBoard events and plots, report)
and in the captured stdout and stderr of every command. Only the pseudonym key is exempt; it
lies outside ``--src`` and ``--out`` (and its value is written nowhere either).

The search can fail: it finds every value in the raw export, and planted copies in other
cases, UTF-16 and compressed containers. Three faults it found have tests of their own:
2.25 UIDs naming files were not scrubbed; a damaged file read before its patient's headers
kept the PatientID in its path; Rich swallowed ``[redacted]`` in the printed summary.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from helpers import ROOT

from xdtrain.errors import UserError, run_cli
from xdtrain.shards import manifest as manifest_mod
from xdtrain.shards.cli import main as shard_main
from xdtrain.shards.pseudonyms import REDACTED
from xdtrain.synth import dicom as synth
from xdtrain.synth import generate

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
COUNT = 6  # patients 0-5: every quirk but the slope series, 11 CT series
SEED = 3
MISSING = (2, 1)  # (patient, study) of the series with a missing slice: split, with a note
DAMAGED = (5, 1)  # the series one of whose files is truncated: skipped, with the file named

# --------------------------------------------------------------------------- identifiers

TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "AE"}
DATE_VRS = {"DA", "TM", "DT"}
# Text elements that name the equipment or the coding, not a person, place, study or series.
NOT_IDENTIFYING = {
    "Manufacturer",
    "ManufacturerModelName",
    "ImplementationVersionName",
    "CodeMeaning",
    "CodeValue",
    "CodingSchemeDesignator",
    "RescaleType",
    "ROIName",
    "StructureSetLabel",
    "StackID",
    "PositionReferenceIndicator",
    "ImplementationClassUID",  # pydicom's, the same in every file it writes
}
# Words of the generator's free-text templates that identify nobody (and some of which the
# outputs hold legitimately: the class names).
COMMON_WORDS = {
    "street",
    "general",
    "hospital",
    "abdomen",
    "chest",
    "head",
    "axial",
    "tilted",
    "contours",
    "window",
    "acute",
    "findings",
    "rtstruct",  # a modality, in the non-image objects' series descriptions
}
MIN_LENGTH = 4  # shorter spellings (a sex, "CT") would match by chance


def _date_spellings(value: str) -> set[str]:
    y, m, d = value[:4], value[4:6], value[6:8]
    return {value, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}"} | {
        f"{d}.{m}.{y}",
        f"{d}/{m}/{y}",
        f"{m}/{d}/{y}",
    }


def spellings(vr: str, value: str) -> set[str]:
    """The spellings of one header value searched for (before case folding).

    A bare DICOM time (HHMMSS, 6 digits) is searched only as HH:MM:SS and inside its
    date-time: as a bare number it turns up by chance in a tar offset of a .idx file or the
    digits of a float, while the dates (8 digits) and UIDs (tens of digits) do not.
    """
    value = value.strip()
    out: set[str] = set()
    if not value:
        return out
    if vr == "DA" and re.fullmatch(r"\d{8}", value):
        out |= _date_spellings(value)
    elif vr == "TM" and re.fullmatch(r"\d{6}(\.\d+)?", value):
        out.add(f"{value[:2]}:{value[2:4]}:{value[4:6]}")
    elif vr == "DT":
        out.add(value)
        if re.fullmatch(r"\d{8}.*", value):
            out |= _date_spellings(value[:8])
    elif vr == "UI":
        out.add(value)
        if value.startswith("2.25."):  # a UUID as an integer: also as the UUID
            number = int(value[5:])
            out |= {value[5:], str(uuid.UUID(int=number)), f"{number:032x}"}
    else:
        out.add(value)
        if vr == "PN":
            parts = [p for p in re.split(r"[\^=]", value) if p]
            out |= set(parts)
            out |= {value.replace("^", sep) for sep in (" ", "_", ", ", "")}
            out |= {" ".join(reversed(parts)), ", ".join(parts), "_".join(parts)}
        for word in re.findall(r"[A-Za-z0-9]+", value):
            if word.lower() not in COMMON_WORDS and not (word.isdigit() and len(word) < 8):
                out.add(word)
    return {s for s in out if len(s) >= MIN_LENGTH}


def _elements(ds):
    yield from ds.iterall()
    if getattr(ds, "file_meta", None) is not None:
        yield from ds.file_meta.iterall()


def identifiers_of(folder: Path) -> dict[str, str]:
    """``{spelling: "Keyword=value | …"}`` for every identifying value in the DICOM files
    below ``folder`` (DICOMDIR records, SR text, PR and RT objects included)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        for element in _elements(ds):
            if element.VR not in TEXT_VRS | DATE_VRS | {"UI"}:
                continue
            if element.keyword in NOT_IDENTIFYING:
                continue
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                if value is None:
                    continue
                text = str(value)
                if element.VR == "UI" and text in pydicom.uid.UID_dictionary:
                    continue  # SOP classes, transfer syntaxes: the same in every export
                for spelling in spellings(element.VR, text):
                    found[spelling].add(f"{element.keyword}={text}")
    return {spelling: " | ".join(sorted(whats)) for spelling, whats in found.items()}


# --------------------------------------------------------------------------- search


def _trie(words: list[bytes]) -> bytes:
    """One regular expression matching any of ``words``, as a trie (fast to scan)."""
    root: dict = {}
    for word in words:
        node = root
        for byte in word:
            node = node.setdefault(byte, {})
        node[-1] = {}

    def emit(node: dict) -> bytes:
        alternatives = [
            re.escape(bytes([b])) + emit(child) for b, child in sorted(node.items()) if b != -1
        ]
        if not alternatives:
            return b""
        if len(alternatives) == 1 and -1 not in node:
            return alternatives[0]
        return b"(?:" + b"|".join(alternatives) + b")" + (b"?" if -1 in node else b"")

    return emit(root)


class Search:
    """Finds any of many strings, case-folded, as UTF-8 or UTF-16 (either byte order), in
    bytes; also inside what those bytes hold compressed (zip members, gzip, PNG zTXt/iTXt
    text chunks, wherever a PNG starts)."""

    def __init__(self, identifiers: dict[str, str]):
        # needle -> (spelling, "Keyword=value | …", encoding). UTF-16 as little-endian
        # without its last zero byte: "a\0b\0c" is inside both "a\0b\0c\0" and "\0a\0b\0c".
        self.needles: dict[bytes, tuple[str, str, str]] = {}
        for spelling, what in identifiers.items():
            folded = spelling.lower()
            self.needles.setdefault(folded.encode(), (spelling, what, "UTF-8"))
            self.needles.setdefault(folded.encode("utf-16-le")[:-1], (spelling, what, "UTF-16"))
        self._by_prefix: dict[bytes, list[bytes]] = defaultdict(list)
        for needle in self.needles:
            self._by_prefix[needle[:MIN_LENGTH]].append(needle)
        body = _trie(sorted(self.needles))
        self._any = re.compile(body)
        self._starts = re.compile(b"(?=" + body + b")")

    def hits(self, blob: bytes) -> set[tuple[str, str, str]]:
        """The needles ``blob`` (or anything compressed in it) contains."""
        found: set[tuple[str, str, str]] = set()
        for part in _expanded(blob):
            folded = part.lower()  # ASCII letters only: the identifiers are ASCII
            if self._any.search(folded) is None:
                continue
            for match in self._starts.finditer(folded):  # every needle at every start
                at = match.start()
                for needle in self._by_prefix.get(folded[at : at + MIN_LENGTH], ()):
                    if folded.startswith(needle, at):
                        found.add(self.needles[needle])
        return found


def _expanded(blob: bytes, depth: int = 0):
    yield blob
    if depth > 3:
        return
    if blob[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error):
            inner = None
        if inner is not None:
            yield from _expanded(inner, depth + 1)
    if blob[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as archive:
                for info in archive.infolist():
                    yield info.filename.encode()
                    if info.compress_type != zipfile.ZIP_STORED:  # stored ones are in blob
                        yield from _expanded(archive.read(info), depth + 1)
        except zipfile.BadZipFile:
            pass
    start = blob.find(b"\x89PNG\r\n\x1a\n")
    while start >= 0:
        yield from _png_texts(blob, start + 8)
        start = blob.find(b"\x89PNG\r\n\x1a\n", start + 8)


def _png_texts(blob: bytes, at: int):
    """The decompressed zTXt and compressed iTXt chunks of the PNG whose chunks start at
    ``at`` (tEXt and uncompressed iTXt are plain bytes of the blob, searched already)."""
    while at + 8 <= len(blob):
        length = int.from_bytes(blob[at : at + 4], "big")
        kind = blob[at + 4 : at + 8]
        data = blob[at + 8 : at + 8 + length]
        try:
            if kind == b"zTXt":
                yield zlib.decompress(data[data.index(b"\0") + 2 :])
            elif kind == b"iTXt":
                keyword_end = data.index(b"\0")
                if data[keyword_end + 1] == 1:  # compressed
                    rest = data[keyword_end + 3 :]
                    rest = rest[rest.index(b"\0") + 1 :]  # language tag
                    yield zlib.decompress(rest[rest.index(b"\0") + 1 :])  # translated keyword
        except (ValueError, IndexError, zlib.error):
            pass
        if kind == b"IEND" or length > len(blob):
            return
        at += 12 + length


def _time_only(what: str) -> bool:
    keywords = [w.split("=")[0] for w in what.split(" | ")]
    return all(k.endswith("Time") and not k.endswith("DateTime") for k in keywords)


def files_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the flow


def _harden(src: Path) -> dict:
    """Move one series into ``<PatientID>/<SOPInstanceUID>`` files and truncate one file of
    another series into ``<Surname>_<Given>/<BirthDate>_<AccessionNumber>``; returns the
    UIDs that name files and the damaged file's path."""
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in files_below(src):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if "SeriesInstanceUID" in ds and ds.Modality == "CT":
            by_series[str(ds.SeriesInstanceUID)].append((path, ds))
    rows = (src / "labels.csv").read_text().splitlines()[1:]
    order = [(p, s) for p in range(COUNT) for s in range(synth.studies_of(p))]
    uid_of = {ps: row.split(",")[2] for ps, row in zip(order, rows, strict=True)}
    made: dict = {"uid names": set()}
    for path, ds in by_series[uid_of[MISSING]]:
        target = src / ds.PatientID / ds.SOPInstanceUID
        target.parent.mkdir(exist_ok=True)
        shutil.move(path, target)
        made["uid names"].add(str(ds.SOPInstanceUID))
    path, ds = sorted(by_series[uid_of[DAMAGED]], key=lambda item: item[0])[3]
    family, given = str(ds.PatientName).split("^")
    target = src / f"{family}_{given}" / f"{ds.PatientBirthDate}_{ds.AccessionNumber}"
    target.parent.mkdir()
    target.write_bytes(path.read_bytes()[:-200])  # the pixel data cut short
    path.unlink()
    made["damaged"] = str(target.relative_to(src))
    return made


def _run(command: list[str], cwd: Path, env: dict, outputs: Path, name: str, ok=(0,)):
    """A command in its own process; its stdout and stderr kept in ``outputs``."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=300)
    (outputs / f"{name}.stdout").write_bytes(done.stdout)
    (outputs / f"{name}.stderr").write_bytes(done.stderr)
    assert done.returncode in ok, (name, done.returncode, done.stderr.decode()[-3000:])
    return done


def _run_here(main, argv: list[str], outputs: Path, name: str) -> None:
    """A command's ``main`` in this process (xd-train, xd-eval and xd-report import torch:
    seconds a process), as its console entry point runs it; what it prints, at the level of
    the file descriptors too (native libraries), and its log records (which the command
    would send to stderr, and pytest takes) are kept in ``outputs``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    handler = None
    with (
        open(outputs / f"{name}.stdout", "a", buffering=1) as out,
        open(outputs / f"{name}.stderr", "a", buffering=1) as err,
    ):
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            handler = logging.StreamHandler(err)
            logging.getLogger().addHandler(handler)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run_cli(main, argv)
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    assert code == 0, (name, code, (outputs / f"{name}.stderr").read_text()[-3000:])


_INTERRUPTED = """
import sys
from pytest import MonkeyPatch
sys.path.insert(0, {tests!r})
from helpers import fail_at_close
from xdtrain.shards.cli import main
fail_at_close(MonkeyPatch(), 1)  # the disk fails when the second shard closes
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The whole flow, run as a user would; returns what was read and what was written."""
    from xdtrain.evaluate import main as eval_main
    from xdtrain.report import main as report_main
    from xdtrain.train import main as train_main

    root = tmp_path_factory.mktemp("privacy")
    src = generate("dicom", root / "export", size="small", seed=SEED, count=COUNT)
    made = _harden(src)
    key = root / "keys" / "pseudonym.key"  # outside --src and --out
    out, runs, report = root / "shards", root / "runs", root / "report"
    captured, interrupted = root / "captured", root / "interrupted"
    captured.mkdir()
    config_home = str(root / "config")  # where a forgotten --key-file would put the key
    # COLUMNS: Rich wraps table cells at the terminal's width, which would cut a value in
    # two and hide it from a search; a wide "terminal" keeps every cell on one line
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XDG_CONFIG_HOME": config_home, "PYTHONPATH": path}
    env["COLUMNS"] = "1000"
    pack = [
        "--dataset",
        "dicom",
        "--src",
        str(src),
        "--out",
        str(out),
        "--labels",
        str(src / "labels.csv"),
        "--key-file",
        str(key),
        "--size",
        "32",
        "--shard-size",
        "20KB",
        "--workers",
        "1",
    ]
    script = _INTERRUPTED.format(tests=str(TESTS))
    done = _run(
        [sys.executable, "-c", script, *pack], root, env, captured, "xd-shard-interrupted", ok=(1,)
    )
    assert b"Input/output error" in done.stderr
    shutil.copytree(out, interrupted)  # the state, spool and shards as the failure left them
    assert any(p.name.startswith(".") for p in interrupted.iterdir())
    _run([str(BIN / "xd-shard"), *pack], root, env, captured, "xd-shard")
    _run([str(BIN / "xd-shard"), "info", str(out)], root, env, captured, "xd-shard-info")
    _run([str(BIN / "xd-shard"), "verify", str(out)], root, env, captured, "xd-shard-verify")
    train = [
        str(ROOT / "configs" / "demo" / "ft_ct.yaml"),
        *("--set", f"data.shards={out}", "--set", f"run.output_dir={runs}"),
        *("--set", "train.epochs=1", "--set", "data.image_size=32"),
        *("--set", "data.batch_size=8", "--set", "data.workers=1"),
        *("--set", "train.keep_last=true"),  # the checkpoint is searched for identifiers too
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("XDG_CONFIG_HOME", config_home)
        patch.setenv("COLUMNS", "1000")
        _run_here(train_main, train, captured, "xd-train")
        (run,) = [p for p in runs.iterdir() if p.is_dir()]
        _run_here(eval_main, [str(run), "--split", "test"], captured, "xd-eval")
        _run_here(report_main, [str(runs), "--out", str(report)], captured, "xd-report")
    return {"root": root, "src": src, "key": key, "out": out, "run": run, "made": made}


@pytest.fixture(scope="module")
def search(flow) -> Search:
    return Search(identifiers_of(flow["src"]))


def written(flow) -> list[Path]:
    """Every file the flow wrote, but the export and the key (and the captured output)."""
    root = flow["root"]
    skip = (flow["src"], flow["key"].parent)
    return [p for p in files_below(root) if not any(p.is_relative_to(s) for s in skip)]


# --------------------------------------------------------------------------- tests


def test_the_flow_exercised_what_it_should(flow):
    manifest = manifest_mod.load(flow["out"])
    notes = " ".join(n["input"] + " " + n["note"] for n in manifest["notes"])
    skipped = " ".join(s["input"] + " " + s["reason"] for s in manifest["skipped"])
    assert "split" in notes and REDACTED in notes  # the note on the series moved by ID and UID
    assert "cannot be read or decoded" in skipped and f"{REDACTED}_{REDACTED}/" in skipped
    names = {p.name for p in written(flow)}
    for name in ("final.pt", "last.pt", "metrics.jsonl", "eval_test.json", "manifest.json"):
        assert name in names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".idx") for n in names)
    assert (flow["root"] / "interrupted" / ".xd-shard-state.json").is_file()
    said = {p.name: p.read_text() for p in (flow["root"] / "captured").iterdir()}
    assert "decisions" in said["xd-shard.stderr"] and "notes" in said["xd-shard.stderr"]
    assert "decisions" in said["xd-shard-info.stdout"]
    assert "match the manifest" in said["xd-shard-verify.stdout"]
    assert "test:" in said["xd-train.stdout"] and "eval_test.json" in said["xd-eval.stdout"]
    assert "report" in said["xd-report.stdout"]
    assert stat.S_IMODE(flow["key"].stat().st_mode) == 0o600
    assert not (flow["root"] / "config" / "xdtrain").exists()  # no key in the default place


def test_the_search_finds_every_identifier_in_the_export_itself(flow, search):
    """The search can fail: run over the raw export it finds every value collected, in the
    bytes of the files (or, for values only spelled in their paths, the paths)."""
    found: set[str] = set()
    for path in files_below(flow["src"]):
        found |= search.hits(path.read_bytes())
        found |= search.hits(str(path.relative_to(flow["src"])).encode())
    # bare times (HHMMSS) are not searched (see spellings), so a time is found only where
    # the export spells it otherwise
    values = {what for _, what, _ in search.needles.values() if not _time_only(what)}
    assert len(values) > 200
    found_values = {what for _, what, _ in found}
    assert values - found_values == set()
    kinds = {w.split("=")[0] for what in found_values for w in what.split(" | ")}
    assert search.hits((flow["src"] / "DICOMDIR").read_bytes())  # its records are searched
    for keyword in (
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "PatientBirthDate",
        "PatientAddress",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "StationName",
        "StudyDate",
        "AcquisitionDateTime",
        "StudyID",
        "StudyDescription",
        "SeriesDescription",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "TextValue",  # the SR's text
        "ContentCreatorName",  # the presentation state's
        "ROIInterpreter",  # the RT structure set's
    ):
        assert keyword in kinds, keyword


def test_the_search_sees_other_spellings_encodings_and_compression(search):
    """Planted copies of one name, changed as a careless writer would change them, are found."""
    name = next(what for _, what, _ in search.needles.values() if what.startswith("PatientName="))
    name = name.split(" | ")[0]
    family = name.split("=")[1].split("^")[0]
    png_text = b"Comment\0\0" + zlib.compress(f"patient {family.upper()}".encode())
    png = b"\x89PNG\r\n\x1a\n" + len(png_text).to_bytes(4, "big") + b"zTXt" + png_text + b"CRC!"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", f"x{family.lower()}y" * 3)
    for planted in (
        f"..{family.upper()}..".encode(),
        f"..{family.lower()}..".encode("utf-16-le"),
        f"..{family}..".encode("utf-16-be"),
        f"..{family}..".encode("utf-16"),  # with a byte order mark
        gzip.compress(family.encode()),
        b"\0\1garbage" + png,
        buffer.getvalue(),
    ):
        assert search.hits(planted), planted[:40]
    assert not search.hits(b"nothing of anyone's here: S0123456789ab P0123456789ab head chest")


def _leaks(flow, search) -> list[tuple[str, str, str, str]]:
    """``(file, spelling, "Keyword=value", encoding)`` for every identifier found in what the
    flow wrote (file contents and names, captured output)."""
    files = written(flow)
    assert len(files) > 30
    out = []
    for path in files:
        shown = str(path.relative_to(flow["root"]))
        for hit in search.hits(path.read_bytes()) | search.hits(shown.encode()):
            out.append((shown, *hit))
    return sorted(out)


@pytest.fixture(scope="module")
def leaks(flow, search):
    return _leaks(flow, search)


def _report(hits) -> str:
    return "identifiers written:\n" + "\n".join(
        f"{file}: {spelling!r} ({what}, {encoding})" for file, spelling, what, encoding in hits[:50]
    )


def test_no_identifier_in_anything_xdtrain_wrote(flow, leaks):
    """Every byte written, and every line printed."""
    assert not leaks, _report(leaks)
    key = flow["key"].read_text().strip().encode()
    assert not [p for p in written(flow) if key in p.read_bytes().lower()]


def test_files_named_by_their_uid_are_named_scrubbed(flow):
    """The series moved to <PatientID>/<SOPInstanceUID> (2.25 UIDs) is named in the notes
    with both parts redacted."""
    notes = manifest_mod.load(flow["out"])["notes"]
    named = [n["input"] for n in notes if n["input"].startswith(f"{REDACTED}/")]
    assert named == [f"{REDACTED}/{REDACTED}"], notes
    assert flow["made"]["uid names"] and all(
        u.startswith("2.25.") for u in flow["made"]["uid names"]
    )


# --------------------------------------------------------------------------- focused tests


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    return generate("dicom", tmp_path_factory.mktemp("small"), size="small", seed=7, count=2)


def _copy(small_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_export, tmp_path / "export"))


def _first_slices(src: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The CT slices of the export (localizer left out), sorted by path."""
    out = []
    for path in files_below(src):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.get("Modality") == "CT" and "AXIAL" in ds.get("ImageType", []):
            out.append((path, ds))
    return out


def _pack(src: Path, out: Path, key: Path, *extra: str) -> int:
    return shard_main(
        ["--dataset", "dicom", "--src", str(src), "--out", str(out), "--key-file", str(key)]
        + ["--size", "16", "--workers", "1", *extra]
    )


def test_a_truncated_file_in_a_folder_named_by_its_patient_is_named_scrubbed(
    small_export, tmp_path, capsys
):
    src = _copy(small_export, tmp_path)
    path, ds = _first_slices(src)[0]
    target = src / ds.PatientID / f"{ds.PatientName}_{ds.StudyID}"
    target.parent.mkdir()
    target.write_bytes(path.read_bytes()[:-100])  # its pixel data cut short
    path.unlink()
    assert _pack(src, tmp_path / "out", tmp_path / "key") == 0
    captured = capsys.readouterr()
    (entry,) = manifest_mod.load(tmp_path / "out")["skipped"]
    assert "pixel data" in entry["reason"] and "cannot be read" in entry["reason"]
    # the file is named, with every identifier in its path redacted
    assert entry["reason"].startswith(f"{REDACTED}/{REDACTED}_{REDACTED}: pixel data"), entry
    text = f"{entry}\n{captured.out}\n{captured.err}"
    family, given = str(ds.PatientName).split("^")
    for value in (ds.PatientID, family, given, str(ds.PatientName), ds.StudyID):
        assert value.lower() not in text.lower(), value


def test_an_unreadable_file_read_before_its_patients_files_is_named_scrubbed(
    small_export, tmp_path, capsys
):
    """Exports often hold one folder per patient; an unreadable file that sorts first in it
    (here ``0000``) is read before any header gives the scan the PatientID to scrub."""
    src = _copy(small_export, tmp_path)
    pid = _first_slices(src)[0][1].PatientID
    folder = src / pid
    folder.mkdir()
    for index, path in enumerate(files_below(src)):  # all its files: images, SR, PR, RT
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if ds.get("PatientID") == pid:
            shutil.move(path, folder / f"IM{index:04d}")
    # a DICOM preamble, then a header element whose length does not fit its value
    (folder / "0000").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0\0\0UL\xff\xff" + b"\xff" * 50)
    assert _pack(src, tmp_path / "out", tmp_path / "key") == 0
    captured = capsys.readouterr()
    (entry,) = manifest_mod.load(tmp_path / "out")["skipped"]
    assert "unreadable DICOM header" in entry["reason"]
    assert pid not in f"{entry}\n{captured.out}\n{captured.err}", entry


def test_the_key_file_is_private_and_refused_inside_out_or_src(small_export, tmp_path, capsys):
    src = _copy(small_export, tmp_path)
    out = tmp_path / "out"
    key = tmp_path / "keys" / "pseudonym.key"
    old = os.umask(0)  # even a permissive umask must not make the key readable by others
    try:
        assert _pack(src, out, key) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "created the pseudonym key" in capsys.readouterr().err
    assert re.fullmatch(r"[0-9a-f]{64}\n", key.read_text())
    assert not any(
        key.read_text().strip() in p.read_text(errors="ignore") for p in files_below(out)
    )
    for inside, where in ((out / "pseudonym.key", "--out"), (src / "keys" / "k", "--src")):
        with pytest.raises(UserError, match=f"inside {where}"):
            _pack(src, out, inside, "--force")
        assert not inside.exists()
    # a folder of its own inside --out is inside --out too
    with pytest.raises(UserError, match="inside --out"):
        _pack(src, tmp_path / "out3", tmp_path / "out3" / "keys" / "k")
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize(
    "uid", ["1.2.840.113619.2.55.3.604688119.969.1268071029.320", "1.3.6.1.4.1.9328.50.1.2"]
)
def test_the_scrubber_redacts_uid_shaped_path_parts(uid):
    from xdtrain.shards.pseudonyms import Scrubber

    assert Scrubber()(f"export/{uid}/IM0001") == f"export/{REDACTED}/IM0001"


def test_the_scrubber_redacts_uuid_derived_uids():
    from xdtrain.shards.pseudonyms import Scrubber

    uid = "2.25.131000317215388639621562061273313022838"
    assert Scrubber()(f"export/{uid}/IM0001") == f"export/{REDACTED}/IM0001"


def test_the_summary_names_a_scrubbed_file_as_the_manifest_does(small_export, tmp_path, capsys):
    src = _copy(small_export, tmp_path)
    path, ds = _first_slices(src)[0]
    target = src / ds.PatientID / "IM0001"
    target.parent.mkdir()
    target.write_bytes(path.read_bytes()[:-100])
    path.unlink()
    assert _pack(src, tmp_path / "out", tmp_path / "key") == 0
    (entry,) = manifest_mod.load(tmp_path / "out")["skipped"]
    assert entry["reason"].startswith(f"{REDACTED}/IM0001: ")
    assert f"{REDACTED}/IM0001" in capsys.readouterr().err


def test_what_pydicom_would_print_about_damaged_files_never_reaches_the_terminal(
    small_export, tmp_path
):
    """pydicom warns with a damaged file's full path, and with an invalid value itself; in a
    command of its own (where no test framework catches warnings), nothing of it shows."""
    src = _copy(small_export, tmp_path)
    rle = [
        (p, d)
        for p, d in _first_slices(src)
        if d.file_meta.TransferSyntaxUID.name == "RLE Lossless"
    ]
    path, ds = rle[0]
    # encapsulated pixel data cut short (pydicom warns "End of file reached … in file
    # <path>"), in a folder named by the patient's ID
    target = src / ds.PatientID / "IM1"
    target.parent.mkdir()
    target.write_bytes(path.read_bytes()[:-100])
    path.unlink()
    command = [str(Path(sys.executable).with_name("xd-shard")), "--dataset", "dicom"]
    command += ["--src", str(src), "--out", str(tmp_path / "out"), "--size", "16"]
    command += ["--key-file", str(tmp_path / "key"), "--workers", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr
    family, given = str(ds.PatientName).split("^")
    for value in (ds.PatientID, family, given):
        assert value.lower() not in printed.lower(), (value, printed[-2000:])
    assert "[redacted]/IM1" in manifest_mod.load(tmp_path / "out")["skipped"][0]["reason"]
