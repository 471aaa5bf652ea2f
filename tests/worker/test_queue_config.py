"""The Celery configuration the service relies on, and the worker's compute runtime."""

from __future__ import annotations

import pytest

from api.core import queue
from api.core.settings import Settings
from worker.runtime import WorkerDevice, choose_runtime


def test_redis_config_is_json_only_late_acked_and_outlives_the_longest_job(tmp_path):
    settings = Settings(
        data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/9",
        job_soft_time_limit_s=600, job_time_limit_s=900, worker_concurrency=3,
    )
    conf = queue.make_celery(settings).conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (600, 900)
    assert conf.broker_transport_options["visibility_timeout"] == 900 + queue.VISIBILITY_MARGIN_S
    assert conf.broker_transport_options["visibility_timeout"] > settings.job_time_limit_s
    assert conf.worker_max_tasks_per_child == queue.MAX_TASKS_PER_CHILD
    assert conf.worker_concurrency == 3
    assert conf.result_backend is None and conf.task_ignore_result is True
    assert conf.broker_url == "redis://127.0.0.1:6379/9"


def test_embedded_config_uses_the_filesystem_transport_under_the_broker_folder(tmp_path):
    settings = Settings(data_dir=tmp_path)
    app = queue.make_celery(settings)
    options = app.conf.broker_transport_options
    root = (tmp_path / "broker").resolve()
    assert app.conf.broker_url == "filesystem://"
    assert options["data_folder_in"] == options["data_folder_out"] == str(root / "queue")
    assert options["processed_folder"] == str(root / "processed")
    assert options["control_folder"] == str(root / "control")
    assert app.conf.worker_enable_remote_control is False
    assert (root / "queue").is_dir()  # created: the transport needs the folders to exist


def test_an_explicit_filesystem_path_wins(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", broker_url=f"filesystem://{tmp_path}/elsewhere")
    assert queue.filesystem_layout(settings).root == (tmp_path / "elsewhere").resolve()


def test_enqueue_sends_the_job_id_by_task_name_as_json(tmp_path):
    settings = Settings(data_dir=tmp_path)
    app = queue.make_celery(settings)
    task_id = queue.enqueue_purify(settings=settings, job_id="8d4a7c1e-0000-4000-8000-000000000001", app=app)
    files = list((tmp_path / "broker" / "queue").iterdir())
    assert len(files) == 1 and files[0].name.endswith(f".{queue.QUEUE_NAME}.msg")
    import json

    message = json.loads(files[0].read_text())
    assert message["headers"]["task"] == queue.PURIFY_TASK
    assert message["headers"]["id"] == task_id
    assert message["content-type"] == "application/json"
    assert queue.queue_depth(app) == 1
    # no remote control on the embedded transport: revoke is a no-op, and says so
    assert queue.revoke(settings=settings, task_id=task_id, app=app) is False


@pytest.mark.parametrize(
    ("gpus", "cores", "concurrency", "index", "expected"),
    [
        (0, 2, 1, 0, WorkerDevice("cpu", 2, False)),
        (0, 8, 3, 2, WorkerDevice("cpu", 2, False)),   # 8 cores // 3 processes
        (0, 1, 4, 0, WorkerDevice("cpu", 1, False)),   # never fewer than one thread
        (2, 16, 4, 3, WorkerDevice("cuda:1", 4, True)),  # process 3 -> GPU 3 mod 2
    ],
)
def test_runtime_splits_devices_and_cores_between_pool_processes(gpus, cores, concurrency, index, expected):
    assert choose_runtime(process_index=index, concurrency=concurrency, cuda_devices=gpus, cores=cores) == expected


def test_runtime_rejects_nonsense():
    with pytest.raises(ValueError):
        WorkerDevice("tpu", 1, False)
    with pytest.raises(ValueError):
        choose_runtime(process_index=0, concurrency=0, cuda_devices=0, cores=1)
