"""The driver's result record: written whole or not at all, where the control plane reads it."""

from __future__ import annotations

import json

from peftray.train.__main__ import write_record


def test_a_record_replaces_the_old_one_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text('{"version": "1"}')
    write_record(str(target), json.dumps({"version": "2", "run_id": "r"}))
    assert json.loads(target.read_text()) == {"version": "2", "run_id": "r"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_service_names_the_record_on_the_drivers_command_line(tmp_path):
    from peftray.endpoints import Config
    from peftray.service.executor import RayExecutor
    from peftray.service.settings import ServiceSettings

    executor = RayExecutor(ServiceSettings(config=Config(state_dir=tmp_path, bucket="b"), db_url="sqlite://"))
    line = executor.entrypoint("job-1", "alice")
    assert f"--result {executor.result_uri('job-1')}" in line
    assert executor.result_uri("job-1") == "s3://b/jobs/job-1/result.json"
