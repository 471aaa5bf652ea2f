"""Property-based fuzzing of every operation in the OpenAPI document (schemathesis):
schema-conforming and schema-violating requests, with a valid API key; not one may get
a 5xx, and every error must be a problem+json document.

Run alone: ``.venv/bin/pytest tests/api/test_fuzz.py -m slow -s`` (prints the counts).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.api.conftest import Api

POSITIVE_EXAMPLES = 30
NEGATIVE_EXAMPLES = 20
PINNED_EXAMPLES = 15

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_fuzz_every_operation(sqlite_api: Api, model_bytes: bytes) -> None:
    from tests.api.test_jobs import create_job, upload_inputs

    tenant = sqlite_api.tenant()
    inputs = upload_inputs(sqlite_api, tenant, model_bytes)
    job = create_job(sqlite_api, tenant, inputs.body())
    assert job.status_code == 202
    # real ids for the path parameters, so that the handlers behind the 404 are reached too
    real_ids = {"job_id": job.json()["id"], "model_id": inputs.model_id,
                "dataset_id": inputs.clean_id}
    schema = schemathesis.openapi.from_asgi("/openapi.json", sqlite_api.app)
    statuses: collections.Counter[int] = collections.Counter()
    per_operation: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    no_negative: list[str] = []

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 15  # GET /v1/models included
    for operation in operations:
        pinned = {p.name: real_ids[p.name] for p in operation.path_parameters
                  if p.name in real_ids}
        runs = [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES, None),
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, None)]
        if pinned:
            runs.append((GenerationMode.POSITIVE, PINNED_EXAMPLES, pinned))
        for mode, examples, path_parameters in runs:

            @given(case=operation.as_strategy(generation_mode=mode,
                                              path_parameters=path_parameters))
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), derandomize=True)
            def run(case: Any) -> None:
                response = case.call(headers=tenant.headers)
                statuses[response.status_code] += 1
                per_operation[operation.label] += 1  # noqa: B023  (run() is called in this iteration)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> "
                                    f"{response.status_code}: {response.text[:200]}")
                elif response.status_code >= 400:
                    content_type = response.headers.get("content-type", [""])
                    if isinstance(content_type, list):
                        content_type = content_type[0]
                    if content_type != "application/problem+json":
                        failures.append(f"{case.method} {case.formatted_path} -> "
                                        f"{response.status_code} as {content_type}")

            try:
                run()
            except Unsatisfiable:
                # e.g. GET /healthz: nothing in its request can violate the schema
                assert mode is GenerationMode.NEGATIVE, operation.label
                no_negative.append(operation.label)

    total = sum(statuses.values())
    print(f"\nfuzz: {total} requests over {len(per_operation)} operations; "
          f"status counts {dict(sorted(statuses.items()))}; "
          f"no schema-violating request possible for {no_negative}")
    assert not failures, "\n".join(failures[:20])
    assert total >= 500
    assert not any(status >= 500 for status in statuses)
