"""The labels of a user's own data set: a CSV that maps patients, studies, series or files to
one class or several, read at packing time.

Columns: one or more keys (``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``,
``file``: a path below ``--src``) and ``label`` (``labels`` is read too). Several classes in a
cell are separated by ``|`` (ChestX-ray8's convention); any such cell makes the set
multi-label unless ``--label-kind single`` says otherwise. Each row counts at its most
specific non-empty key (file, then series, study, patient), and an input takes the labels of
its most specific matching row. The class list is the CSV's classes, sorted.

The table's values are identifiers: none of them is ever written. The manifest records the
file's sha256 and counts (rows used, rows that matched nothing), never keys.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.errors import UserError
from xdtrain.shards.tar import file_sha256

LEVELS = ("file", "SeriesInstanceUID", "StudyInstanceUID", "PatientID")  # most specific first
LABEL_COLUMNS = ("label", "labels")
SEPARATOR = "|"
KINDS = ("auto", "single", "multi")


@dataclass
class LabelTable:
    """Rows of the labels CSV by level and key; ``classes`` sorted; ``multilabel`` decided."""

    path: Path
    rows: dict[str, dict[str, tuple[str, ...]]]  # level -> key -> class names
    classes: list[str]
    multilabel: bool
    sha256: str
    used: set[tuple[str, str]] = field(default_factory=set)

    def lookup(self, keys: dict[str, str]) -> tuple[str, ...] | None:
        """The classes of an input with these keys (level -> value), or None if no row
        matches; the most specific level wins."""
        for level in LEVELS:
            value = keys.get(level)
            if value is not None and value in self.rows[level]:
                self.used.add((level, value))
                return self.rows[level][value]
        return None

    def vector(self, names: tuple[str, ...]) -> list[int]:
        """Class names to the stored label: ``[index]`` (single) or a multi-hot vector."""
        if self.multilabel:
            return [1 if c in names else 0 for c in self.classes]
        return [self.classes.index(names[0])]

    def record(self) -> dict:
        """For the manifest: no key values, only what identifies the file and its use."""
        total = sum(len(keys) for keys in self.rows.values())
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "rows": total,
            "rows_used": len(self.used),
            "rows_matching_nothing": total - len(self.used),
            "levels": [level for level in LEVELS if self.rows[level]],
            "kind": "multi-label" if self.multilabel else "single-label",
        }


def file_key(text: str, root: Path | None = None) -> str:
    """A ``file`` cell as the path below ``--src`` it names: ``./a/b`` and ``a//b`` are
    ``a/b``; an absolute path inside ``root`` is made relative to it."""
    path = Path(os.path.normpath(text))
    base = Path(os.path.normpath(root.resolve())) if root is not None else None
    if path.is_absolute() and base is not None and path.is_relative_to(base):
        path = path.relative_to(base)
    return path.as_posix()


def read(path: str | Path, kind: str = "auto", root: Path | None = None) -> LabelTable:
    """Read the labels CSV. Raises :class:`UserError` naming the file and line for a missing
    column, an empty label, a key given two different labels, or several classes in a cell
    when ``kind`` is ``single``. Error messages never quote a key (they are identifiers).
    ``file`` cells are normalised by :func:`file_key` against ``root`` (``--src``)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except UnicodeDecodeError:
        raise UserError(f"--labels {path}: not UTF-8 text; save it as UTF-8 CSV") from None
    except (OSError, csv.Error) as exc:
        raise UserError(
            f"--labels {path}: cannot read it as a CSV ({type(exc).__name__})"
        ) from None
    doubled = sorted({c for c in columns if columns.count(c) > 1})
    if doubled:
        raise UserError(f"--labels {path}: column(s) {', '.join(doubled)} appear twice")
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    levels = [level for level in LEVELS if level in columns]
    if label_column is None or not levels:
        raise UserError(
            f"--labels {path}: needs a label column ({' or '.join(LABEL_COLUMNS)}) and at least "
            f"one key column ({', '.join(LEVELS)}); it has {', '.join(columns) or 'none'}"
        )
    table: dict[str, dict[str, tuple[str, ...]]] = {level: {} for level in LEVELS}
    multi = False
    for line, row in enumerate(rows, 2):
        names = tuple(sorted({n.strip() for n in row[label_column].split(SEPARATOR) if n.strip()}))
        level = next((lv for lv in levels if row.get(lv)), None)
        if level is None:
            raise UserError(f"{path}:{line}: no key ({', '.join(levels)}) in this row")
        if not names:
            raise UserError(f"{path}:{line}: empty {label_column}")
        if len(names) > 1:
            if kind == "single":
                raise UserError(
                    f"{path}:{line}: several classes in one cell, but --label-kind single"
                )
            multi = True
        key = file_key(row[level], root) if level == "file" else row[level]
        earlier = table[level].get(key)
        if earlier is not None and earlier != names:
            raise UserError(
                f"{path}:{line}: the {level} of this row has another label in an earlier row; "
                "give each key one row (several classes: join them with |)"
            )
        table[level][key] = names
    if not any(table.values()):
        raise UserError(f"--labels {path}: no rows")
    multilabel = kind == "multi" or (kind == "auto" and multi)
    classes = sorted({n for keys in table.values() for names in keys.values() for n in names})
    if not multilabel and len(classes) < 2:
        raise UserError(f"--labels {path}: a single-label task needs two classes or more")
    return LabelTable(path, table, classes, multilabel, file_sha256(path))
