"""`peftray train job.yaml [key=value ...]`: run a job spec on the local stack (or the cluster in the config)."""

from __future__ import annotations

import argparse
import json


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="job spec: a YAML file or an s3:// URI")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.max_steps=10 resources.num_workers=1")
    p.add_argument("--check", action="store_true", help="validate the spec (and print it) without training")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from peftray.endpoints import load_config
    from peftray.jobspec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.check:
        print(spec.to_yaml(), end="")
        return 0
    from peftray.tables import table
    from peftray.train import run_job

    result = run_job(spec, load_config(args.state_dir))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    metrics = {k: v for k, v in result.metrics.items() if k in ("loss", "eval_loss", "eval_perplexity", "eval_accuracy")}
    rows = [["job", result.job_name], ["adapter", f"{result.model_name}/{result.version}"],
            ["mlflow run", result.run_id], ["artifacts", result.adapter_uri],
            *[[k, f"{v:.4f}"] for k, v in metrics.items()]]
    if result.promoted_alias:
        rows.append(["promoted", f"{result.model_name}@{result.promoted_alias}"])
    if result.promotion_error:
        rows.append(["not promoted", result.promotion_error])
    print(table(["", ""], rows))
    return 0
