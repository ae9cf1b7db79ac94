"""The test session's settings, and the rule of the ``version_independent`` marker.

``make test`` runs the suite twice: on the newest transformers, then on 5.17 (the GPU machine's version,
``PYTHONPATH=.deps/transformers-5.17.0``) with ``-m "not version_independent and not eval_harness"``. A test is marked
``version_independent`` when it runs no transformers or PEFT code: the Triton kernels and the attention paths on
views built by hand (tests/views.py), the configuration, the logger, the suite's own layout, packaging, the
benchmarks' schema and helpers, the context benchmark's data and metrics. Marked too: a variant of an unmarked test
that differs from it only below the transformers/PEFT interfaces (the same model, inputs and generate/compile calls,
the Triton paths in place of the PyTorch ones: test_tensor_parallel's ``triton`` case, test_compiled_decode's
``triton`` custom-op case; LoRA factors made whole before ForkKV reads them: test_tensor_parallel's ``whole_lora``). Everything else that builds a model, a cache, a shared context or an
adapter, calls ``generate``/``forward``, compiles, trains, or starts a script that does, stays unmarked and runs on
both versions (they differ in the cache keyword, ``Cache.crop``, the masks generate passes, compile and
tensor-parallel internals: forkkv_hf/compat.py). When unsure, leave a test unmarked.

``eval_harness`` marks the tests that run an evaluation script of eval/ end to end (the benchmarks' tiny runs,
``eval.quality`` and ``eval.fidelity`` on the real model, their entry points): the 5.17 pass leaves them out too
(``-m "not version_independent and not eval_harness"``). They check the evaluation, not the library; the library
code they reach runs in the 5.17 pass through its own tests, and the scripts themselves run on 5.17 on the GPU
machine whenever results are made there (each result file records the versions it ran with).

The session runs torch on one intra-op thread: the models are tiny, and on 2 shared cores OpenMP's spin-waiting
threads made them 2-20x slower. Subprocesses inherit ``OMP_WAIT_POLICY=PASSIVE`` for the same reason.
"""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP: before `import torch`
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (read when triton.jit decorates)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

torch.set_num_threads(1)


def pytest_report_header(config):
    import peft

    return (
        f"forkkv-hf tests: transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)}), "
        f"peft {peft.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}"
    )


#: the files that take longest (torchrun, compiles, interpreted kernels, subprocesses), longest first: collected first,
#: so that `make test`'s workers (whole files each) start on them and finish together
LONGEST_FIRST = ("test_tensor_parallel.py", "test_cascade_kernel.py", "test_compiled_decode.py", "test_eval_scripts.py",
                 "test_kernels.py", "test_quality.py", "test_compile_regions.py", "test_staleness.py",
                 "test_training_eval.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the order within a file stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
