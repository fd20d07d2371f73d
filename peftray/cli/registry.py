"""`peftray registry list | show | import | promote | rollback | diff | fetch`: thin wrappers over peftray.registry."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from peftray.tables import table
from peftray.endpoints import load_config
from peftray.errors import ConfigError
from peftray.cli.promote import add_gate_arguments, gate_from_args


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="registered adapters with their latest version and aliases")
    ls.set_defaults(func=_list)
    show = sub.add_parser("show", help="versions of NAME, or one version: NAME/3, NAME@production")
    show.add_argument("ref", metavar="NAME|REF")
    show.add_argument("--history", action="store_true", help="print the promotion audit log instead")
    show.set_defaults(func=_show)
    imp = sub.add_parser("import", help="register an adapter folder (local or s3://) as a new version")
    imp.add_argument("path", metavar="PATH_OR_S3")
    imp.add_argument("--name", required=True, help="registered adapter name")
    imp.add_argument("--base", help="base model id (default: base_model_name_or_path in adapter_config.json)")
    imp.add_argument("--revision", help="base model revision")
    imp.add_argument("--metric", action="append", default=[], metavar="KEY=VALUE", help="a metric (repeatable)")
    imp.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="a version tag (repeatable)")
    imp.add_argument("--job", help="job name (same bytes + same job = the existing version)")
    imp.add_argument("--run-id", help="MLflow run to attach the artifacts to")
    imp.add_argument("--dataset-fingerprint")
    imp.add_argument("--description")
    imp.set_defaults(func=_import)
    pro = sub.add_parser("promote", help="point NAME@ALIAS at VERSION, optionally gated on a metric")
    pro.add_argument("name")
    pro.add_argument("version", type=int)
    pro.add_argument("alias")
    add_gate_arguments(pro)
    pro.add_argument("--serving-base", help="base model the alias serves; a version for another base is refused")
    _who(pro)
    pro.set_defaults(func=_promote)
    rb = sub.add_parser("rollback", help="move NAME@ALIAS back to its previous holder")
    rb.add_argument("name")
    rb.add_argument("alias")
    _who(rb)
    rb.set_defaults(func=_rollback)
    diff = sub.add_parser("diff", help="compare two versions' metrics, fields, configs and files")
    diff.add_argument("name")
    diff.add_argument("v1", type=int)
    diff.add_argument("v2", type=int)
    diff.set_defaults(func=_diff)
    fe = sub.add_parser("fetch", help="download (or find in the cache) a version; prints its local folder")
    fe.add_argument("ref", metavar="REF")
    fe.set_defaults(func=_fetch)
    pr = sub.add_parser("prune-cache", help="shrink the local adapter cache (least recently used first)")
    pr.add_argument("--max-gb", type=float, required=True, help="size to shrink the cache to, in GB")
    pr.add_argument("--grace-s", type=float, default=600.0,
                    help="keep adapters used this recently even over the limit (default 600 s)")
    pr.set_defaults(func=_prune)
    for sp in (ls, show, imp, pro, rb, diff, fe, pr):
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", help="who does this (default: the OS user)")
    p.add_argument("--reason", help="why, recorded in the audit log")


def _cfg(args):
    return load_config(args.state_dir)


def _out(args, data, text: str) -> int:
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


def _when(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else ""


def _metrics(m: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()))


def _list(args) -> int:
    from peftray.registry import list_adapters

    rows = list_adapters(_cfg(args))
    text = table(["name", "latest", "aliases", "updated (UTC)"], [
        (s.name, s.latest_version, " ".join(f"{a}={v}" for a, v in sorted(s.aliases.items())), _when(s.updated_at_ms))
        for s in rows]) if rows else "no adapters registered"
    return _out(args, [s.to_dict() for s in rows], text)


def _show(args) -> int:
    from peftray.registry import audit_log, list_versions, resolve

    cfg = _cfg(args)
    if args.history:
        entries = audit_log(args.ref.split("@")[0].split("/")[0], None, cfg)
        return _out(args, entries, table(["alias", "seq", "action", "version", "from", "actor", "at", "reason"], [
            (e["alias"], e["seq"], e["action"], e["version"], e.get("from_version"), e.get("actor"), e.get("at"),
             e.get("error") or e.get("reason")) for e in entries]))
    if "/" in args.ref or "@" in args.ref:
        av = resolve(args.ref, cfg)
        fields = [("version", av.ref), ("aliases", " ".join(av.aliases)), ("base", av.base_model),
                  ("revision", av.base_revision), ("method", av.method), ("rank", av.rank),
                  ("target modules", " ".join(av.target_modules)), ("metrics", _metrics(av.metrics)),
                  ("job", av.job_name), ("dataset", av.dataset_fingerprint), ("run", av.run_id),
                  ("source", av.source), ("created (UTC)", _when(av.created_at_ms))]
        fields += [(f"sha256 {rel}", sha) for rel, sha in sorted(av.files.items())]
        return _out(args, av.to_dict(), table(["field", "value"], fields))
    versions = list_versions(args.ref, cfg)
    return _out(args, [v.to_dict() for v in versions], table(
        ["version", "aliases", "method", "rank", "base", "metrics", "job", "created (UTC)"],
        [(v.version, " ".join(v.aliases), v.method, v.rank, v.base_model, _metrics(v.metrics), v.job_name,
          _when(v.created_at_ms)) for v in versions]))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} must be KEY=VALUE, got {item!r}. Example: {flag} eval_loss=0.42")
        out[key] = value
    return out


def _import(args) -> int:
    from peftray.registry import register_adapter

    av = register_adapter(
        args.path, args.name, base_model=args.base, base_revision=args.revision, run_id=args.run_id,
        job_name=args.job, metrics=_pairs(args.metric, "--metric"), tags=_pairs(args.tag, "--tag"),
        dataset_fingerprint=args.dataset_fingerprint, description=args.description, config=_cfg(args))
    return _out(args, av.to_dict(), f"registered {av.ref} (base {av.base_model}, {av.method}, "
                                    f"{len(av.files)} files, sha256 {av.content_sha256[:12]})")


def _promote(args) -> int:
    from peftray.registry import promote

    rec = promote(args.name, args.version, args.alias, gate=gate_from_args(args), actor=args.actor, reason=args.reason,
                  serving_base=args.serving_base, config=_cfg(args))
    return _out(args, rec, f"{args.name}@{args.alias}: {rec['from_version']} -> {rec['version']} "
                           f"(audit #{rec['seq']}; {rec.get('checks')})")


def _rollback(args) -> int:
    from peftray.registry import rollback

    rec = rollback(args.name, args.alias, actor=args.actor, reason=args.reason, config=_cfg(args))
    return _out(args, rec, f"{args.name}@{args.alias}: rolled back {rec['from_version']} -> {rec['version']} "
                           f"(audit #{rec['seq']})")


def _diff(args) -> int:
    from peftray.registry import diff_versions

    d = diff_versions(args.name, args.v1, args.v2, _cfg(args))
    rows = [("metric", k, _num(v["v1"]), _num(v["v2"]), _num(v["delta"])) for k, v in d["metrics"].items()]
    for section in ("fields", "config", "files"):
        rows += [(section.rstrip("s"), k, v["v1"], v["v2"], "") for k, v in d[section].items()]
    text = table(["kind", "key", f"v{d['v1']}", f"v{d['v2']}", "delta"], rows) if rows else "no differences"
    return _out(args, d, text)


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"


def _prune(args) -> int:
    from peftray.errors import ConfigError
    from peftray.registry.cache import AdapterCache

    if args.max_gb < 0:
        raise ConfigError(f"--max-gb must be >= 0, got {args.max_gb}")
    cfg = _cfg(args)
    res = AdapterCache(cfg.cache_dir).prune(int(args.max_gb * 1e9), grace_s=args.grace_s)
    text = (f"cache {cfg.cache_dir}: {res.bytes_before / 1e6:.1f} MB -> {res.bytes_after / 1e6:.1f} MB, "
            f"removed {len(res.removed)} adapter folder(s)"
            + (f", kept {res.kept_recent} used in the last {args.grace_s:g} s" if res.kept_recent else ""))
    return _out(args, {"cache_dir": str(cfg.cache_dir), **vars(res)}, text)


def _fetch(args) -> int:
    from peftray.registry import fetch

    path = fetch(args.ref, _cfg(args))
    return _out(args, {"ref": args.ref, "path": str(path)}, str(path))
