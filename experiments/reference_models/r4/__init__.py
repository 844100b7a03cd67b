"""R4: SmolLM2-135M-Instruct turned into a Qwen2-MoE with 32 experts, top-8 and sharp, distilled routers.

Modules: ``distill`` (trainable MoE block, layer-local distillation), ``stats`` (routing entropy,
top-k mass, expert load), ``build`` (R3's split + distillation on any dense Llama-style model),
``cli`` (GGUF loading, evaluation, saving; reuses ``..r3``). Entry point:
``python -m experiments.reference_models.r4_moefy build --out cache/r4``. Model card: ``../R4.md``.
"""
