import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (trained classifiers) for the whole run, unless DIFFUSERS_STAGES_CACHE points elsewhere."""
    path = os.environ.get("DIFFUSERS_STAGES_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ["DIFFUSERS_STAGES_CACHE"] = path
    return path
