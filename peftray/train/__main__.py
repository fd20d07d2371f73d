"""`python -m peftray.train --spec PATH_OR_S3_URI [--job-id ID] [--result URI] [key=value ...]`: the Ray Jobs entrypoint.

Connects to the cluster in RAY_ADDRESS (or the config's), runs the job, and on success writes the result (run id,
model name, version, metrics, adapter URI) as JSON to `--result` (an s3:// URI or a path; one atomic write),
and prints it as one line `PEFTRAY_RESULT {json}` for people reading the log. Exit status:
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
    parser.add_argument("--result", help="where to write the result record: an s3:// URI (the control plane's) or a "
                                         "path")
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
    record = json.dumps(result.to_dict(), default=str)
    if args.result:
        write_record(args.result, record)
    print("PEFTRAY_RESULT " + record, flush=True)
    return 0


def write_record(uri: str, text: str, fs=None) -> None:
    """Write `text` to an s3:// URI (a PUT is atomic; through `fs`, an s3fs filesystem, when given) or a path (a
    temporary file renamed over it)."""
    if uri.startswith("s3://"):
        if fs is None:
            from peftray.endpoints import load_config

            fs = load_config().s3fs()
        fs.pipe_file(uri[len("s3://"):], text.encode())
        return
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(uri))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".result-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, uri)


if __name__ == "__main__":
    raise SystemExit(main())
