"""`peftray registry ...` end to end: tables for people, JSON for scripts, errors without tracebacks."""

from __future__ import annotations

import json

from peftray import registry as R
from peftray.cli import main as cli


def _json(capsys, *argv):
    assert cli(["registry", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_promote_rollback_show_diff_list(cfg, lora_dir, unique_name, capsys):
    n = unique_name
    v1 = R.register_adapter(lora_dir("a"), n, metrics={"eval_loss": 0.5}, config=cfg).version
    v2 = R.register_adapter(lora_dir("b", seed=1), n, metrics={"eval_loss": 0.7}, config=cfg).version
    assert _json(capsys, "promote", n, str(v1), "production", "--reason", "first")["version"] == v1
    # A failing gate: exit code 1, the reason on stderr, no traceback, alias unchanged.
    assert cli(["registry", "promote", n, str(v2), "production", "--metric", "eval_loss", "--mode", "min",
                "--no-worse"]) == 1
    err = capsys.readouterr().err
    assert "'eval_loss' = 0.7 is worse than the current holder" in err and "by 0.2" in err and "Traceback" not in err
    assert _json(capsys, "promote", n, str(v2), "production", "--actor", "ci")["from_version"] == v1
    assert _json(capsys, "rollback", n, "production")["version"] == v1
    shown = _json(capsys, "show", f"{n}@production")
    assert shown["version"] == v1 and shown["aliases"] == ["production"]
    history = _json(capsys, "show", n, "--history")
    assert [e["action"] for e in history] == ["promote", "refused", "promote", "rollback"]
    versions = _json(capsys, "show", n)
    assert [(v["version"], v["aliases"]) for v in versions] == [(v1, ["production"]), (v2, [])]
    assert _json(capsys, "diff", n, str(v1), str(v2))["metrics"]["eval_loss"]["delta"] == 0.7 - 0.5
    listed = {a["name"]: a for a in _json(capsys, "list")}
    assert listed[n]["aliases"] == {"production": v1}
    # The human-readable forms print tables.
    assert cli(["registry", "show", n]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["version", "aliases", "method"] and "production" in out
    assert cli(["registry", "show", f"{n}/999"]) == 1
    assert "has no version 999" in capsys.readouterr().err
