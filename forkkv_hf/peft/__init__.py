"""What forkkv-hf does to PEFT's LoRA: the adapters' factors and the attention layers they sit on
(:mod:`.lora_factors`), batched mixed-adapter LoRA (:mod:`.batched_lora`), the wrappers installed on a ``PeftModel``
(:mod:`.wrappers`), the per-row adapter probe (:mod:`.adapter_probe`) and tensor-parallel shards (:mod:`.tp`).

Layering, bottom up: ``tp`` -> ``lora_factors`` -> ``calls``, ``adapter_probe`` -> ``wrappers`` -> ``batched_lora``
(the wrappers reach batched LoRA only through what it registers with them). The package is named after the library
it integrates; the modules import that library absolutely (``import peft``), which Python 3 never resolves to this
package.
"""
