"""Paper-style tables, ours beside the paper's (Sec. 4, Appendices A and B): markdown and JSON-able dicts.

A :class:`Table` is a title, column headers and rows of cells; a row may carry the paper's figures,
shown in columns of their own beside ours. :func:`error_table` lays out rows of top-1 and top-5
errors as Tables 3 to 6 do; :func:`eval_tables` and :func:`rows_table` show a ``verydeep eval``
result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from verydeep.eval.nets import NetInfo
from verydeep.eval.rows import PROTOCOL_LABELS, EvalResult, EvalRow, scales_label
from verydeep.paper.figures import scale_text


def percent(fraction: float | None) -> str:
    """An error (a fraction) in % with one decimal, as the paper prints it: 0.256 -> ``25.6``; None -> empty."""
    return "" if fraction is None else f"{100 * fraction:.1f}"


def error_pair(top1: float | None, top5: float | None) -> str:
    """Top-1 and top-5 errors (fractions) in one cell, ``25.6 / 8.1``; ``-`` when not measured."""
    return "-" if top1 is None or top5 is None else f"{percent(top1)} / {percent(top5)}"


# ---- tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool = False  # right-aligned


@dataclass(frozen=True)
class Row:
    """Our cells, and the paper's figures for the same row (None where the paper has none)."""

    cells: tuple[str, ...]
    paper: tuple[str, ...] | None = None


@dataclass
class Table:
    """A titled table; the paper's columns follow ours: always (``show_paper`` True), never (False),
    or when a row has the paper's figures (None). ``empty`` stands in for a table without rows."""

    title: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    paper_columns: list[Column] = field(default_factory=list)
    show_paper: bool | None = None
    paper_missing: str = ""  # a paper cell of a row the paper does not report
    empty: str = "(no such rows in this run)"

    @property
    def shows_paper(self) -> bool:
        if not self.paper_columns or self.show_paper is False:
            return False
        return self.show_paper or any(row.paper is not None for row in self.rows)

    def headers(self) -> list[str]:
        return [c.header for c in self.columns + (self.paper_columns if self.shows_paper else [])]

    def cells(self, row: Row) -> list[str]:
        """A row's cells as shown: ours, then the paper's when the table shows them."""
        if not self.shows_paper:
            return list(row.cells)
        return [*row.cells, *(row.paper or [self.paper_missing] * len(self.paper_columns))]

    def markdown(self, heading: str = "") -> str:
        """The table in markdown, under ``heading`` and the title when given (``heading="###"``)."""
        lines = [f"{heading} {self.title}", ""] if heading else []
        if not self.rows:
            return "\n".join([*lines, self.empty])
        shown = self.columns + (self.paper_columns if self.shows_paper else [])
        lines.append("| " + " | ".join(self.headers()) + " |")
        lines.append("|" + "".join("---:|" if c.numeric else "---|" for c in shown))
        lines += ["| " + " | ".join(self.cells(row)) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """``{"title", "columns", "rows"}``: the headers and each row's cells, as :meth:`markdown` shows them."""
        return {"title": self.title, "columns": self.headers(), "rows": [self.cells(row) for row in self.rows]}


def join_markdown(tables: Iterable[Table], heading: str = "###") -> str:
    """Several tables, each under its title, separated by blank lines."""
    return "\n\n".join(table.markdown(heading) for table in tables)


# ---- top-1 / top-5 error tables (Tables 3 to 6) ------------------------------------------


@dataclass(frozen=True)
class ErrorColumns:
    """How a table shows top-1 and top-5 errors: ours, and the paper's beside them; in two columns
    each, or ``paired`` in one ``top-1 / top-5`` cell each."""

    ours: tuple[Column, ...]
    paper: tuple[Column, ...]
    paired: bool = False
    show_paper: bool | None = None
    paper_missing: str = ""

    def cells(self, top1: float | None, top5: float | None) -> tuple[str, ...]:
        return (error_pair(top1, top5),) if self.paired else (percent(top1), percent(top5))


#: Two columns each, the paper's shown when a row has them (``verydeep eval``).
SEPARATE = ErrorColumns(
    ours=(Column("top-1 val. error (%)", numeric=True), Column("top-5 val. error (%)", numeric=True)),
    paper=(Column("paper top-1", numeric=True), Column("paper top-5", numeric=True)),
)

#: One ``top-1 / top-5`` cell each, the paper's always shown (``verydeep reproduce``).
PAIRED = ErrorColumns(ours=(Column("top-1 / top-5 err. % (ours)"),), paper=(Column("(paper)"),), paired=True,
                      show_paper=True, paper_missing="-")


def error_row(labels: Sequence[str], row: EvalRow, errors: ErrorColumns, extra: Sequence[str] = ()) -> Row:
    """A table row: ``labels``, our errors, ``extra`` cells, and the paper's errors when it reports the row."""
    figures = row.paper
    paper = None if figures is None else errors.cells(figures.top1_error, figures.top5_error)
    return Row((*labels, *errors.cells(row.top1_error, row.top5_error), *extra), paper)


def error_table(title: str, labels: Sequence[str], entries: Iterable[tuple[Sequence[str], EvalRow]],
                errors: ErrorColumns, empty: str = "(no such rows in this run)") -> Table:
    """A table of rows (label cells, measured row): the labels' columns, then our errors and the paper's."""
    return Table(title, [Column(label) for label in labels] + list(errors.ours),
                 [error_row(cells, row, errors) for cells, row in entries], list(errors.paper), errors.show_paper,
                 errors.paper_missing, empty)


# ---- verydeep eval ------------------------------------------------------------------------


def _model_label(net: NetInfo, nets: dict[str, NetInfo]) -> str:
    """The configuration (``D``, ``A-BN``), or the net's full name when two nets share it."""
    twins = [n for n in nets.values() if (n.model, n.train_scale) == (net.model, net.train_scale)]
    return net.name if len(twins) > 1 else net.model


def _train_label(net: NetInfo) -> str:
    return "" if net.train_scale is None else scale_text(*net.train_scale)


def eval_tables(result: EvalResult) -> list[Table]:
    """An evaluation's rows in the layout of the paper's Tables 3 (single scale), 4 (multi-scale),
    5 (evaluation methods) and 6 (fusion), the paper's figures beside ours where it reports them."""
    nets = {n.name: n for n in result.nets}
    errors = replace(SEPARATE, show_paper=any(r.paper is not None for r in result.rows))
    single = [r for r in result.rows if not r.fusion]

    def by_scale(row: EvalRow) -> tuple[list[str], EvalRow]:
        net = nets[row.nets[0]]
        return [_model_label(net, nets), _train_label(net), scales_label(row.scales)], row

    def by_method(row: EvalRow) -> tuple[list[str], EvalRow]:
        net = nets[row.nets[0]]
        label = _model_label(net, nets)  # a twin's full name holds its S already
        label += f" (S={_train_label(net)})" if _train_label(net) and label == net.model else ""
        return [label, PROTOCOL_LABELS[row.protocol], scales_label(row.scales)], row

    scale_labels = ("ConvNet config.", "train (S)", "test (Q)")
    dense = [r for r in single if r.protocol == "dense"]
    methods = [r for r in single if r.protocol == "center" or r.scales == nets[r.nets[0]].scales]
    fused = [([" + ".join(r.nets), PROTOCOL_LABELS[r.protocol]], r) for r in result.rows if r.fusion]
    return [
        error_table("Table 3: single test scale (dense)", scale_labels,
                    [by_scale(r) for r in dense if not r.multi_scale], errors),
        error_table("Table 4: multiple test scales (dense)", scale_labels,
                    [by_scale(r) for r in dense if r.multi_scale], errors),
        error_table("Table 5: dense vs multi-crop vs both", ("ConvNet config.", "evaluation method", "test (Q)"),
                    [by_method(r) for r in methods], errors),
        error_table("Table 6: multiple ConvNet fusion", ("combined ConvNet models", "evaluation method"), fused,
                    errors, empty="(one net: no fusion rows)"),
    ]


def rows_table(result: EvalResult) -> Table:
    """Every row of an evaluation in one table (errors in %), the paper's figures beside ours when it has them."""
    errors = replace(SEPARATE, ours=(Column("top-1 err %", numeric=True), Column("top-5 err %", numeric=True)),
                     show_paper=any(r.paper is not None for r in result.rows))
    labels = [Column("row"), Column("nets"), Column("protocol"), Column("test scale Q")]
    rows = [error_row([r.name, " + ".join(r.nets), PROTOCOL_LABELS[r.protocol], scales_label(r.scales)], r, errors,
                      extra=[str(r.images)]) for r in result.rows]
    return Table("All rows", [*labels, *errors.ours, Column("images", numeric=True)], rows, list(errors.paper),
                 errors.show_paper)


def eval_markdown(result: EvalResult) -> str:
    """What ``verydeep eval`` prints: Tables 3 to 6, then every row."""
    return f"{join_markdown(eval_tables(result))}\n\n{rows_table(result).markdown()}"


def eval_document(result: EvalResult) -> str:
    """``results.md``: Tables 3 to 6 and every row, under the evaluated data's name, and over which classes."""
    tables = join_markdown([*eval_tables(result), rows_table(result)])
    flips = "" if result.flip else " The mirrored images were not averaged in (--no-flip)."
    return f"# Evaluation of {result.data}\n\nErrors {result.scored}.{flips}\n\n{tables}\n"
