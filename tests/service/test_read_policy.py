"""The read policy on its own (issue 14 item 3): which paths a user's spec may name, without a server."""

from __future__ import annotations

import pytest

from peftray.errors import ConfigError
from peftray.jobspec import load_spec
from peftray.service.read_policy import ReadPolicy


def _spec(source: str, base: str = "org/tiny"):
    return load_spec({"name": "p", "base_model": base, "dataset": {"source": source, "format": "text"}})


@pytest.fixture
def policy(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "state").mkdir()
    return ReadPolicy("bkt", roots=(str(tmp_path / "shared"), str(tmp_path), "s3://bkt/public"),
                      users={"alice": ("s3://other/team/",)}, denied=(str(tmp_path / "state"),))


@pytest.mark.parametrize("source", ["/etc/passwd", "../../etc/passwd", "file:///etc/passwd", "s3://bkt/uploads/bob/x.jsonl",
                                    "s3://bkt/uploads/alice/../bob/x.jsonl", "s3://bkt/publicity/x.jsonl",
                                    "s3://other/team/x.jsonl", "http://example.com/x.jsonl", "~/x.jsonl"])
def test_refused_sources_name_the_field_and_the_roots(policy, source):
    with pytest.raises(ConfigError) as info:
        policy.check(_spec(source), "carol")
    message = str(info.value)
    assert "`dataset.source`" in message and "s3://bkt/uploads/carol/" in message and "s3://bkt/public" in message


def test_allowed_sources_and_pinned_paths(policy, tmp_path):
    data = tmp_path / "shared" / "rows.jsonl"
    data.write_text("{}\n")
    for source, expect in ((str(data), str(data)), (f"file://{data}", str(data)),
                           (f"{tmp_path}/shared/../shared/rows.jsonl", str(data)), ("imdb", "imdb"),
                           ("s3://bkt/uploads/alice/x.jsonl", None), ("s3://bkt/public/x.jsonl", None),
                           ("s3://other/team/x.jsonl", None)):
        assert policy.check(_spec(source), "alice").dataset.source == (expect or source)


def test_denied_folders_and_symlinks_out_of_a_root(policy, tmp_path):
    secret = tmp_path / "state" / "stack.json"
    secret.write_text("{}")
    link = tmp_path / "shared" / "link.jsonl"
    link.symlink_to("/etc/passwd")
    for source in (str(secret), str(link)):
        with pytest.raises(ConfigError, match="dataset.source"):
            policy.check(_spec(source), "alice")
    with pytest.raises(ConfigError, match="base_model.path"):
        policy.check(_spec("imdb", base=str(tmp_path / "state")), "alice")
