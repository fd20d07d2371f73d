"""MLflow's backend store on PostgreSQL (production's choice), artifacts in the session's S3."""

from __future__ import annotations

import pytest

from peftray.stack import procs, servers

pytestmark = pytest.mark.slow


def test_mlflow_server_on_postgres_keeps_runs_and_registry(stack, pg_url, tmp_path, unique_name):
    import mlflow

    from peftray.service.store import JobStore

    # Production often gives MLflow and the job store one database: both schemas must fit side by side.
    store = JobStore(pg_url)
    store.engine.dispose()
    opts = servers.Options(state_dir=tmp_path, db_url=pg_url)
    creds = {"aws_access_key_id": stack.aws_access_key_id, "aws_secret_access_key": stack.aws_secret_access_key,
             "mlflow_username": stack.mlflow_username, "mlflow_password": stack.mlflow_password}
    port = procs.free_port()
    proc = servers.start_mlflow(opts, stack.s3_endpoint_url, creds, stack.bucket, port)
    url = f"http://127.0.0.1:{port}"
    try:
        servers.wait_mlflow(proc, url)
        client = mlflow.MlflowClient(url)
        exp = client.create_experiment(unique_name)
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval_loss", 1.25)
        (tmp_path / "w.txt").write_text("weights")
        client.log_artifact(run.info.run_id, str(tmp_path / "w.txt"))
        client.create_registered_model(unique_name)
        mv = client.create_model_version(unique_name, source=f"{run.info.artifact_uri}", run_id=run.info.run_id)
        client.set_registered_model_alias(unique_name, "production", mv.version)
        assert client.get_model_version_by_alias(unique_name, "production").version == mv.version
        assert client.get_run(run.info.run_id).data.metrics["eval_loss"] == 1.25
    finally:
        procs.stop(proc)
    # The rows are in PostgreSQL, not in a SQLite file somewhere.
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        names = [r[0] for r in conn.execute(sa.text("SELECT name FROM registered_models"))]
        assert conn.execute(sa.text("SELECT count(*) FROM peftray_jobs")).scalar_one() >= 0
        metric = conn.execute(sa.text("SELECT value FROM metrics WHERE key = 'eval_loss'")).scalar_one()
    engine.dispose()
    assert unique_name in names and metric == 1.25
    assert not list(tmp_path.rglob("mlflow.db"))  # (the auth users live in their own small SQLite file)
