"""The REST schema's job kinds are the engine's job kinds (``defense_core.jobs``)."""

from __future__ import annotations

from typing import get_args

from api.schemas import JobTask


def test_the_schema_names_every_registered_job_kind() -> None:
    from defense_core.jobs import available_job_kinds

    assert sorted(get_args(JobTask)) == sorted(available_job_kinds())
