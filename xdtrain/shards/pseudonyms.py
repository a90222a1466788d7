"""Keyed-hash pseudonyms for patients and series, and scrubbing of identifiers from text.

A hospital's export names patients by their PatientID and series by their UIDs; none of these
may reach a shard, a manifest, a run folder or a message (DICOM PS3.15 Annex E). Each is
replaced by a pseudonym, HMAC-SHA256 of the identifier under a secret key
(:class:`Pseudonyms`): the same patient gets the same pseudonym in every packing run with the
same key, so data packed later joins the same patients, while nobody without the key can test
a guessed PatientID against a pseudonym (a plain hash of a 9-digit ID is reversed in
seconds). The key is a file the user keeps, outside the shard folder, created on first use
(:func:`load_key`).

Paths are the user's own choice and are named in messages, but exports often name folders
and files by PatientID or UID; :class:`Scrubber` removes every identifier value the scan has
read, and anything shaped like a DICOM UID or a date, from text before it is written.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sys
from pathlib import Path

from xdtrain.errors import UserError

KEY_ENV = "XDTRAIN_PSEUDONYM_KEY"  # overrides the default key file location
KEY_BYTES = 32
METHOD = "HMAC-SHA256, first 12 hex digits"


def default_key_file() -> Path:
    """``$XDTRAIN_PSEUDONYM_KEY``, else ``$XDG_CONFIG_HOME/xdtrain/pseudonym.key`` (XDG's
    default ``~/.config``): outside any shard folder, kept across packing runs."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "xdtrain" / "pseudonym.key"


def check_key_place(path: Path, out: Path, src: Path) -> None:
    """Raise :class:`UserError` if the key file lies inside ``out`` or ``src``: a key shipped
    with the shards, or left in the export, makes the pseudonyms reversible."""
    resolved = Path(path).expanduser().resolve()
    for folder, what in ((out, "--out"), (src, "--src")):
        folder = Path(folder).resolve()
        if resolved == folder or folder in resolved.parents:
            raise UserError(
                f"--key-file {path}: inside {what} ({folder}); keep the pseudonym key apart "
                "from the data, e.g. the default ~/.config/xdtrain/pseudonym.key"
            )


def load_key(path: Path) -> bytes:
    """The secret key in ``path`` (64 hex digits), created (mode 0600) if it does not exist.
    Raises :class:`UserError` if the file holds no key."""
    path = Path(path).expanduser()
    if not path.exists():
        key = secrets.token_bytes(KEY_BYTES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(key.hex() + "\n")
        except OSError as exc:
            raise UserError(
                f"--key-file {path}: cannot create the pseudonym key there ({exc.strerror}); "
                "pass a path in a folder you can write"
            ) from None
        print(
            f"xd-shard: created the pseudonym key {path}; keep it (later packing runs with it "
            "give the same patients the same pseudonyms) and never share it with the shards",
            file=sys.stderr,
        )
        return key
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(
            f"--key-file {path}: not a pseudonym key (64 hex digits); pass the key file of "
            "earlier runs, or a path that does not exist yet to create one"
        ) from None
    if len(key) != KEY_BYTES:
        raise UserError(f"--key-file {path}: holds {len(key)} bytes, not {KEY_BYTES}")
    return key


class Pseudonyms:
    """Stable pseudonyms under one key: ``patient("PID123")`` -> ``"P3fa9…"`` (13 characters).

    Raises :class:`UserError` if two identifiers of one kind get the same pseudonym (48 bits:
    about one chance in 10^5 for a million patients), rather than merging them silently.
    """

    def __init__(self, key: bytes):
        self._key = key
        self._seen: dict[tuple[str, str], str] = {}

    @property
    def key_id(self) -> str:
        """Names the key in the manifest without revealing it."""
        return hmac.new(self._key, b"xdtrain key id", hashlib.sha256).hexdigest()[:16]

    def make(self, kind: str, value: str) -> str:
        digest = hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
        pseudonym = kind[0].upper() + digest[:12]
        other = self._seen.setdefault((kind, pseudonym), value)
        if other != value:
            raise UserError(
                f"two {kind}s share the pseudonym {pseudonym}; pack with another --key-file"
            )
        return pseudonym

    def patient(self, value: str) -> str:
        return self.make("patient", value)

    def series(self, value: str) -> str:
        return self.make("series", value)


# Anything shaped like a DICOM UID (digits and at least two dots: ``2.25.<integer>``, the
# UUID-derived form of PS3.5 B.2, has only two) or a date (YYYYMMDD, YYYY-MM-DD, DD.MM.YYYY,
# with -, _, . or nothing between the parts).
_UID = re.compile(r"(?<![\d.])\d+(?:\.\d+){2,}(?![\d.])")
_SEP = r"[-_./]?"
_DAY, _MONTH, _YEAR = r"(?:0[1-9]|[12]\d|3[01])", r"(?:0[1-9]|1[0-2])", r"(?:19|20)\d{2}"
# a date-time's time: DICOM DT (…HHMMSS.FFFFFF), dcm2niix names, ISO (THH:MM:SS)
_TIME = r"(?:[T_\-.\s]?\d{2}(?::?\d{2}){1,2}(?:\.\d+)?)?"
_DATE = re.compile(
    rf"(?<!\d)(?:{_YEAR}{_SEP}{_MONTH}{_SEP}{_DAY}|{_DAY}{_SEP}{_MONTH}{_SEP}{_YEAR}){_TIME}(?!\d)"
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
REDACTED = "[redacted]"
SHORT = 3  # values shorter than this (a 2-letter name part, a 2-digit ID) match whole tokens only


class Scrubber:
    """Removes identifying values from text: the values added with :meth:`add` (any case),
    then every UID- or date-shaped string.

    A value of three characters or more is removed wherever it occurs (``Doe`` in
    ``JohnDoe_CT``); a shorter one only as a whole token between non-alphanumerics (``Li`` in
    ``Li_Bo/``, not in ``Lima``). Scrubbing scrubbed text changes nothing more.
    """

    def __init__(self):
        self._values: set[str] = set()
        self._pattern: re.Pattern | None = None

    def add(self, value, name: bool = False, date: bool = False) -> None:
        """Add a header value (each of a multi-valued element's); ``name``: a person name,
        whose components (``Doe^John``: ``Doe``, ``John``) are added too; ``date``: a DICOM
        date (YYYYMMDD), whose other spellings (YYMMDD, DDMMYYYY, DDMMYY, 15jan2023) are
        added too (YYYY-MM-DD and the like are caught by their shape)."""
        parts = _parts(value, name)
        if date:
            parts = [form for part in parts for form in _date_forms(part)]
        for part in parts:
            if part.lower() not in self._values:
                self._values.add(part.lower())
                self._pattern = None

    def names_a_value(self, text: str) -> bool:
        """Whether ``text`` holds a value added with :meth:`add` (not merely a UID or date
        shape: a folder named by a date is not refused)."""
        self._compile()
        return self._pattern is not None and self._pattern.search(text) is not None

    def __call__(self, text: str) -> str:
        return REDACTED.join(self._scrub(piece) for piece in text.split(REDACTED))

    def _compile(self) -> None:
        if self._values and self._pattern is None:
            ordered = sorted(self._values, key=len, reverse=True)
            alternatives = [
                re.escape(v) if len(v) >= SHORT else rf"(?<![^\W_]){re.escape(v)}(?![^\W_])"
                for v in ordered
            ]
            self._pattern = re.compile("|".join(alternatives), re.I)

    def _scrub(self, text: str) -> str:
        # shapes first: a date-time goes whole, not its date (a value) leaving its time
        text = _DATE.sub(REDACTED, _UID.sub(REDACTED, text))
        self._compile()
        if self._pattern is None:
            return text
        return REDACTED.join(self._pattern.sub(REDACTED, p) for p in text.split(REDACTED))


def _date_forms(value: str) -> list[str]:
    if not re.fullmatch(r"\d{8}", value):
        return [value]
    year, month, day = value[:4], value[4:6], value[6:]
    forms = [value, year[2:] + month + day, day + month + year, day + month + year[2:]]
    if 1 <= int(month) <= 12:
        forms.append(f"{day}{_MONTHS[int(month) - 1]}{year}")
    return forms


def _parts(value, name: bool) -> list[str]:
    """A header value (each value of a multi-valued element) and, for a person name, its
    components."""
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [p for v in value for p in _parts(v, name)]
    text = str(value).strip()
    if not text:
        return []
    pieces = {text, *re.split(r"[\^=\s,]+", text)} if name else {text}
    return [p for p in pieces if p]
