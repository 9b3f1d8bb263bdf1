"""A shared local Ray instance for tests (import ``ray_local`` into a conftest or test module)."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session; reuses a running one (safe to import twice)."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
