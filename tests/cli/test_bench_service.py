"""`peftray bench service`: its arms parse, and a job's phases are read from the timestamps it recorded."""

from __future__ import annotations

import pytest

from peftray.bench import _service_phases as phases
from peftray.bench import service


def test_phases_are_consecutive_marks_and_missing_marks_skip_their_phase():
    marks = {"submit": 100.0, "driver_start": 102.0, "run_job": 104.5, "loop_start": 110.0, "built": 111.0,
             "registered": 115.0, "seen_done": 116.0}
    got = phases.phases_of(marks)
    assert list(got.values()) == [2.0, 2.5, 1.0]
    assert [n for n, a, _ in phases.PHASES if a in ("submit", "driver_start", "loop_start")] == list(got)
    assert all(a != b for _, a, b in phases.PHASES)


def test_arms_flag_refuses_an_unknown_arm(capsys):
    with pytest.raises(SystemExit):
        service.main(["--arms", "phases,warp"])
    assert "warp" in capsys.readouterr().err


def test_the_final_report_carries_the_loop_timings(tiny_model, monkeypatch):
    from peftray.jobspec import load_spec
    from peftray.train.local import run_local
    from peftray.train.loop import TIMING

    spec = load_spec("jobs/tiny-lora-instruct.yaml", [f"base_model.path={tiny_model}", "training.max_steps=2",
                                                      "training.eval_every=null", "resources.num_workers=1"])
    reports = []
    import peftray.train.local as local

    real = local.LoopContext

    def spy(**kw):
        inner = kw["report"]
        kw["report"] = lambda m, f: (reports.append(m), inner(m, f))
        return real(**kw)

    monkeypatch.setattr(local, "LoopContext", spy)
    run = run_local(spec)
    marks = {k[len(TIMING):]: v for k, v in reports[-1].items() if k.startswith(TIMING)}
    assert list(marks) == ["loop_start", "built", "first_step", "train_end", "final_eval", "final_saved"]
    assert sorted(marks.values()) == list(marks.values())
    assert not any(k.startswith(TIMING) for k in run.final)  # the returned metrics stay clean
