import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (read when triton.jit decorates)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402


def pytest_report_header(config):
    import peft

    return (
        f"forkkv-hf tests: transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)}), "
        f"peft {peft.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_torch_thread():
    """Tiny models: intra-op threads only add synchronisation (and contend with other work on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
