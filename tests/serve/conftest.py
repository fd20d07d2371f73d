"""One Serve application for the serve tests (on the session stack), with registered adapters."""

from __future__ import annotations

import pytest

from serve_helpers import MAX_NEW, PROMPT, hf_generate, make_lora



@pytest.fixture(scope="module")
def served(stack, ray_session, tiny_model, tmp_path_factory):
    """(Deployment, info): adapters registered in MLflow, a serve app of the tiny model, reference answers."""
    import uuid

    from transformers import AutoTokenizer

    from peftray.registry import promote, register_adapter
    from peftray.serve import ServeConfig, deploy, down

    root = tmp_path_factory.mktemp("served")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok.encode(PROMPT)
    folders = [make_lora(tiny_model, root / f"a{i}", seed=10 + i) for i in range(3)]
    tag = uuid.uuid4().hex[:6]
    names = [f"sv{tag}-{i}" for i in range(3)]
    versions = [register_adapter(f, n) for f, n in zip(folders, names)]
    for n in names:
        promote(n, 1, "production")
    # version 2 of the first adapter has the second adapter's weights: a promotion changes its answers
    register_adapter(folders[1], names[0], metrics={"eval_loss": 1.0})
    other = make_lora(tiny_model, root / "other", seed=99)
    wrong = register_adapter(other, f"sv{tag}-wrongbase", base_model="someone/another-base")
    answers = {i: tok.decode(hf_generate(tiny_model, folders[i], ids, MAX_NEW), skip_special_tokens=True)
               for i in range(3)}
    answers["base"] = tok.decode(hf_generate(tiny_model, None, ids, MAX_NEW), skip_special_tokens=True)
    spec = ServeConfig(name=f"t{tag}", base_model=str(tiny_model), max_adapters_per_replica=2, max_batch_size=8,
                       max_ongoing_requests=4, max_queued_requests=4, alias_poll_s=1.0, request_timeout_s=30,
                       num_cpus=0, torch_threads=1, api_key="test-key-" + tag)
    dep = deploy(spec, wait_s=240)
    info = dict(names=names, versions=versions, wrong=wrong, answers=answers, spec=spec, tok=tok, ids=ids,
                folders=folders)
    try:
        yield dep, info
    finally:
        down(spec.name)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """The tiny Stable Diffusion pipeline folder (as tests/diffusion make it)."""
    from peftray.tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")
