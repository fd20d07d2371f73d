"""Fixtures of the text-to-image tests: one tiny Stable Diffusion pipeline folder per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from peftray.tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")
