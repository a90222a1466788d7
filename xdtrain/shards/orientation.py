"""Voxel orientation and geometry of NIfTI volumes, as every volumetric packer reads them.

The BraTS and LiTS packers read every file through here: one orientation, checked.

Releases store their volumes in different voxel orientations (LiTS holds RAS and LPS
volumes, and masks whose affine differs from their volume's), so slicing the stored arrays
as they are would pack some volumes mirrored against others. Every file is therefore brought
from its own affine to one canonical voxel orientation, :data:`CANONICAL` (LPS: axis 0 runs
to the patient's left, axis 1 to posterior, axis 2 to superior), the orientation of the
BraTS release (affine ``diag(-1, -1, 1)``), which packs unchanged. An axial PNG is
``volume[:, :, k].T``: rows run anterior to posterior, columns from the patient's right to
left (the radiological view), and slice ``k = 0`` is the most inferior.

Reorienting only flips and transposes voxel axes (nibabel's orientation tools); nothing is
resampled. Oblique axes are brought to the closest orientation and noted.

Before a case is packed, the headers of its files (read lazily, at scan time) must agree
in world space once reoriented: same shape, voxel spacing and axis directions, origins
within half a voxel. ``--geometry image`` instead gives every file the affine of the case's
image, for releases whose headers are known to be wrong but whose voxels are aligned.

Trailing axes of length 1 (``X×Y×Z×1``, as some tools save 3-D images) are squeezed;
anything else that is not 3-D is refused with a reason naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from xdtrain.shards.base import SkipItem

CANONICAL = "LPS"  # voxel axes 0, 1, 2 run to the patient's left, posterior, superior
GEOMETRY = {
    "check": "each file's own affine; a case whose files disagree in world space is skipped",
    "image": "every file of a case takes the affine of its image (--geometry image)",
}
# Files agree in world space when, once both are in the canonical orientation, their voxel
# spacings differ by less than SPACING_RTOL (half a voxel of drift over 500 voxels), their
# axes by less than DIRECTION_DEGREES (0.6 mm at the edge of a 35 cm field of view), and
# their origins by less than half a voxel along each axis.
SPACING_RTOL = 1e-3
DIRECTION_DEGREES = 0.1
# Axes further than this from the scanner's axes are oblique: sliced along the closest
# orientation, not resampled, and noted.
OBLIQUE_DEGREES = 0.1


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the voxels of one NIfTI file lie, from its header.

    ``shape`` counts voxels along the file's own axes (trailing axes of length 1 squeezed);
    ``affine`` (4×4 float64) maps voxel indices to world millimetres (RAS+, as NIfTI
    defines them).
    """

    label: str  # what the file is in its case: "flair", "seg", "volume", "segmentation"
    name: str  # the file name, for messages
    shape: tuple[int, int, int]
    affine: np.ndarray
    forms: str | None = None  # its sform and qform in other orientations: "sform RAS, qform LPS"

    @property
    def degenerate(self) -> bool:
        """Whether the affine places the voxels nowhere usable (not finite, or its axes do
        not span 3-D space, as in a header whose voxel sizes are 0)."""
        return not np.isfinite(self.affine).all() or np.linalg.matrix_rank(self.affine[:3, :3]) < 3

    @property
    def codes(self) -> str:
        """Orientation of the stored voxel axes, e.g. ``"RAS"`` (the closest, if oblique)."""
        from nibabel.orientations import aff2axcodes

        return "".join(aff2axcodes(self.affine))

    @cached_property
    def transform(self) -> np.ndarray:
        """(3, 2) int orientation transform from the stored axes to :data:`CANONICAL`:
        row ``i`` = [canonical axis of stored axis ``i``, 1 or -1 (flipped)]."""
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        return ornt_transform(io_orientation(self.affine), axcodes2ornt(CANONICAL)).astype(int)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        order = np.argsort(self.transform[:, 0])
        return tuple(int(self.shape[i]) for i in order)

    @cached_property
    def canonical_affine(self) -> np.ndarray:
        """4×4: canonical voxel indices to world millimetres."""
        from nibabel.orientations import inv_ornt_aff

        return self.affine @ inv_ornt_aff(self.transform, self.shape)

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel size in mm along the canonical axes."""
        return np.linalg.norm(self.canonical_affine[:3, :3], axis=0)

    @property
    def directions(self) -> np.ndarray:
        """3×3: unit world vectors of the canonical axes (columns)."""
        return self.canonical_affine[:3, :3] / self.spacing

    @property
    def obliquity(self) -> float:
        """Degrees between the furthest voxel axis and the world axis closest to it."""
        closest = np.clip(np.abs(self.directions).max(axis=0), 0.0, 1.0)
        return float(np.degrees(np.arccos(closest)).max())


@dataclass
class Case:
    """One case's files, checked to agree in world space, and what was decided for them."""

    files: dict[str, Geometry]  # label -> geometry; the first is the image
    notes: list[str] = field(default_factory=list)  # decisions worth listing in the manifest

    @property
    def image(self) -> Geometry:
        return next(iter(self.files.values()))

    @property
    def reoriented(self) -> bool:
        """Whether any file's voxels are flipped or transposed to reach :data:`CANONICAL`."""
        identity = np.array([[0, 1], [1, 1], [2, 1]])
        return any(not np.array_equal(g.transform, identity) for g in self.files.values())

    def transforms(self) -> dict[str, list[list[int]]]:
        """label -> the file's orientation transform as nested lists, for ``Source.params``."""
        return {label: g.transform.tolist() for label, g in self.files.items()}


def read_case(paths: dict[str, str | Path], geometry: str) -> Case:
    """Read and check the headers of one case's files (the first of ``paths`` is the image
    the others are checked against, or, with ``geometry == "image"``, take the affine of).

    Reads headers only. Raises :class:`SkipItem` with a reason naming the file(s) when a
    file is unreadable, not 3-D, of another shape or placed elsewhere in the world.
    """
    files = {label: read_geometry(path, label) for label, path in paths.items()}
    case = Case(files)
    if case.image.degenerate:
        raise SkipItem(f"{case.image.name} has a degenerate affine ({_DEGENERATE})")
    if geometry == "image":
        _check_shapes(files, stored_only=True)
        _take_image_affine(case)
    else:
        _check_shapes(files, stored_only=False)
        for other in list(files.values())[1:]:
            problem = disagreement(case.image, other)
            if problem:
                raise SkipItem(
                    f"{other.name} and {case.image.name} disagree in world space: {problem} "
                    "(if their voxels are known to align, pass --geometry image)"
                )
    _note_orientations(case)
    return case


def read_geometry(path: str | Path, label: str) -> Geometry:
    """The header of ``path``, without reading its voxels. Raises :class:`SkipItem` when it is
    unreadable or not 3-D once trailing axes of length 1 are squeezed."""
    import nibabel as nib  # imported on use: packing ImageNet does not need it

    name = Path(path).name
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise _unreadable(label, path, exc) from None
    shape = squeezed(image.shape)
    if len(shape) != 3:
        raise SkipItem(
            f"{name} is {len(shape)}-D {tuple(image.shape)}: one 3-D volume per file expected"
        )
    disagreeing = _forms_disagree(image.header)
    return Geometry(label, name, shape, np.asarray(image.affine, dtype=np.float64), disagreeing)


def _forms_disagree(header) -> str | None:
    """Both of a NIfTI header's transforms set (codes > 0) and in other orientations: which
    one a reader trusts decides the anatomy's side. nibabel (and so xd-shard) takes the sform;
    a viewer or converter that takes the qform shows the file mirrored or transposed."""
    from nibabel.orientations import aff2axcodes

    try:
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
    except AttributeError:  # not a NIfTI-1/2 header
        return None
    if not s_code or not q_code:
        return None
    s_codes, q_codes = "".join(aff2axcodes(sform)), "".join(aff2axcodes(qform))
    return None if s_codes == q_codes else f"sform {s_codes}, qform {q_codes}"


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing axes of length 1 beyond the third (as
    :func:`nibabel.funcs.squeeze_image` does, without reading the data)."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def disagreement(image: Geometry, other: Geometry) -> str | None:
    """How ``other``'s voxel grid differs from ``image``'s in world space once both are in the
    canonical orientation (shape, spacing, axis directions, origin), or None if it does not."""
    if other.degenerate:
        return f"degenerate affine ({_DEGENERATE})"
    if image.canonical_shape != other.canonical_shape:
        return f"axes differ ({other.codes} {other.shape} vs {image.codes} {image.shape})"
    if not np.allclose(other.spacing, image.spacing, rtol=SPACING_RTOL, atol=0):
        return f"voxel spacing differs ({_mm(other.spacing)} vs {_mm(image.spacing)} mm)"
    cosines = np.clip((other.directions * image.directions).sum(axis=0), -1, 1)
    angle = float(np.degrees(np.arccos(cosines)).max())
    if angle > DIRECTION_DEGREES:
        return f"axis directions differ by up to {angle:.1f}°"
    shift = other.canonical_affine[:3, 3] - image.canonical_affine[:3, 3]
    in_voxels = np.linalg.solve(image.canonical_affine[:3, :3], shift)
    if np.abs(in_voxels).max() > 0.5:
        return f"origin differs by {np.linalg.norm(shift):.1f} mm"
    return None


def _check_shapes(files: dict[str, Geometry], stored_only: bool) -> None:
    """Raise :class:`SkipItem` when the files' grids differ in size as stored and (unless
    ``stored_only``, where every file takes the image's axes) once reoriented by their own
    affines. Grids of one size reoriented differently are for :func:`disagreement`."""
    stored = {g.shape for g in files.values()}
    usable = [g for g in files.values() if not g.degenerate]
    reoriented = {g.canonical_shape for g in usable}
    if len(stored) > 1 and (stored_only or len(reoriented) > 1 or len(usable) < len(files)):
        listed = ", ".join(f"{label} {g.shape}" for label, g in files.items())
        raise SkipItem(f"volumes of different shapes ({listed})")


def _take_image_affine(case: Case) -> None:
    """``--geometry image``: every file takes the image's affine, its voxels taken as stored;
    a file whose own header placed or ordered them otherwise is noted."""
    image = case.image
    for label, other in list(case.files.items())[1:]:
        problem = disagreement(image, other)
        if problem is None and other.codes != image.codes:
            problem = f"stored {other.codes}, not {image.codes}"
        if problem:
            case.notes.append(
                f"header of {other.name} differs from {image.name} ({problem}); given the "
                f"affine of {image.name} (--geometry image)"
            )
        case.files[label] = replace(other, affine=image.affine)


def _note_orientations(case: Case) -> None:
    """Note files of one case stored in different orientations, and oblique axes."""
    codes = {g.codes for g in case.files.values()}
    if len(codes) > 1:
        stored = ", ".join(f"{g.name} {g.codes}" for g in case.files.values())
        case.notes.append(
            f"files stored in different orientations ({stored}); each brought to "
            f"{CANONICAL} by its own affine"
        )
    for g in case.files.values():
        if g.forms:
            case.notes.append(
                f"{g.name}: header transforms disagree ({g.forms}); the sform was used, as "
                "nibabel does (a viewer that reads the qform shows it otherwise)"
            )
    oblique = max(g.obliquity for g in case.files.values())
    if oblique > OBLIQUE_DEGREES:
        case.notes.append(
            f"oblique axes ({oblique:.1f}° from the scanner axes); sliced along the closest "
            f"orientation ({case.image.codes} stored, {CANONICAL} packed), not resampled"
        )


def orientation_record(original: dict[str, str], reoriented: int) -> dict:
    """``preprocessing.orientation`` of the manifest: the canonical orientation, each case's
    stored orientation (its image's axis codes) and how many cases were reoriented."""
    return {
        "canonical": CANONICAL,
        "png": "rows anterior to posterior, columns patient right to left (radiological view); "
        "slice 0 is the most inferior",
        "original": original,
        "reoriented": reoriented,
    }


# --------------------------------------------------------------------------- voxels


def open_image(path: str | Path, label: str):
    """``path`` as a lazily read nibabel image, kept open for repeated slab reads.
    Raises :class:`SkipItem` if it cannot be read."""
    import nibabel as nib

    try:
        return nib.load(path, keep_file_open=True)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise _unreadable(label, path, exc) from None


def load_canonical(path: str | Path, transform, label: str) -> np.ndarray:
    """The whole 3-D volume of ``path`` in the canonical orientation, in its stored dtype
    (scaled to float where the header has a slope). ``transform`` is
    :attr:`Geometry.transform` (nested lists accepted). Raises :class:`SkipItem` if the
    voxels cannot be read."""
    from nibabel.orientations import apply_orientation

    image = open_image(path, label)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # truncated or damaged voxel data
        raise _unreadable(label, path, exc) from None
    return apply_orientation(data.reshape(squeezed(data.shape)), np.asarray(transform))


def canonical_slabs(image, transform, slab: int, label: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k0, voxels)`` for canonical slices ``k0 … k0 + slab - 1`` of a lazily loaded
    image: ``voxels`` is X×Y×n in the canonical orientation (stored dtype, or float where the
    header scales). Reads only ``slab`` slices at a time, along whichever stored axis becomes
    canonical axis 2, from its far end when that axis is flipped. Raises :class:`SkipItem`
    if a slab cannot be read."""
    from nibabel.orientations import apply_orientation

    transform = np.asarray(transform)
    axis = _slice_axis(transform)
    flipped = transform[axis, 1] == -1
    proxy = image.dataobj
    depth = proxy.shape[axis]
    for k0 in range(0, depth, slab):
        k1 = min(depth, k0 + slab)
        index = [slice(None)] * 3 + [0] * (len(proxy.shape) - 3)  # squeeze trailing 1-axes
        index[axis] = slice(depth - k1, depth - k0) if flipped else slice(k0, k1)
        try:
            voxels = np.asanyarray(proxy[tuple(index)])
        except Exception as exc:  # truncated or damaged voxel data
            raise _unreadable(label, image.get_filename(), exc) from None
        yield k0, apply_orientation(voxels, transform)


def canonical_depth(shape: tuple[int, ...], transform) -> int:
    """Slices along canonical axis 2 of a file of stored ``shape``."""
    return int(shape[_slice_axis(np.asarray(transform))])


def _slice_axis(transform: np.ndarray) -> int:
    """The stored axis that becomes canonical axis 2 (inferior to superior)."""
    return int(np.flatnonzero(transform[:, 0] == 2)[0])


_DEGENERATE = "its voxel axes do not span 3-D space, or are not finite"


def _mm(spacing: np.ndarray) -> str:
    return "×".join(f"{v:.2f}" for v in spacing)


def _unreadable(label: str, path: str | Path, exc: Exception) -> SkipItem:
    """The skip for a file nibabel cannot read: its label, its name and the error, shortened
    and without the (already named) file's full path."""
    name = Path(path).name
    why = str(exc).replace(str(path), name)[:80]
    return SkipItem(f"unreadable {label} NIfTI {name} ({type(exc).__name__}: {why})")
