"""The evaluation lookups both backends run, written once: SQL text and arguments, not execution.

The two stores differ in their placeholder (``?`` for SQLite, ``%s`` for psycopg) and in the
columns an evaluation row is read with (each computes its live counts its own way), so those are
parameters; the filtering and paging rules are the same and must stay so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

R = TypeVar("R")


def find_evaluation(
    columns: str, mark: str, run: str, model: str, split: str, step: int | None
) -> tuple[str, tuple[Any, ...]]:
    """One evaluation by key; with no step, the latest step (the newest row among equal steps)."""
    where = f"e.run = {mark} AND e.model = {mark} AND e.split = {mark}"
    args: tuple[Any, ...] = (run, model, split)
    if step is None:
        return (
            f"SELECT {columns} FROM evaluations e WHERE {where} ORDER BY e.step DESC, e.seq DESC LIMIT 1",
            args,
        )
    return f"SELECT {columns} FROM evaluations e WHERE {where} AND e.step = {mark}", (*args, step)


def list_evaluations(
    columns: str, mark: str, run: str, model: str, split: str, limit: int, before: int | None
) -> tuple[str, tuple[Any, ...]]:
    """Newest first, filtered by the non-empty names, from before the cursor ``before`` (a seq).

    Asks for ``limit + 1`` rows: :func:`page` tells from the extra one whether a next page exists.
    """
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (("run", run), ("model", model), ("split", split)):
        if value:
            clauses.append(f"e.{column} = {mark}")
            args.append(value)
    if before is not None:
        clauses.append(f"e.seq < {mark}")
        args.append(before)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT e.seq AS seq, {columns} FROM evaluations e {where} ORDER BY e.seq DESC LIMIT {mark}"
    return sql, (*args, limit + 1)


def page(rows: Sequence[R], limit: int) -> tuple[Sequence[R], int | None]:
    """The first ``limit`` rows of a :func:`list_evaluations` result and the next page's cursor
    (their last ``seq``; None when this is the last page)."""
    shown = rows[:limit]
    return shown, (int(shown[-1]["seq"]) if len(rows) > limit else None)  # type: ignore[index]
