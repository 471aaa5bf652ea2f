"""The served app (``api.main:app``) prepares for steady polling at start-up: it imports
what the first upload and job would import lazily, then freezes the start-up objects out
of the garbage collector's reach. Without that, the ~300,000 objects those imports create
stay in the oldest generation, and each full collection pauses every in-flight request
for ~150 ms. Run in a subprocess: freezing is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import gc, json, sys, tempfile
from pathlib import Path
from fastapi.testclient import TestClient
from api.core.settings import Settings
from api.main import create_app
from tests.api.conftest import Api, SPEC
from tests.api.test_jobs import create_job, upload_inputs
from defense_core.loading import save_safetensors
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

data = Path(tempfile.mkdtemp())
settings = Settings(data_dir=data)
app = create_app(settings, freeze_gc=FREEZE)
with TestClient(app) as client:
    frozen = gc.get_freeze_count()
    before = set(sys.modules)
    api = Api(app=app, client=client, settings=settings)
    tenant = api.tenant()
    path = data / "m.safetensors"
    save_safetensors(create_model(ModelSpec.from_dict(SPEC)).state_dict(), path)
    inputs = upload_inputs(api, tenant, path.read_bytes())
    job = create_job(api, tenant, inputs.body())
    assert job.status_code == 202, job.text
    assert client.get(job.headers["location"], headers=tenant.headers).status_code == 200
    gc.collect()
    print(json.dumps({"frozen": frozen, "new_modules": sorted(set(sys.modules) - before),
                      "tracked": len(gc.get_objects())}))
"""


def _run(freeze: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("FREEZE", str(freeze))], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_served_app_freezes_start_up_objects_including_the_lazily_used_engine() -> None:
    served = _run(True)
    late = served["new_modules"]
    heavy = [m for m in late if m.split(".")[0] in {"torch", "torchvision", "sympy"}]
    assert heavy == [], f"imported after start-up, so never frozen: {heavy[:20]}"
    assert len(late) < 40, late  # a few small ones (the broker transport on first send)
    assert served["frozen"] > 100_000
    # what a full collection scans after an upload, a job and a poll
    assert served["tracked"] < 50_000, served["tracked"]

    plain = _run(False)  # the control: without the freeze, it scans everything
    assert plain["frozen"] == 0 and plain["tracked"] > 4 * served["tracked"]
