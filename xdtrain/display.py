"""How a row of metrics is shown on screen: every metric, the per-class and per-region ones
grouped into one table (rows: the class or region; columns: the metric), and the classes a
mean left out, named.

A metric is per-name when its key is ``<metric><sep><name><suffix>`` for one of the task's
class or region names (``Metrics.names``), with ``sep`` ``_`` or ``/`` and ``suffix`` empty or
starting with ``_``: ``auroc/Atelectasis`` (column ``auroc``), ``dice_NCR/NET`` (``dice``),
``dice_WT_all_pixels`` (``dice_all_pixels``). Every other key is a scalar of the run.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

NOT_METRICS = ("kind", "epoch", "step", "time")
LEFT_OUT = "auroc_left_out"  # the classes a mean AUROC did not average, with the reason


def split_key(key: str, names: Iterable[str]) -> tuple[str, str] | None:
    """``(name, column)`` of a per-name metric key, None for a scalar (see the module)."""
    ordered = sorted(names, key=len, reverse=True)
    for sep in ("/", "_"):  # auroc/<class> before <metric>_<region>: auroc_mean is no class
        for name in ordered:
            at = key.find(f"{sep}{name}")
            if at <= 0:
                continue
            rest = key[at + len(sep) + len(name) :]
            if rest == "" or rest.startswith("_"):
                return name, key[:at] + rest
    return None


def names_in(row: dict) -> list[str]:
    """The class and region names a stored row's keys show, for rows read back without
    their task's metrics object: ``<metric>/<name>`` keys (``<metric>`` without ``_``), and
    ``<name>`` of ``dice_<name>`` keys with an ``iou_<name>`` beside them."""
    names = [k.split("/", 1)[1] for k in row if "/" in k and "_" not in k.split("/", 1)[0]]
    names += [k[5:] for k in row if k.startswith("dice_") and f"iou_{k[5:]}" in row]
    return list(dict.fromkeys(names))


def group(row: dict, names: Iterable[str]) -> tuple[dict, dict[str, dict]]:
    """``(scalars, {name: {column: value}})`` of a metrics row; lists and texts are left to
    :func:`notes`, the row's bookkeeping keys (kind, epoch, step, time) dropped."""
    names = list(names)
    scalars: dict = {}
    table: dict[str, dict] = {n: {} for n in names}
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, list | dict | str):
            continue
        found = split_key(key, names) if names else None
        if found is None or found[1] in table[found[0]]:  # a clash is shown as it is named
            scalars[key] = value
        else:
            table[found[0]][found[1]] = value
    return scalars, {n: v for n, v in table.items() if v}


def text(value) -> str:
    """A value as shown: floats to 4 decimals, None as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def notes(row: dict) -> list[str]:
    """Lines naming what a mean left out (``auroc_left_out``) and the row's other lists."""
    out = []
    left = row.get(LEFT_OUT)
    if left:
        out.append(f"left out of auroc_mean: {', '.join(left)}")
    for key, value in row.items():
        if key != LEFT_OUT and key != "auroc_undefined" and isinstance(value, list) and value:
            out.append(f"{key}: {', '.join(str(v) for v in value)}")
    return out


def tables(row: dict, names: Iterable[str], title: str) -> list[Table]:
    """The rich tables of a row: its scalars, then its per-name metrics."""
    scalars, per_name = group(row, names)
    first = Table(title=title)
    first.add_column("metric")
    first.add_column("value", justify="right")
    for key, value in scalars.items():
        first.add_row(key, text(value))
    out = [first]
    if per_name:
        columns = list(dict.fromkeys(c for values in per_name.values() for c in values))
        second = Table()
        second.add_column("class / region")
        for column in columns:
            second.add_column(column, justify="right")
        for name, values in per_name.items():
            second.add_row(name, *(text(values.get(c)) for c in columns))
        out.append(second)
    return out


def lines(row: dict, names: Iterable[str], head: str) -> list[str]:
    """The same as plain lines for a job log: ``head`` and the scalars on the first line,
    one line per class or region, then the notes."""
    scalars, per_name = group(row, names)
    out = [head + ", ".join(f"{k} {text(v)}" for k, v in scalars.items())]
    for name, values in per_name.items():
        out.append(f"  {name}: " + ", ".join(f"{k} {text(v)}" for k, v in values.items()))
    return out + [f"  {n}" for n in notes(row)]
