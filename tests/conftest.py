import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def task_model_dir(tmp_path_factory):
    """A lookup-task model (random weights, seed 1) saved to a directory, for the CLI's --model."""
    from csp_compile.data.model import build_model

    path = tmp_path_factory.mktemp("task_model")
    build_model(seed=1).save_pretrained(path)
    return path
