"""The generic repository: one model class, one session, the queries every table needs.

A domain repository (``JobRepository``, ``ArtifactRepository``, ...) subclasses
:class:`Repository` with its model and adds the queries of its domain. Repositories
read and write rows only: they never commit (the caller owns the transaction) and know
nothing of HTTP, the task queue or the job state machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar

from sqlalchemy import ColumnElement, Select, func, select, update
from sqlalchemy.orm import Session

M = TypeVar("M")
SyncMode = Literal["auto", "evaluate", "fetch", False]


class Repository(Generic[M]):
    """Queries over ``model`` in ``session`` (keyword-only where a call has options)."""

    model: ClassVar[type[Any]]

    def __init__(self, session: Session) -> None:
        self.session = session

    @classmethod
    def from_session(cls, session: Session) -> Repository[M]:
        return cls(session)

    def base_statement(self) -> Select[tuple[M]]:
        return select(self.model)

    def get_one_or_none(self, statement: Select[tuple[M]]) -> M | None:
        return self.session.scalars(statement).one_or_none()

    def get_all(self, statement: Select[tuple[M]]) -> list[M]:
        return list(self.session.scalars(statement))

    def get_by_id(self, id: Any, *, for_update: bool = False) -> M | None:
        """The row with primary key ``id``; ``for_update`` locks it (``SELECT ... FOR UPDATE``
        on PostgreSQL; SQLite serializes writers anyway)."""
        statement = self.base_statement().where(self.model.id == id)
        if for_update:
            statement = statement.with_for_update()
        return self.get_one_or_none(statement)

    def add(self, row: M, *, flush: bool = False) -> M:
        self.session.add(row)
        if flush:
            self.session.flush()
        return row

    def update_where(
        self,
        *criteria: ColumnElement[bool],
        values: dict[str, Any],
        synchronize_session: SyncMode = "auto",
    ) -> int:
        """``UPDATE ... SET values WHERE criteria``: a conditional write that is atomic
        against a concurrent one. Returns the number of rows changed."""
        statement = (
            update(self.model)
            .where(*criteria)
            .values(**values)
            .execution_options(synchronize_session=synchronize_session)
        )
        return int(self.session.execute(statement).rowcount)

    def count(self, *criteria: ColumnElement[bool]) -> int:
        statement = select(func.count()).select_from(self.model).where(*criteria)
        return int(self.session.execute(statement).scalar_one())

    def count_by(self, column: Any) -> Sequence[tuple[Any, int]]:
        """``(value, rows)`` for each value of ``column``."""
        statement = select(column, func.count()).group_by(column)
        return [(value, int(rows)) for value, rows in self.session.execute(statement)]
