"""`python -m peftray.train --spec PATH_OR_S3_URI [--job-id ID] [key=value ...]`: the Ray Jobs entrypoint.

Connects to the cluster in RAY_ADDRESS (or the config's), runs the job, and prints one line
`PEFTRAY_RESULT {json}` (run id, model name, version, metrics, adapter URI) on success. Exit status:
0 done, 2 a bad spec or input (ConfigError, printed without a traceback), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys

from peftray.errors import ConfigError, PeftrayError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftray.train", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="job spec: a YAML file path or an s3:// URI")
    parser.add_argument("--job-id", help="control-plane job id (recorded on the MLflow run)")
    parser.add_argument("--owner", help="the user the job runs for (the service sets it): its run identity and "
                                        "the owner of the adapter names it registers")
    parser.add_argument("--owner-is-admin", action="store_true", help="the owner may register under any name")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.max_steps=10")
    args = parser.parse_args(argv)
    from peftray.train import run_job

    try:
        result = run_job(args.spec, overrides=args.overrides, job_id=args.job_id, owner=args.owner,
                         owner_is_admin=args.owner_is_admin)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except PeftrayError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("PEFTRAY_RESULT " + json.dumps(result.to_dict(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
