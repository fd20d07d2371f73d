"""Two processes promote two versions to one alias at the same time: one wins, the log has both, nothing half-done."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from peftray import registry as R
from peftray.registry.audit import holders

ROUNDS = 4
WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from peftray.endpoints import load_config
    from peftray.registry import promote
    name, version, alias, barrier, me = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    cfg = load_config()
    import mlflow, boto3  # noqa: F401 - imported before the barrier so both start promoting together

    def barrier_wait(step):
        (barrier / f"{{step}}-{{me}}").touch()
        while len(list(barrier.glob(f"{{step}}-*"))) < 2:
            time.sleep(0.005)

    for i in range({rounds}):  # lock-step rounds: each round's two promotions start together, so they overlap
        barrier_wait(i)
        promote(name, version, alias, actor=me, reason=f"round {{i}}", config=cfg)
""").format(rounds=ROUNDS)


def test_concurrent_promotions_end_on_one_version_with_both_audited(cfg, lora_dir, unique_name, tmp_path):
    v1 = R.register_adapter(lora_dir("a", seed=1), unique_name, config=cfg).version
    v2 = R.register_adapter(lora_dir("b", seed=2), unique_name, config=cfg).version
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, **cfg.env()}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, unique_name, str(v), "production", str(barrier), who],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for v, who in ((v1, "proc-a"), (v2, "proc-b"))]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs

    log = R.audit_log(unique_name, "production", cfg)
    # Every promotion of both processes is in the log, in one gap-free sequence.
    assert [e["seq"] for e in log] == list(range(1, 2 * ROUNDS + 1))
    # The rounds ran in lock step: each pair of entries is one round, one promotion of each process.
    for i in range(ROUNDS):
        pair = log[2 * i:2 * i + 2]
        assert sorted(e["actor"] for e in pair) == ["proc-a", "proc-b"], pair
        assert {e["reason"] for e in pair} == {f"round {i}"}, pair
    assert sorted((e["actor"], e["version"]) for e in log) == sorted(
        [("proc-a", v1)] * ROUNDS + [("proc-b", v2)] * ROUNDS)
    # Each entry's from_version is the holder the previous entry left: no promotion judged a stale holder.
    for prev, e in zip(log, log[1:]):
        assert e["from_version"] == prev["version"]
    # It ends on one of them, the one of the last log entry, and MLflow agrees everywhere.
    final = log[-1]["version"]
    assert final in (v1, v2) and holders(log)[-1] == final
    assert R.resolve(f"{unique_name}@production", cfg).version == final
    assert R.alias_state(unique_name, "production", cfg) == (final, f"{final}:{2 * ROUNDS}")
    assert [v.version for v in R.list_versions(unique_name, cfg) if "production" in v.aliases] == [final]


REGISTER_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from peftray.endpoints import load_config
    from peftray.registry import register_adapter
    folder, name, barrier, me = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    cfg = load_config()
    import mlflow, boto3  # noqa: F401 - imported before the barrier so both start registering together
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.005)
    print("VERSION", register_adapter(folder, name, job_name="job-1", config=cfg).version)
""")


def test_concurrent_registrations_of_the_same_bytes_make_one_version(cfg, lora_dir, unique_name, tmp_path):
    folder = lora_dir("same", seed=3)
    barrier = tmp_path / "barrier-reg"
    barrier.mkdir()
    env = {**os.environ, **cfg.env()}
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_WORKER, str(folder), unique_name, str(barrier), who],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for who in ("proc-a", "proc-b")]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    got = [int(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("VERSION")]
    versions = R.list_versions(unique_name, config=cfg)
    assert len(versions) == 1 and got == [versions[0].version] * 2, (got, versions)
    assert R.fetch(f"{unique_name}/{versions[0].version}", config=cfg).is_dir()  # its bytes are all there
