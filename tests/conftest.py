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
import sys  # noqa: E402

import pytest  # noqa: E402

SLOW_ENV = "FLAN_JAX_SLOW_TESTS"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help=f"also run the tests marked slow (or set {SLOW_ENV}=1); `make test-all` does")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: an end-to-end check whose parts the default suite covers more cheaply; skipped unless --slow "
        "(docs/testing.md lists them and why)",
    )


def pytest_collection_modifyitems(config, items):
    """Slow tests are reported as skipped, with the way to run them, rather than deselected silently."""
    if config.getoption("--slow") or os.environ.get(SLOW_ENV, "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason=f"slow check: run with `make test-all` (pytest --slow or {SLOW_ENV}=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def clean_registry():
    """A test's task registrations are undone afterwards, and the registry stays in step with sys.modules.

    Restoring the registry alone is not enough: a built-in task module first imported during the
    test stays in sys.modules while its tasks are removed, and a later `import_task_modules` is then
    a no-op that leaves them unregistered (a later test fails depending on the order). Such modules
    are dropped from sys.modules too, so the next import registers them again.
    """
    from flan_jax.data import registry

    saved = dict(registry._REGISTRY)
    modules_before = set(sys.modules)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    prefix = registry.BUILTIN_TASK_MODULE
    for name in set(sys.modules) - modules_before:
        if name == prefix or name.startswith(prefix + "."):
            del sys.modules[name]


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
