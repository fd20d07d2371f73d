"""`peftray bench tuners` is reachable and parses its flags (the benchmark itself is not a test: it takes minutes)."""

from __future__ import annotations

import pytest

from peftray.bench import tuners
from peftray.cli import bench as bench_cli
from peftray.cli import build_parser


def test_parser_defaults_and_flags():
    args = tuners.parse_args(["--quick", "--threads", "2", "--sections", "decode,logits", "--clock", "cpu"])
    assert args.quick and args.threads == 2 and args.sections == "decode,logits" and args.clock == "cpu"
    assert tuners.parse_args([]).out == "bench-results/tuners.json"


def test_parser_rejects_unknown_section(capsys):
    with pytest.raises(SystemExit):
        tuners.parse_args(["--sections", "decode,warp"])
    assert "warp" in capsys.readouterr().err


def test_cli_dispatches_area_and_its_flags():
    args = build_parser(only="bench").parse_args(["bench", "tuners", "--quick", "--sections", "kernel"])
    assert args.area == "tuners" and args.args == ["--quick", "--sections", "kernel"]
    assert "tuners" in bench_cli.available()


def test_goals_are_judged_from_measurements():
    def decode(ratio):  # the goal reads the median of paired ratios, not the ratio of medians
        return {"base": {"ms": 10.0}, "hf_peft_mixed": {"ms": 40.0}, "peftray_mixed": {"ms": 12.0},
                "ratios": {"peftray_mixed/base": {"median": ratio, "p25": ratio, "p75": ratio, "n": 1}}}

    goals = {g["goal"]: g["met"] for g in tuners.check_goals({"decode": decode(1.2), "logits": {"max_abs_diff": 2e-3}})}
    assert goals == {"decode_speedup_vs_hf": True, "decode_vs_base": True, "logits_max_abs_diff": False}
    goals = {g["goal"]: g["met"] for g in tuners.check_goals({"decode": decode(1.3)})}
    assert goals == {"decode_speedup_vs_hf": True, "decode_vs_base": False}
    scoped = decode(1.3)
    scoped["ratios"]["peftray_generate/base"] = {"median": 1.2, "p25": 1.1, "p75": 1.3, "n": 3}
    engine = {"ratios": {"peftray_engine/base": {"median": 1.26, "p25": 1.2, "p75": 1.3, "n": 3}}}
    goals = {g["goal"]: g["met"] for g in tuners.check_goals({"decode": scoped, "kv_decode": engine})}
    assert goals == {"decode_speedup_vs_hf": True, "decode_vs_base": False,
                     "decode_vs_base (inside one generate call)": True,
                     "decode_vs_base (serving engine step, KV cache)": False}


def test_train_vocabs_flag_and_a_goal_per_vocabulary(capsys):
    assert tuners.parse_args([]).train_vocabs == [4096, 32000]
    with pytest.raises(SystemExit):
        tuners.parse_args(["--train-vocabs", "4096,big"])
    assert "--train-vocabs" in capsys.readouterr().err

    def train(ours_ms, vocab):
        return {"hf_peft": {"ms": 100.0, "tokens_per_s": 1024 / 0.1},
                "peftray": {"ms": ours_ms, "tokens_per_s": 1024 / (ours_ms / 1000)},
                "loss_max_abs_diff": 1e-6, "vocab": vocab}

    goals = {g["goal"]: g["met"] for g in tuners.check_goals({"train": train(95.0, 4096),
                                                              "train_vocab32000": train(80.0, 32000)})}
    assert goals == {"train_tokens_per_s_vs_hf (vocab 4096)": False, "train_loss_max_abs_diff (vocab 4096)": True,
                     "train_tokens_per_s_vs_hf (vocab 32000)": True, "train_loss_max_abs_diff (vocab 32000)": True}
