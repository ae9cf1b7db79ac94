"""One rank of a tensor-parallel ForkKV run (``torchrun --nproc_per_node N tests/tp_worker.py MODEL ADAPTERS OUT``).

Loads the checkpoint with ``tp_plan="auto"`` (transformers shards q/k/v/o and the MLP over the ranks), the adapters
with ``PeftModel.from_pretrained``/``load_adapter``, builds a SharedContext and generates as
``tests/test_tensor_parallel.py`` does on one process; every rank writes what it saw to ``OUT.rank<k>.json``:
tokens, scores, and the bytes and shapes of its own share of the cache. Not a test module itself.

``FORKKV_TEST_CASE=plans``: instead, the mixed-dtype generate (``run_mixed_dtypes``), each LoRA layer's
tensor-parallel style, and whether ``enable_forkkv(..., batched_lora=False)`` is refused.
``FORKKV_TEST_HASH_SEEDS=a,b``: rank k runs with ``PYTHONHASHSEED`` the k-th of them (the script starts itself
again), so that sets of adapter names iterate in the orders the test chose."""

import os
import sys

_SEEDS = os.environ.get("FORKKV_TEST_HASH_SEEDS")
if _SEEDS and os.environ.get("PYTHONHASHSEED") != _SEEDS.split(",")[int(os.environ["RANK"])]:
    os.environ["PYTHONHASHSEED"] = _SEEDS.split(",")[int(os.environ["RANK"])]
    os.execv(sys.executable, [sys.executable, *sys.argv])

import json  # noqa: E402
from pathlib import Path

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# beside this file: torchrun runs it as a script, its folder first
from tp_common import run_fitted, run_forkkv, run_mixed_dtypes, run_store  # noqa: E402


def plans_report(pm, device) -> dict:
    """What ``FORKKV_TEST_CASE=plans`` checks on this rank (see the module docstring)."""
    import forkkv_hf
    from forkkv_hf.peft.tp import tp_style
    from peft.tuners.lora import LoraLayer

    try:
        forkkv_hf.enable_forkkv(pm, batched_lora=False)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    result = run_mixed_dtypes(pm, device)
    styles = {n.rsplit(".", 1)[-1]: tp_style(m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    return {"sequences": result.sequences.tolist(), "scores": [s.float().cpu().tolist() for s in result.scores],
            "refusal": refusal, "styles": styles}


def main(model_dir: str, adapters_dir: str, out: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    rank = dist.get_rank()
    adapters = sorted(p.name for p in Path(adapters_dir).iterdir() if p.is_dir())
    pm = PeftModel.from_pretrained(model, str(Path(adapters_dir) / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        pm.load_adapter(str(Path(adapters_dir) / name), adapter_name=name)
    pm.eval()
    if os.environ.get("FORKKV_TEST_WHOLE_LORA"):
        # as PEFT releases without DTensor support (0.21.0) leave them: every factor whole on every rank, while the
        # base layers compute their shards
        from peft.tuners.lora import LoraLayer
        from torch import nn

        for layer in [m for m in pm.modules() if isinstance(m, LoraLayer)]:
            for part in (layer.lora_A, layer.lora_B):
                for lin in part.values():
                    if type(lin.weight).__name__ == "DTensor":
                        lin.weight = nn.Parameter(lin.weight.full_tensor(), requires_grad=False)
            if os.environ.get("FORKKV_TEST_NO_PLAN_STAMP"):  # nor the layers' tensor-parallel styles stamped
                layer.get_base_layer().__dict__.pop("_hf_tp_plan", None)
    device = model.model.embed_tokens.weight.device
    if os.environ.get("FORKKV_TEST_CASE") == "plans":
        report = {"rank": rank, "world": dist.get_world_size(), **plans_report(pm, device)}
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
        dist.destroy_process_group()
        return
    shared, result = run_forkkv(pm, device)
    store_sequences = run_store(pm, device)
    fitted_sequences = run_fitted(pm, device, shared)
    layer = shared.layers[0]
    report = {
        "rank": rank, "world": dist.get_world_size(), "device": str(device),
        "sequences": result.sequences.tolist(), "store_sequences": store_sequences.tolist(),
        "fitted_sequences": fitted_sequences.tolist(), "scores": [s.float().cpu().tolist() for s in result.scores],
        "base_bytes": shared.base_bytes(), "factor_bytes": shared.factor_bytes(),
        "residual_bytes": {a: shared.residual_bytes(a) for a in shared.adapters},
        "key_shape": list(layer.key.shape),
        # the batched LoRA's stacks: rowwise layers (o_proj, down_proj) sum their partial u across the ranks
        "stacks": sorted({("rowwise" if st.reduce_group is not None else "colwise")
                          for m in pm.modules() if (st := m.__dict__.get("_forkkv_stack")) is not None}),
    }
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
