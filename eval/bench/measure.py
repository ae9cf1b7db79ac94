"""Timing and memory measurements shared by the benchmarks (GPU-synchronised; on CPU the syncs do nothing)."""

from __future__ import annotations

import gc
import time

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


#: calls captured in one CUDA graph by :func:`graph_time`
GRAPH_CALLS = 10


def graph_time(fn, do_bench, calls: int = GRAPH_CALLS) -> float:
    """GPU time of one ``fn()`` (seconds): ``calls`` calls captured in a CUDA graph, the replay's ``do_bench`` median
    divided by ``calls``, so that launch overhead is not counted. ``do_bench``: ``triton.testing.do_bench``."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(s)
    return do_bench(lambda: g.replay(), warmup=10, rep=100, return_mode="median") * 1e-3 / calls


def cuda_time(fn, warmup=1, reps=3):
    """Median wall time of ``fn()`` with the GPU synchronised around it (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


class StepMarks:
    """A logits processor that marks every generation step without waiting for the GPU: a CUDA event recorded on the
    logits' device's current stream (the host's clock off CUDA). :meth:`step_seconds` after the call is the time per
    step between the first token's mark and the last one's: the decode steps alone, free of the prefill and its
    jitter; :meth:`elapsed` each token's time since :meth:`begin`."""

    def __init__(self):
        self.marks, self.start = [], None

    @staticmethod
    def _mark(device):
        if device is None or torch.device(device).type != "cuda":
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(device))
        return ev

    def __call__(self, input_ids, scores):
        self.marks.append(self._mark(scores.device))
        return scores

    def begin(self, device=None) -> None:
        """Clear the marks and mark the start on ``device`` (the logits' device; None: the host's clock)."""
        self.marks, self.start = [], self._mark(device)

    def _take(self) -> list:
        marks, self.marks = self.marks, []
        if marks and not isinstance(marks[-1], float):
            marks[-1].synchronize()
        return marks

    @staticmethod
    def _seconds(a, b) -> float:
        if isinstance(a, float) != isinstance(b, float):
            raise ValueError("StepMarks: the start and the tokens were marked on different clocks; pass the logits' "
                             "device to begin()")
        return b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3

    def step_seconds(self) -> float | None:
        """Seconds per step between the first and the last mark (None below two), waiting for the last; clears."""
        marks = self._take()
        return self._seconds(marks[0], marks[-1]) / (len(marks) - 1) if len(marks) > 1 else None

    def elapsed(self) -> list[float]:
        """Each mark's seconds since :meth:`begin`'s, waiting for the last; clears."""
        start, marks = self.start, self._take()
        return [self._seconds(start, m) for m in marks]


def free_memory() -> None:
    """Drop the kernels' reusable scratch buffers (an earlier case's would count in the next case's memory), collect
    garbage, empty the CUDA caching allocator and reset every GPU's peak-memory counter."""
    try:
        from forkkv_kernels import release_workspaces
    except ImportError:  # no Triton: no kernels, no buffers of theirs
        pass
    else:
        release_workspaces()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def oom_record(err: BaseException) -> dict:
    """A case that ran out of GPU memory, as its row: what the allocator said (how much it tried to allocate, how much
    PyTorch held allocated and reserved-but-unallocated: fragmentation against real demand) and the peaks so far.
    Call it before :func:`free_memory`, which resets the peaks, and call that after the ``except`` block: until the
    block ends its exception holds the failed call's frames, and with them every tensor the call had allocated, which
    ``empty_cache`` then cannot return."""
    rec = {"oom": True, "message": " ".join(str(err).split())[:800]}
    if torch.cuda.is_available():
        rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return rec


def peak_bytes() -> int:
    """Peak allocated memory of the current GPU since the last :func:`free_memory` (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peaks_gib() -> list[float]:
    """Peak memory of every visible GPU (a device-map run spreads over several)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]


def is_cuda_event(ev) -> bool:
    """Whether a ``torch.profiler`` event ran on the GPU."""
    return getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type)


def _device_us(ev) -> float:
    """A profiler event's own GPU time in microseconds (the attribute's name differs between torch versions)."""
    return getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)


#: kernel name fragments of the GPU work of a decode step, by family (``kernel_seconds_by_family``; ``()``: the rest)
KERNEL_FAMILIES = {
    "forkkv attention kernels": ("_kres_scores", "_cascade_shared", "_shared_part", "_private_merge"),
    "batched LoRA kernels": ("_gathered_mm",),
    "attention (SDPA/flash)": ("flash", "fmha", "attention", "Attention"),
    "GEMM": ("gemm", "Gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"),
    "elementwise/other": (),
}


def kernel_seconds_by_family(prof, families: dict, other: str) -> dict:
    """GPU kernel time (seconds) of a ``torch.profiler`` run by family: a kernel counts for the first family with a
    name fragment its name contains, else for ``other``."""
    out = {f: 0.0 for f in families}
    out.setdefault(other, 0.0)
    for ev in prof.key_averages():
        dev_us = _device_us(ev)
        if dev_us and is_cuda_event(ev):
            fam = next((f for f, keys in families.items() if keys and any(k in ev.key for k in keys)), other)
            out[fam] += dev_us / 1e6
    return out


def kernels_by_name(prof) -> dict:
    """``{kernel name (first 90 characters): [launches, seconds]}`` of a ``torch.profiler`` run (replays of CUDA
    graphs count each kernel)."""
    out = {}
    for ev in prof.key_averages():
        dev_us = _device_us(ev)
        if dev_us and is_cuda_event(ev):
            entry = out.setdefault(ev.key[:90], [0, 0.0])
            entry[0] += ev.count
            entry[1] += dev_us / 1e6
    return out


class FullCollections:
    """While active (``with``): the full (generation 2) collections of Python's cyclic garbage collector, their count
    ``collections`` and wall time ``seconds``. A full collection walks every tracked object, and after a
    ``torch.compile`` there are millions (graphs, guards, code objects): one inside a timed call is a host pause that
    the counters of :func:`compile_counters` do not see."""

    def __init__(self):
        self.collections, self.seconds, self._start = 0, 0.0, None

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.collections += 1
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)
        return False


#: ``"name: repr"`` of every ``@triton.jit`` compile in this process since :func:`watch_triton_compiles`
TRITON_COMPILES: list[str] = []


def watch_triton_compiles() -> bool:
    """Record each Triton JIT compile of a ``@triton.jit`` kernel launched through its ``JITFunction`` (ours; inductor's
    generated kernels compile apart and show in dynamo's counters) in :data:`TRITON_COMPILES`, through
    ``triton.knobs.runtime.jit_post_compile_hook`` (Triton 3.4+), after any hook already set. Idempotent; False where
    this Triton has no such hook."""
    try:
        from triton import knobs
    except ImportError:
        return False
    rt = getattr(knobs, "runtime", None)
    if rt is None or not hasattr(rt, "jit_post_compile_hook"):
        return False
    prev = rt.jit_post_compile_hook
    if getattr(prev, "forkkv_watch", False):
        return True

    def hook(**kw):
        TRITON_COMPILES.append(f"{getattr(kw.get('fn'), 'name', '?')}: {str(kw.get('repr', ''))[:400]}")
        return prev(**kw) if prev is not None else None

    hook.forkkv_watch = True
    rt.jit_post_compile_hook = hook
    return True


def compile_counters() -> dict:
    """A snapshot of the events a warm decode step can hide behind: dynamo's graphs and recompiles, inductor's
    CUDA-graph skips (a skipped graph runs its kernels one launch at a time; a function whose static inputs moved
    more than ``cudagraph_unexpected_rerecord_limit`` times is skipped too) and re-recordings on non-static inputs,
    Triton JIT compiles of our kernels (once :func:`watch_triton_compiles` ran) and the CUDA caching allocator's
    device allocations and retries (a ``cudaMalloc``, or a retry that frees cached blocks, inside a step).
    :func:`counters_since` gives what happened after it."""
    from torch._dynamo.utils import counters

    snap = {f"inductor.{k}": v for k, v in counters["inductor"].items() if "cudagraph" in k}
    snap["stats.unique_graphs"] = counters["stats"].get("unique_graphs", 0)
    snap["recompiles"] = sum(counters["recompiles"].values())
    snap["graph_breaks"] = sum(counters["graph_break"].values())
    snap["triton.jit_compiles"] = len(TRITON_COMPILES)
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        snap["cuda.device_allocs"] = stats.get("num_device_alloc", stats.get("segment.all.allocated", 0))
        snap["cuda.alloc_retries"] = stats.get("num_alloc_retries", 0)
    return snap


def counters_since(before: dict) -> dict:
    """The nonzero changes of :func:`compile_counters` since ``before``."""
    now = compile_counters()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
