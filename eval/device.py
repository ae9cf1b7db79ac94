"""The machine and the versions a result was measured with: the one place every result file takes them from.

    python -m eval.device     # prints them as JSON (the GPU session scripts log this)
"""

from __future__ import annotations

import json
import platform
from pathlib import Path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """Versions (python, torch, transformers, peft, triton where installed), the CPU and torch's thread count, and
    with CUDA the first GPU's name, SMs and memory, the GPU count and the CUDA version."""
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for mod in ("triton", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    info.update(cpu=_cpu_name(), threads=torch.get_num_threads())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


if __name__ == "__main__":
    print(json.dumps(device_info(), indent=1))
