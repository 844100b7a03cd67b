"""Deployment files for a plan: ``python -m runtime export PLAN --to gguf|llamacpp|gptqmodel|torchao -o OUT``.

* ``gguf``: the quantized GGUF itself, made with llama.cpp's tools and checked against the plan
  (:mod:`runtime.gguf_export`; ``-o model.gguf``).
* ``llamacpp``: ``tensor-types.txt`` for ``llama-quantize --tensor-type-file`` (one anchored GGUF tensor
  name and type a line, e.g. ``^blk\\.3\\.ffn_down_exps\\.weight$=Q4_K``), ``override-kv.txt`` (the top-k as
  an ``--override-kv`` value, with the family's GGUF arch prefix), ``kept-experts.json``, ``README.md`` with
  the converter and llama-quantize commands, and, when the plan prunes and ``--model`` is the checkpoint,
  ``hf-pruned/``: the checkpoint without the pruned experts (:mod:`runtime.prune_checkpoint`), which
  ``convert_hf_to_gguf.py`` turns into a GGUF with the right expert count. Plans llama.cpp cannot express
  are refused.
* ``gptqmodel``: ``gptqmodel.json``, a ``QuantizeConfig``-style map: default ``bits``/``group_size`` plus a
  ``dynamic`` map of ``+:^module$`` -> ``{bits, group_size}`` overrides and ``-:^module$`` skips.
* ``torchao``: ``torchao.json``, module FQN -> ``IntxWeightOnlyConfig`` arguments (``weight_dtype``,
  ``group_size``); see ``docs/runtime.md`` for the three lines that turn it into ``ModuleFqnToConfig``.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.formats import GGUF_FAMILY, get_format
from optimizer.model_spec import Architecture, BlockKind
from optimizer.plan import Plan, load_plan

from .checkpoint import checkpoint_files
from .outdir import check_output_dir, output_dir
from .plan_check import check_plan
from .prune_checkpoint import (
    CONVERTER_CONFIG,
    LEADING_DENSE_FROM_TYPES,
    ZERO_GATE_NUDGE,
    converter_config_fixes,
    is_tied,
    plan_digest,
    plan_prunes,
    uniform_layers,
    write_pruned_checkpoint,
    zero_gate_names,
)
from .quant import FLOAT_DTYPES, storage_format

TARGETS = ("llamacpp", "gptqmodel", "torchao")
#: GGUF architecture name (key prefix) of each family, as llama.cpp's convert_hf_to_gguf.py writes it; a family
#: missing here has no converter there (flex_olmo: no FlexOlmoForCausalLM) and is refused by :func:`gguf_arch`.
GGUF_ARCH = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "glm4_moe_lite": "deepseek2",
             "glm4_moe": "glm4moe", "dots1": "dots1", "solar_open": "glm4moe", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}
#: GGUF archs whose llama.cpp loader requires ``output.weight`` (no fallback to a tied embedding)
NEEDS_OUTPUT = {"qwen2moe", "olmoe", "dots1"}
#: GGUF archs whose llama.cpp loader takes leading dense layers (``leading_dense_block_count``)
LEADING_DENSE = {"deepseek2", "glm4moe", "dots1"}
_SOLVE_HINT = "solve with `python -m optimizer solve ... --target llamacpp`"


def _architecture(plan: Plan, model: Path | None) -> Architecture:
    if model is None:
        raise InputError("--model: the checkpoint (or its config.json) is needed to name the tensors")
    if model.is_dir():
        checkpoint_files(model)  # a directory must hold safetensors: a pickle-only one is refused here
    arch = load_architecture(model)
    if arch.shape_hash() != plan.architecture_hash:
        raise InputError(f"plan was made for a different model than {model} (architecture hashes differ)")
    return arch


def gguf_arch(family: str) -> str:
    """The GGUF architecture of ``family``; InputError (one line) when llama.cpp's converter has none."""
    found = GGUF_ARCH.get(family)
    if found is None:
        raise InputError(f"llama.cpp's converter has no architecture for {family} models, so there is no GGUF or "
                         f"llama.cpp recipe for them; llama.cpp exports: {', '.join(sorted(GGUF_ARCH))}")
    return found


_FIXED_RE = re.compile(r"(norm\.weight|\.bias|\.gate\.weight|e_score_correction_bias|shared_expert_gate\.weight)$")


def _layer_count(plan: Plan) -> int:
    found = [int(m.group(1)) for n in plan.formats if (m := re.search(r"layers\.(\d+)\.", n))]
    return max(found, default=-1) + 1


def gguf_name(block_name: str, family: str, num_layers: int) -> str | None:
    """The GGUF tensor name llama.cpp's converter gives a block (experts merged per layer), or None."""
    import gguf

    if block_name.endswith("e_score_correction_bias"):
        m = re.search(r"layers\.(\d+)\.", block_name)
        return f"blk.{m.group(1)}.exp_probs_b.bias" if m else None
    name = re.sub(r"\.experts\.\d+\.", ".experts.", block_name)
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch(family)]
    for a in (arch_enum, gguf.MODEL_ARCH.LLAMA):  # llama's map covers dense MLPs that MoE archs omit
        found = gguf.get_tensor_name_map(a, num_layers).get_name(name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            return found
    return None


def gguf_split_names(target: str, family: str) -> tuple[str, ...]:
    """The tensors llama.cpp's converter splits ``target`` into, or ``()``: deepseek2's ``attn_kv_b`` becomes
    ``attn_k_b`` (transposed, rows of ``qk_nope_head_dim``) and ``attn_v_b`` (rows of ``kv_lora_rank``) for
    MLA's absorption; the converter of llama-cpp-python 0.3.36 writes only those two."""
    if GGUF_ARCH.get(family) == "deepseek2" and target.endswith(".attn_kv_b.weight"):
        stem = target[: -len("attn_kv_b.weight")]
        return f"{stem}attn_k_b.weight", f"{stem}attn_v_b.weight"
    return ()


def _types_line(tensor: str, ggml_type: str) -> str:
    """One ``--tensor-type-file`` entry: llama-quantize regex-searches (``std::regex_search``, first match
    wins) the lowercased pattern in each tensor name, so the exact name is anchored and its dots escaped."""
    return f"^{re.escape(tensor)}$={ggml_type}\n"


def parse_tensor_types(text: str) -> dict[str, str]:
    """GGUF tensor name -> type of a ``tensor-types.txt`` written by :func:`llamacpp_recipe`."""
    out = {}
    for entry in text.split():
        pattern, _, ggml_type = entry.partition("=")
        out[pattern.removeprefix("^").removesuffix("$").replace("\\", "")] = ggml_type
    return out


def llamacpp_recipe(plan: Plan, arch: Architecture | None = None, model: Path | None = None,
                    checkpoint: str | None = None, nudged_gates: int = 0) -> dict[str, str]:
    """Files of the llama.cpp recipe; raises InputError for plans llama.cpp cannot express.

    Without ``arch`` the tensors are classified from the plan's names (norms, biases, routers are skipped).
    ``checkpoint`` names the pruned checkpoint written next to the recipe (``hf-pruned``), if any; ``model``
    is the original checkpoint, named in the README's commands.
    """
    family = arch.family if arch is not None else plan.family
    prefix = gguf_arch(family)
    num_layers = arch.num_layers if arch is not None else _layer_count(plan)
    counts = {len(lp.kept_experts) for lp in plan.layers}
    ks = {lp.top_k for lp in plan.layers}
    if len(counts) > 1:
        raise InputError(f"llama.cpp needs one expert count for all layers; the plan keeps {sorted(counts)}; "
                         f"{_SOLVE_HINT}")
    if len(ks) > 1:
        raise InputError(f"llama.cpp needs one top-k for all layers; the plan uses {sorted(ks)}; {_SOLVE_HINT}")
    types: dict[str, str] = {}
    blocks = {b.name: b for b in arch.blocks} if arch is not None else {}
    for name, fmt in plan.formats.items():
        block = blocks.get(name)
        if arch is not None and block is None:
            raise InputError(f"plan.formats.{name}: not a block of the model")
        fixed = _FIXED_RE.search(name) is not None if block is None else (not block.quantizable or len(block.shape) < 2)
        if fixed:
            continue  # llama.cpp keeps norms, biases and routers in F32 itself
        f = get_format(fmt)
        if f.family != GGUF_FAMILY:
            raise InputError(f"plan.formats.{name}: {f.name} is a runtime format llama.cpp cannot store; {_SOLVE_HINT}")
        target = gguf_name(name, family, num_layers)
        if target is None:
            raise InputError(f"{name}: no GGUF tensor name known")
        if types.setdefault(target, f.name) != f.name:
            raise InputError(f"llama.cpp stores {target} as one tensor, but the plan gives its experts different "
                             f"formats ({types[target]}, {f.name}); {_SOLVE_HINT}")
        for part in gguf_split_names(target, family):  # what the converter writes instead (older ones: target)
            types[part] = f.name
    n, k = counts.pop(), ks.pop()
    untie = untie_needed(plan, family)
    if untie and "token_embd.weight" in types:
        types["output.weight"] = types["token_embd.weight"]
    kv = [f"{prefix}.expert_used_count=int:{k}"]
    kept = {str(lp.layer): list(lp.kept_experts) for lp in plan.layers}
    return {"tensor-types.txt": "".join(_types_line(t, ty) for t, ty in sorted(types.items(), key=_natural)),
            "override-kv.txt": "".join(line + "\n" for line in kv),
            "kept-experts.json": json.dumps(kept, indent=1) + "\n",
            "README.md": _readme(plan, arch, n, k, kv[0], set(types.values()), model, checkpoint, untie,
                                 nudged_gates)}


def untie_needed(plan: Plan, family: str) -> bool:
    """Whether llama.cpp needs an ``output.weight`` the plan's tied checkpoint lacks (:data:`NEEDS_OUTPUT`)."""
    return GGUF_ARCH.get(family) in NEEDS_OUTPUT and "lm_head.weight" not in plan.formats


def _readme(plan: Plan, arch: Architecture | None, n: int, k: int, kv: str, used: set[str],
            model: Path | None, checkpoint: str | None, untie: bool = False, nudged_gates: int = 0) -> str:
    """The recipe's README: the converter and llama-quantize commands, in order."""
    sizes = {m.num_experts for m in arch.moe_layers} if arch is not None else set()
    ks = {m.top_k for m in arch.moe_layers} if arch is not None else set()
    prunes = arch is None or sizes != {n}
    source = checkpoint or (str(model) if model is not None and model.is_dir() else "path/to/hf-model")
    outtype = "f32" if used & {"F32", "F16"} else "bf16"
    override = "" if checkpoint or (arch is not None and ks == {k}) else f" --override-kv {kv}"
    lines = [f"# llama.cpp recipe for {plan.model_name}", "",
             f"The plan keeps {n} experts in every MoE layer"
             + (f" (of {sizes.pop()})" if len(sizes) == 1 and prunes else "") + f" and routes each token to {k}; "
             "tensor-types.txt gives every quantizable tensor its GGUF type.", ""]
    if checkpoint:
        lines += [f"`{checkpoint}/` is the original checkpoint with the pruned experts removed (kept-experts.json, "
                  f"renumbered 0..{n - 1}), routers sliced and config.json set to {n} experts, top-k {k}; "
                  "weights in their original dtype, not quantized.", ""]
        if nudged_gates:
            lines += [f"Its {nudged_gates} all-zero `shared_expert_gate` weights are set to {ZERO_GATE_NUDGE:g}: "
                      "llama.cpp computes that gate as silu(x)/x, NaN for a zero row; sigmoid(1e-20 x) is the same "
                      "0.5 in float32.", ""]
    elif prunes:
        lines += ["llama-quantize cannot remove experts. Write the pruned checkpoint first (it becomes "
                  "`hf-pruned/` in this directory):", "",
                  "    python -m runtime export PLAN --to llamacpp --model path/to/hf-model -o THIS_DIR", "",
                  "then convert `hf-pruned` instead of the original checkpoint below.", ""]
        source = "hf-pruned"
    converter: dict[str, str | int] = dict(CONVERTER_CONFIG.get(plan.family, {}))
    if plan.family in LEADING_DENSE_FROM_TYPES:  # the layers before the first MoE layer are dense
        converter["first_k_dense_replace"] = min(lp.layer for lp in plan.layers)
    if converter:
        entries = ", ".join(f"`{key}: {value}`" for key, value in converter.items())
        lines += [f"llama.cpp's converter needs {entries} in a {plan.family} config.json (transformers routes that "
                  "way without it; without it llama.cpp aborts on the first MoE layer or cannot load the model): "
                  + (f"`{checkpoint}/config.json` has it." if checkpoint else
                     "add it to the checkpoint's config.json, or let `--pruned-checkpoint` write one that has it."),
                  ""]
    lines += ["From this directory, with `LLAMA_CPP` a llama.cpp checkout whose tools are built (`python -m runtime "
              "llama-cpp build` makes one in moecc's `cache/llama.cpp`; `python -m runtime export PLAN --to gguf` "
              "runs all of this and checks the result against the plan):", "",
              f"    python $LLAMA_CPP/convert_hf_to_gguf.py {source} --outtype {outtype} "
              f"--outfile model-{outtype}.gguf",
              f"    $LLAMA_CPP/build/bin/llama-quantize --tensor-type-file tensor-types.txt{override} "
              f"model-{outtype}.gguf model-plan.gguf Q8_0 $(nproc)", "",
              "* `tensor-types.txt`: one `^name$=TYPE` a line; llama-quantize regex-searches each pattern in the "
              "tensor names (first match wins), so the names are anchored.",
              "* `Q8_0` is only the default for tensors the file does not name (none of the quantizable ones); it must "
              "be a quantized type, because llama-quantize applies the per-tensor types only then. Norms, routers "
              "(`ffn_gate_inp`) and 1-D tensors stay F32.",
              "* A row length that is not a multiple of a type's block (256 for K-quants, 32 for Q4_0/Q8_0...) makes "
              "llama-quantize fall back (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, IQ types->IQ4_NL; "
              "F16 if that does not fit either); plans solved with "
              "`--target llamacpp` only choose types the shapes admit."]
    if untie:
        lines.append(f"* llama.cpp's {gguf_arch(plan.family)} has no tied output head: "
                     + (f"`{checkpoint}/` stores `lm_head.weight` as a copy of the embedding" if checkpoint else
                        "convert a checkpoint with `lm_head.weight` (a copy of the embedding; `--pruned-checkpoint` "
                        "writes one)")
                     + ", and `output.weight` gets the embedding's type: the GGUF is larger than the plan by that "
                     "tensor.")
    if used & {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"}:
        lines.append("* The plan uses IQ1/IQ2/IQ3_XXS types: llama-quantize needs `--imatrix FILE` "
                     "(made by `llama-imatrix`) for them.")
    lines.append(f"* `override-kv.txt` (`{kv}`) is only needed when converting a checkpoint whose config has another "
                 "top-k; it can also be given to llama-cli / llama-server at load time (`--override-kv`).")
    return "\n".join(lines) + "\n"


def _natural(item: tuple[str, str]) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def _int_params(fmt_name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(bits, group) of the runtime int format a plan format is stored as; None for float formats."""
    if get_format(fmt_name).name in FLOAT_DTYPES:
        return None
    stored = get_format(storage_format(fmt_name, shape)[0])
    return stored.bits, stored.block_elements  # Q8_0 / Q4_0 / Q5_x: their code bits, blocks of 32


def _module(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def gptqmodel_config(plan: Plan, arch: Architecture) -> dict:
    """GPTQModel ``QuantizeConfig`` fields: the most common (bits, group_size) plus ``dynamic`` overrides."""
    blocks = {b.name: b for b in arch.blocks}
    params = {}
    for name, fmt in plan.formats.items():
        b = blocks[name]
        if b.quantizable and len(b.shape) == 2 and b.kind not in (BlockKind.EMBEDDING, BlockKind.LM_HEAD):
            params[name] = _int_params(fmt, b.shape)
    common = defaultdict(int)
    for p in params.values():
        if p:
            common[p] += 1
    bits, group = max(common, key=common.get) if common else (4, 128)
    dynamic = {}
    for name, p in params.items():
        pattern = "^" + re.escape(_module(name)) + "$"
        if p is None:
            dynamic["-:" + pattern] = {}
        elif p != (bits, group):
            dynamic["+:" + pattern] = {"bits": p[0], "group_size": p[1]}
    return {"bits": bits, "group_size": group, "sym": False, "dynamic": dynamic,
            "moecc": {"kept_experts": {str(lp.layer): list(lp.kept_experts) for lp in plan.layers},
                      "top_k": {str(lp.layer): lp.top_k for lp in plan.layers},
                      "note": "GPTQModel does not prune experts or change top-k: apply those to the checkpoint first"}}


def torchao_config(plan: Plan, arch: Architecture) -> dict:
    """Module FQN -> IntxWeightOnlyConfig arguments (None = leave unquantized)."""
    blocks = {b.name: b for b in arch.blocks}
    out: dict[str, dict | None] = {}
    for name, fmt in plan.formats.items():
        b = blocks[name]
        if not b.quantizable or len(b.shape) != 2:
            continue
        p = _int_params(fmt, b.shape)
        out[_module(name)] = None if p is None else {
            "config": "IntxWeightOnlyConfig", "weight_dtype": f"int{p[0]}", "group_size": p[1],
            "mapping_type": "ASYMMETRIC"}
    return {"module_fqn_to_config": out,
            "moecc": {"kept_experts": {str(lp.layer): list(lp.kept_experts) for lp in plan.layers},
                      "top_k": {str(lp.layer): lp.top_k for lp in plan.layers},
                      "note": "names are per-expert checkpoint modules; transformers >= 5 fuses experts in memory"}}


CHECKPOINT_DIR = "hf-pruned"


def export(plan_path: str | Path, to: str, out: str | Path, model: str | Path | None,
           pruned_checkpoint: bool | None = None, overwrite: bool = False) -> list[Path]:
    """Write the recipe files of ``to`` into the new directory ``out``; returns their paths.

    ``out`` is written whole through :func:`runtime.outdir.output_dir`: an existing ``out`` is replaced only
    with ``overwrite`` and only if moecc wrote it, and never when it is, holds or lies inside an input.

    ``pruned_checkpoint`` (llamacpp only): True writes ``out/hf-pruned`` (needs ``model`` to be a checkpoint
    directory), False never does, None (the default) writes it when ``model`` is a checkpoint directory and
    the plan prunes experts. See :mod:`runtime.prune_checkpoint`.
    """
    if to == "gguf":
        raise InputError("--to gguf writes one checked file: runtime.gguf_export.export_gguf")
    if to not in TARGETS:
        raise InputError(f"--to: {to!r} is not one of {', '.join(TARGETS)}")
    if pruned_checkpoint and to != "llamacpp":
        raise InputError("--pruned-checkpoint: only for --to llamacpp")
    plan = load_plan(plan_path)
    model = Path(model) if model else None
    out = check_output_dir(out, overwrite, (plan_path, model))
    checkpoint = None
    if to == "llamacpp":
        arch = _architecture(plan, model) if model else None
        gguf_arch(arch.family if arch is not None else plan.family)  # refused before anything is written
        if pruned_checkpoint and (model is None or not model.is_dir()):
            raise InputError("--pruned-checkpoint: --model must be the checkpoint directory")
        untie = arch is not None and untie_needed(plan, arch.family)
        zero_gates = zero_gate_names(model) if arch is not None and model.is_dir() else []
        if zero_gates and pruned_checkpoint is False:
            raise InputError(f"--no-pruned-checkpoint: {len(zero_gates)} shared_expert_gate weights of {model} are "
                             f"all zero ({zero_gates[0]}, ...); llama.cpp computes that gate as silu(x)/x, which is "
                             f"NaN for them. Drop --no-pruned-checkpoint: {CHECKPOINT_DIR}/ then sets them to "
                             f"{ZERO_GATE_NUDGE:g}, the same function in float32")
        fixes = converter_config_fixes(model) if arch is not None and model.is_dir() else {}
        if fixes and pruned_checkpoint is False:
            raise InputError(f"--no-pruned-checkpoint: llama.cpp's converter needs {fixes} in {model}/config.json "
                             f"(without it llama.cpp aborts on the first MoE layer). Drop --no-pruned-checkpoint: "
                             f"{CHECKPOINT_DIR}/config.json then has it")
        write = pruned_checkpoint if pruned_checkpoint is not None else (
            arch is not None and model.is_dir()
            and (plan_prunes(plan, arch) or (untie and is_tied(model)) or bool(zero_gates) or bool(fixes)))
        if write:
            uniform_layers(plan, arch)  # refuse before any file is written
            checkpoint = CHECKPOINT_DIR
        files = llamacpp_recipe(plan, arch, model, checkpoint, len(zero_gates))
    else:
        arch = _architecture(plan, model)
        config = gptqmodel_config(plan, arch) if to == "gptqmodel" else torchao_config(plan, arch)
        files = {f"{to}.json": json.dumps(config, indent=1, sort_keys=True) + "\n"}
    if arch is not None:
        check_plan(plan, arch)
    with output_dir(out, overwrite, (plan_path, model), f"runtime export --to {to}") as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if checkpoint:
            write_pruned_checkpoint(plan, arch, model, tmp / checkpoint, plan_digest(plan_path),
                                    untie_embeddings=untie, zero_gates=zero_gates)
    return [out / name for name in files] + ([out / checkpoint] if checkpoint else [])
