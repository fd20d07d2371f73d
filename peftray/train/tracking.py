"""The job's one MLflow run: created (or reopened, for a resubmitted job) by the driver, never by workers.

A run is identified by (owner, job name, spec fingerprint), all three tags on the run: another user's job of
the same name, or the same name with a changed spec, gets a run of its own instead of writing into this one.
"""

from __future__ import annotations

from peftray.jobspec import JobSpec

EXPERIMENT = "peftray-train"
TAG_JOB = "peftray.job_name"
TAG_OWNER = "peftray.owner"
TAG_SPEC = "peftray.spec_fingerprint"
OPERATOR = "_operator"  # the owner of runs started outside the service (`peftray train`); no user is named so


def _experiment_id(client) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT)
    except MlflowException:  # another driver created it first
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def find_run(client, job_name: str, owner: str | None = None, spec_fingerprint: str | None = None):
    """The latest MLflow run of `job_name` (of this owner and spec, when given), or None."""
    wanted = {TAG_JOB: job_name, TAG_OWNER: owner, TAG_SPEC: spec_fingerprint}
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items() if v is not None)
    runs = client.search_runs([_experiment_id(client)], filter_string=where,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def open_run(client, spec: JobSpec, fingerprint: str, job_id: str | None = None, owner: str | None = None) -> str:
    """The run id for this job: the previous run of the same owner, job name and spec (resumed), else a new one.

    A new run gets the whole spec, flattened, as params (MLflow allows 100 per request, hence the chunks).
    """
    from mlflow.entities import Param, RunTag

    owner = owner or OPERATOR
    previous = find_run(client, spec.name, owner, spec.fingerprint())
    if previous is not None:
        if previous.info.status != "RUNNING":
            client.update_run(previous.info.run_id, status="RUNNING")
        return previous.info.run_id
    tags = {TAG_JOB: spec.name, TAG_OWNER: owner, TAG_SPEC: spec.fingerprint(), "peftray.method": spec.method,
            "peftray.objective": spec.training.objective, "peftray.base_model": spec.base_model.path,
            "peftray.dataset_fingerprint": fingerprint}
    if job_id:
        tags["peftray.job_id"] = job_id
    run = client.create_run(_experiment_id(client), run_name=spec.name, tags=tags)
    params = [Param(k, v) for k, v in spec.to_flat_params().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100], tags=[RunTag("peftray.spec_yaml", spec.to_yaml()[:5000])] if i == 0 else [])
    return run.info.run_id


def close_run(client, run_id: str, ok: bool) -> None:
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
