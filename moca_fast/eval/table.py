"""Plain-text tables for the harnesses' reports: left-aligned names, right-aligned numbers."""

from __future__ import annotations


def format_table(header: list[str], rows: list[list], *, digits: int = 1) -> str:
    """Rows of strings and numbers (floats shown with `digits` decimals, None as "-") under a header."""

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    cells = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    numeric = [all(isinstance(row[j], (int, float)) or row[j] is None for row in rows) for j in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
