"""Shared test setup: 8 simulated CPU devices and the optional real-data directory.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def real_data_dir() -> pathlib.Path:
    """The shared real-data folder; skips the test with the reason when it is not configured."""
    value = os.environ.get("FLAN_JAX_DATA_DIR", "")
    if not value:
        pytest.skip("FLAN_JAX_DATA_DIR is not set: real-data tests need the shared data folder")
    path = pathlib.Path(value)
    if not path.is_dir():
        pytest.skip(f"FLAN_JAX_DATA_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent XLA compilation cache for the trainer runs of one test module (and their children)."""
    from tests import train_fakes

    yield from train_fakes.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> pathlib.Path:
    """The demo mixture's small sentencepiece model, trained once per test session (per xdist worker)."""
    from tests import train_fakes

    return train_fakes.train_tokenizer(tmp_path_factory.mktemp("tokenizer"))
