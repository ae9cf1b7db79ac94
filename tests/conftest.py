import os

import pytest
import torch
import transformers


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
