"""Summary maths of the studies: mean, sample standard deviation and count per cell, and how a cell prints.

For the values x_1..x_n of one cell (one method at one noise rate, over seeds):

    mean = (1/n) sum_i x_i        std = sqrt( sum_i (x_i - mean)^2 / (n - 1) )   (sample std, Bessel)

Non-finite values (a run whose lambda_max was not measured) are left out and
not counted. With n = 1 the std is undefined (nan) and the cell prints the
mean alone; with n = 0 it prints "-".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std (n - 1 in the denominator); nan when n < 2
    n: int


def summarize(values: Iterable[float]) -> Summary:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n)


def cell(s: Summary, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' of scale * x (scale=100 for accuracies in percent); the mean alone for one value."""
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{scale * s.mean:.{digits}f}"
    return f"{scale * s.mean:.{digits}f} ± {scale * s.std:.{digits}f}"


def group(rows: Iterable[dict], by: Callable[[dict], tuple], field: str) -> dict[tuple, Summary]:
    """Summary of `field` over the rows that share a key `by(row)`."""
    values: dict[tuple, list] = defaultdict(list)
    for row in rows:
        values[by(row)].append(row.get(field))
    return {key: summarize(vs) for key, vs in values.items()}


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def paired_differences(rows: list[dict], field: str, method: str, base: str) -> dict[float, Summary]:
    """Per noise rate: the summary over seeds of row[field] of `method` minus that of `base` at the same seed
    (paired: the same corrupted labels, initial weights and batches), over the seeds both have."""
    values = {(r["method"], r["noise"], r["seed"]): r.get(field) for r in rows}
    out = {}
    for noise in sorted({r["noise"] for r in rows}):
        diffs = [v - values[(base, n, s)] for (m, n, s), v in values.items()
                 if m == method and n == noise and (base, n, s) in values]
        out[noise] = summarize(diffs)
    return out


def grid_table(rows: list[dict], methods: list[str], labels: dict[str, str], field: str, scale: float = 1.0,
               digits: int = 2, annotate: Callable[[str, float], str] | None = None,
               noises: list[float] | None = None) -> str:
    """Markdown: a row per noise rate, a column per method, cells 'mean ± std' of scale * field over seeds,
    followed by annotate(method, noise) when given (e.g. a paper's figure)."""
    noises = sorted({r["noise"] for r in rows}) if noises is None else noises
    cells = group(rows, lambda r: (r["method"], r["noise"]), field)
    body = [[f"{noise:.0%}"] + [cell(cells.get((m, noise), Summary(math.nan, math.nan, 0)), scale, digits)
                                + (annotate(m, noise) if annotate else "") for m in methods] for noise in noises]
    return markdown(["noise"] + [labels[m] for m in methods], body)
