"""Deployment recipes for a plan: ``python -m runtime export PLAN --to llamacpp|gptqmodel|torchao -o DIR``.

* ``llamacpp``: ``tensor-types.txt`` for ``llama-quantize --tensor-type-file`` (one GGUF tensor name and
  type a line, e.g. ``blk.3.ffn_down_exps.weight=Q4_K``), ``override-kv.txt`` (``--override-kv`` values for
  the expert count and top-k, with the family's GGUF arch prefix), ``kept-experts.json`` and ``README.md``
  with the command. Plans llama.cpp cannot express are refused.
* ``gptqmodel``: ``gptqmodel.json``, a ``QuantizeConfig``-style map: default ``bits``/``group_size`` plus a
  ``dynamic`` map of ``+:^module$`` -> ``{bits, group_size}`` overrides and ``-:^module$`` skips.
* ``torchao``: ``torchao.json``, module FQN -> ``IntxWeightOnlyConfig`` arguments (``weight_dtype``,
  ``group_size``); see ``docs/runtime.md`` for the three lines that turn it into ``ModuleFqnToConfig``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from optimizer.architecture import Architecture, BlockKind
from optimizer.errors import InputError
from optimizer.formats import GGUF_FAMILY, INT_FAMILY, get_format
from optimizer.plan import Plan, load_plan

from .quant import FLOAT_DTYPES, storage_format

TARGETS = ("llamacpp", "gptqmodel", "torchao")
#: GGUF architecture name (key prefix) of each family, as llama.cpp's convert_hf_to_gguf.py writes it.
GGUF_ARCH = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe", "mixtral": "llama", "olmoe": "olmoe"}
_SOLVE_HINT = "solve with `python -m optimizer solve ... --target llamacpp`"


def _architecture(plan: Plan, model: Path | None) -> Architecture:
    if model is None:
        raise InputError("--model: the checkpoint (or its config.json) is needed to name the tensors")
    from optimizer.architectures import load_architecture

    arch = load_architecture(model)
    if arch.shape_hash() != plan.architecture_hash:
        raise InputError(f"plan was made for a different model than {model} (architecture hashes differ)")
    return arch


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
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[GGUF_ARCH[family]]
    for a in (arch_enum, gguf.MODEL_ARCH.LLAMA):  # llama's map covers dense MLPs that MoE archs omit
        found = gguf.get_tensor_name_map(a, num_layers).get_name(name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            return found
    return None


def llamacpp_recipe(plan: Plan, arch: Architecture | None = None) -> dict[str, str]:
    """Files of the llama.cpp recipe; raises InputError for plans llama.cpp cannot express.

    Without ``arch`` the tensors are classified from the plan's names (norms, biases, routers are skipped).
    """
    family = arch.family if arch is not None else plan.family
    if family not in GGUF_ARCH:
        raise InputError(f"no llama.cpp architecture known for family {family}")
    num_layers = arch.num_layers if arch is not None else _layer_count(plan)
    counts = {len(lp.kept_experts) for lp in plan.layers}
    ks = {lp.top_k for lp in plan.layers}
    if len(counts) > 1:
        raise InputError(f"llama.cpp needs one expert count for all layers; the plan keeps {sorted(counts)}; {_SOLVE_HINT}")
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
    prefix = GGUF_ARCH[family]
    n, k = counts.pop(), ks.pop()
    full = arch is not None and {m.num_experts for m in arch.moe_layers} == {n}
    kv = [f"{prefix}.expert_used_count=int:{k}"] + ([] if full else [f"{prefix}.expert_count=int:{n}"])
    args = " ".join(f"--override-kv {line}" for line in kv)
    readme = (
        f"# llama.cpp recipe for {plan.model_name}\n\n"
        f"Convert the checkpoint to GGUF (BF16) with llama.cpp's convert_hf_to_gguf.py"
        + ("" if full else f", after removing the pruned experts (kept-experts.json: {n} per layer)") + ", then:\n\n"
        f"    llama-quantize --tensor-type-file tensor-types.txt {args} model-bf16.gguf model.gguf Q8_0\n\n"
        f"Every quantizable tensor is named in tensor-types.txt; the trailing type only covers tensors it misses.\n"
        f"`{kv[0]}` can also be given to llama-cli / llama-server at load time.\n"
    )
    kept = {str(lp.layer): list(lp.kept_experts) for lp in plan.layers}
    return {"tensor-types.txt": "".join(f"{t}={ty}\n" for t, ty in sorted(types.items(), key=_natural)),
            "override-kv.txt": "".join(line + "\n" for line in kv),
            "kept-experts.json": json.dumps(kept, indent=1) + "\n", "README.md": readme}


def _natural(item: tuple[str, str]) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def _int_params(fmt_name: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(bits, group) of the runtime int format a plan format is stored as; None for float formats."""
    if get_format(fmt_name).name in FLOAT_DTYPES:
        return None
    stored = get_format(storage_format(fmt_name, shape)[0])
    if stored.family != INT_FAMILY:  # Q8_0 / Q4_0 / Q5_x: the int format of the same bits and group 32
        return {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}[stored.name], 32
    return stored.bits, stored.block_elements


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


def export(plan_path: str | Path, to: str, out: str | Path, model: str | Path | None) -> list[Path]:
    """Write the recipe files of ``to`` into ``out``; returns their paths."""
    if to not in TARGETS:
        raise InputError(f"--to: {to!r} is not one of {', '.join(TARGETS)}")
    plan = load_plan(plan_path)
    if to == "llamacpp":
        files = llamacpp_recipe(plan, _architecture(plan, Path(model)) if model else None)
    else:
        arch = _architecture(plan, Path(model) if model else None)
        config = gptqmodel_config(plan, arch) if to == "gptqmodel" else torchao_config(plan, arch)
        files = {f"{to}.json": json.dumps(config, indent=1, sort_keys=True) + "\n"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime export``."""
    parser.add_argument("plan", type=Path)
    parser.add_argument("--to", required=True, choices=TARGETS)
    parser.add_argument("-o", "--out", type=Path, required=True, help="directory for the recipe files")
    parser.add_argument("--model", type=Path, help="checkpoint directory or config.json the plan was made for "
                        "(required for gptqmodel/torchao; optional for llamacpp)")


def run(args: argparse.Namespace) -> int:
    """Write the recipe; bad input or an inexpressible plan -> one line on stderr, exit code 2."""
    try:
        paths = export(args.plan, args.to, args.out, args.model)
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0
