"""A shared local Ray instance for tests (import ``ray_local`` into a conftest or test module)."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray of the tests' own for the whole session; reuses one this process started
    (safe to import twice). Never a `ray start` cluster of the machine: tests stay hermetic."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
