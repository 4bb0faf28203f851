"""Tables that fit the terminal by leaving columns out, never by cutting what a user may copy.

rich shrinks a table that is too wide by wrapping and then truncating cells (``smollm2-1…``).
Here every column is either required (shown whole: no wrapping inside a word, no ellipsis) or
optional with a priority; optional columns join in priority order while the table's narrowest
rendering still fits the width. What was left out is returned, so the caller can say where to
see it (a wider terminal, ``--json``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Col:
    header: str
    required: bool = False
    priority: int = 0  # optional columns: lower joins first
    wrap: bool = False  # may wrap between words (free text); else one line, never cut
    min_width: int | None = None  # a wrapping column is shown only with at least this width
    justify: str = "left"


def fit_table(width: int, cols: list[Col], rows: list[list[str]], **table_kw):
    """-> (rich Table with the columns that fit, headers left out), or (None, all optional headers)
    when even the required columns are wider than ``width``."""
    from rich.cells import cell_len
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=1 << 16, file=_NullFile(), color_system=None)  # measuring clamps to this width

    def build(keep: list[int]):
        from rich.table import Table

        t = Table(**table_kw)
        for i in keep:
            c = cols[i]
            # rich measures a cell by its longest word; a one-line column needs its longest cell
            whole = max([cell_len(c.header)] + [cell_len(line) for r in rows for line in r[i].splitlines()])
            t.add_column(
                c.header,
                justify=c.justify,
                no_wrap=not c.wrap,
                overflow="fold",
                min_width=c.min_width if c.wrap else whole,
            )
        for r in rows:
            t.add_row(*(r[i] for i in keep))
        return t

    def fits(keep: list[int]) -> bool:
        return Measurement.get(console, console.options, build(keep)).minimum <= width

    keep = [i for i, c in enumerate(cols) if c.required]
    optional = sorted((i for i, c in enumerate(cols) if not c.required), key=lambda i: cols[i].priority)
    if not fits(keep):
        return None, [cols[i].header for i in optional]
    for i in optional:
        if fits(sorted(keep + [i])):
            keep = sorted(keep + [i])
    return build(keep), [cols[i].header for i in optional if i not in keep]


class _NullFile:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass
