"""Writing one WebDataset shard: a GNU tar file plus the DALI index that describes it.

A sample is a key (ASCII letters, digits, ``_`` and ``-``: see :func:`key_problem`) and its
components (``key.jpg``, ``key.cls``, ...), written as consecutive tar members. Members are
GNU-format, 512-byte aligned, with fixed owner, mode and time, so the same samples always
give the same bytes. The shard is written under a hidden temporary name and renamed only once
complete, together with its index, so a reader never sees half a shard.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from xdtrain.fileio import atomic_write, start_writeback

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default record: archives end on a multiple of it
INDEX_VERSION = "v1.2"  # the format wds2idx writes and fn.readers.webdataset reads
# Bytes gathered before a write: few system calls, but none of 2 MiB or more (page-cache
# writes that large can take several times longer on virtual machines, see benchmarks.md).
CHUNK = 1 << 20
_ZEROS = bytes(BLOCK)
# What a sample key may hold (a regular-expression character class): see key_problem.
KEY_CHARACTERS = "A-Za-z0-9_-"
_KEY = re.compile(f"[{KEY_CHARACTERS}]+")


@dataclass
class ShardInfo:
    """What the manifest records of a finished shard."""

    name: str
    samples: int
    bytes: int
    sha256: str


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


# The header of every member differs only in name, size and checksum: fill a template.
_TEMPLATE = _tarfile_header("", 0)
_NAME_FIELD = bytes(100)
_AFTER_NAME = _TEMPLATE[100:124]  # mode, owner, group
_AFTER_SIZE = _TEMPLATE[136:148]  # modification time
_AFTER_CHKSUM = _TEMPLATE[156:]  # type, magic, owner names, ...
# the checksum of the template with empty name and size fields (checksum field as spaces)
_BASE_SUM = sum(_TEMPLATE[:124]) + sum(_AFTER_SIZE) + 8 * 32 + sum(_AFTER_CHKSUM)


def member_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header of a regular file, with reproducible metadata.

    Byte for byte what ``tarfile`` writes for the same member (a test checks it), but built
    from a template: ``TarInfo.tobuf`` costs more than copying a 100 kB JPEG.
    """
    raw = name.encode("utf-8")
    if len(raw) >= 100 or size >= 8**11:  # long names and huge files: tarfile's extensions
        return _tarfile_header(name, size)
    size_field = b"%011o\0" % size
    checksum = _BASE_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw,
            _NAME_FIELD[len(raw) :],
            _AFTER_NAME,
            size_field,
            _AFTER_SIZE,
            b"%06o\0 " % checksum,
            _AFTER_CHKSUM,
        )
    )


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key, or None.

    webdataset takes a member's key as its name up to the first dot (slashes would make it
    a folder), and a DALI index is text split at spaces: a key is one or more of
    :data:`KEY_CHARACTERS` and nothing else. Packers derive keys from file names with
    :func:`xdtrain.shards.base.sample_key`, which only ever gives such keys.
    """
    if not key:
        return "empty sample key"
    if not _KEY.fullmatch(key):
        return f"sample key {key!r} holds characters other than A-Z, a-z, 0-9, _ and -"
    return None


def check_key(key: str) -> None:
    """Refuse a key that :func:`key_problem` finds fault with (the writer's own guard)."""
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(problem)


class ShardWriter:
    """Write samples into ``path`` (a ``.tar``) and its DALI index ``path`` with ``.idx``.

    Components are gathered into chunks of about ``CHUNK`` bytes and written with one
    ``writev`` each, without copying them into one buffer first. A helper thread computes
    the sha256 by reading each chunk back from the page cache and, when the shard is to be
    fsynced, asks the kernel to start writing it to disk: the calling thread only gathers
    and writes, and the final fsync waits for little more than the last chunk.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync  # close() makes the shard durable before renaming it
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1)
        self._hashing: list[Future] = []
        self._parts: list[bytes] = []
        self._written = 0  # bytes on disk (in the page cache)
        self._hash_buffer = memoryview(bytearray(CHUNK))
        self._offset = 0  # bytes added, written or gathered
        self._samples: list[list[tuple[str, int, int, str]]] = []  # (ext, offset, size, name)
        self.closed = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._offset

    @property
    def count(self) -> int:
        return len(self._samples)

    def _flush(self) -> None:
        start = self._written
        _write_all(self._fd, self._parts, self._offset - start)
        self._parts, self._written = [], self._offset
        # Hashed at once, while the bytes are still in the processor's cache; in order, as
        # the executor has one thread and a FIFO queue.
        self._hashing.append(self._hasher.submit(self._hash_range, start, self._written))
        if len(self._hashing) > 4:  # report a failed read early; the rest are done
            self._hashing.pop(0).result()

    def _hash_range(self, start: int, end: int) -> None:
        view = self._hash_buffer
        while start < end:
            count = os.preadv(self._fd, [view[: min(len(view), end - start)]], start)
            if count <= 0:
                raise OSError(f"{self.tmp}: could not read back bytes {start}..{end}")
            self._hash.update(view[:count])
            if self.fsync:  # the disk starts on it now; close()'s fsync waits for the rest
                start_writeback(self._fd, start, count)
            start += count

    def add(self, key: str, components: dict[str, bytes]) -> None:
        """Append one sample; ``components`` maps extensions (``jpg``, ``mask.png``) to bytes."""
        check_key(key)
        if not components:
            raise ValueError(f"sample {key!r} has no components")
        members, parts, offset = [], self._parts, self._offset
        for ext, data in components.items():
            name = f"{key}.{ext}"
            size = len(data)
            pad = -size % BLOCK
            header = member_header(name, size)  # 512 bytes, more for a name of 100 or more
            members.append((ext, offset + len(header), size, name))
            parts += (header, data, _ZEROS[:pad])
            offset += len(header) + size + pad
        self._offset = offset
        self._samples.append(members)
        if offset - self._written >= CHUNK:
            self._flush()

    def index_text(self) -> str:
        """The DALI index: ``v1.2 N``, then per sample ``ext offset size name`` per component."""
        lines = [f"{INDEX_VERSION} {len(self._samples)}"]
        for members in self._samples:
            lines.append(
                " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)
            )
        return "\n".join(lines) + "\n"

    def close(self) -> ShardInfo:
        """Finish the archive, write the index, fsync (if asked) and rename both into place."""
        end = 2 * BLOCK
        end += -(self._offset + end) % RECORD
        self._parts.append(bytes(end))
        self._offset += end
        self._flush()
        for hashing in self._hashing:
            hashing.result()
        self._hasher.shutdown()
        if self.fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        atomic_write(index_path(self.path), self.index_text(), fsync=self.fsync)
        os.replace(self.tmp, self.path)
        self.closed = True
        return ShardInfo(self.path.name, len(self._samples), self._offset, self._hash.hexdigest())

    def abort(self) -> None:
        """Drop the temporary file (on errors)."""
        if not self.closed:
            self._hasher.shutdown(cancel_futures=True)
            os.close(self._fd)
            self.tmp.unlink(missing_ok=True)
            self.closed = True


# writev takes at most IOV_MAX buffers (1024 on Linux)
_MAX_PARTS = 1000
# No single write reaches this size (see CHUNK); a flush is one chunk plus one sample.
_WRITE_LIMIT = 2 << 20


def _write_all(fd: int, parts: list[bytes], total: int) -> None:
    """Write ``parts`` (``total`` bytes) in order, each call under ``_WRITE_LIMIT`` bytes
    and ``_MAX_PARTS`` buffers; one ``writev`` in the usual case."""
    if total < _WRITE_LIMIT and len(parts) <= _MAX_PARTS:
        batches: Iterable[tuple[list, int]] = ((parts, total),)
    else:
        batches = _batches(parts)
    for batch, size in batches:
        written = os.writev(fd, batch)
        if written < size:  # a short write: the rest, from where it stopped
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]


def _batches(parts: list[bytes]) -> Iterator[tuple[list, int]]:
    """``(parts, bytes)`` runs under the limits; a part of a chunk or more, in slices."""
    batch: list = []
    size = 0
    for part in parts:
        views = [part] if len(part) < CHUNK else _slices(part)
        for view in views:
            if batch and (size + len(view) >= _WRITE_LIMIT or len(batch) == _MAX_PARTS):
                yield batch, size
                batch, size = [], 0
            batch.append(view)
            size += len(view)
    if batch:
        yield batch, size


def _slices(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_path(shard: str | os.PathLike) -> Path:
    """``train-000000.tar`` -> ``train-000000.idx``."""
    shard = Path(shard)
    return shard.with_suffix(".idx")


def read_samples(path: str | os.PathLike) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of a shard, in order, grouped by key (for verification and tests)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if samples and samples[-1][0] == key:
                samples[-1][1][ext] = data
            else:
                samples.append((key, {ext: data}))
    return samples


@dataclass
class SampleRef:
    """Where a sample's components lie in a tar file, for reading them back by offset."""

    key: str
    parts: list[tuple[str, int, int]] = field(default_factory=list)  # (ext, offset, size)

    def read(self, fh) -> dict[str, bytes]:
        out = {}
        for ext, offset, size in self.parts:
            fh.seek(offset)
            out[ext] = fh.read(size)
        return out


def parse_index(text: str) -> list[SampleRef]:
    """Read a DALI ``v1.2`` index back into sample references."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION + " "):
        raise ValueError("not a v1.2 DALI index")
    refs = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"malformed index line: {line[:80]!r}")
        name = fields[3]
        ref = SampleRef(name.partition(".")[0])
        for i in range(0, len(fields), 4):
            ref.parts.append((fields[i], int(fields[i + 1]), int(fields[i + 2])))
        refs.append(ref)
    if len(refs) != int(lines[0].split()[1]):
        raise ValueError("index sample count does not match its lines")
    return refs
