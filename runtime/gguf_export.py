"""From a plan to a quantized GGUF that llama.cpp runs: ``python -m runtime export PLAN --to gguf --model DIR -o F``.

Steps (each printed with its time; the tools' output goes to log files in the work directory):

1. the llama.cpp recipe of :func:`runtime.export.llamacpp_recipe` (plans llama.cpp cannot express are
   refused with the reason) and the pruned checkpoint of :mod:`runtime.prune_checkpoint` (kept experts
   only, the plan's top-k in ``config.json``, an untied output head where llama.cpp needs one). What llama.cpp
   cannot run is fixed there, with a note: all-zero ``shared_expert_gate`` rows become
   :data:`~runtime.prune_checkpoint.ZERO_GATE_NUDGE` (llama.cpp computes that gate as ``silu(x)/x``, NaN for
   a zero row; ``sigmoid(1e-20 h)`` is the same 0.5 in float32);
2. ``convert_hf_to_gguf.py`` (the llama.cpp tree's, with its own ``gguf-py``) -> a BF16 (F32 when the plan
   keeps F32/F16 tensors) GGUF;
3. with I-quants in the plan, ``llama-imatrix`` on ``--calibration-text`` (required for IQ1/IQ2/IQ3_XXS,
   which llama-quantize refuses without one);
4. ``llama-quantize --tensor-type-file tensor-types.txt`` with the plan's type for every quantizable tensor;
5. :func:`check_gguf`: the GGUF read back with the ``gguf`` package; every planned tensor's type and bytes,
   every fixed tensor's (norms, routers, biases; llama.cpp keeps them in F32) element count, and the expert
   count and top-k in the metadata compared with the plan. Any difference is a :class:`GGUFCheckError` that
   lists them, and the GGUF is then not moved to ``-o``.

The llama.cpp tools are found by :func:`runtime.llamacpp.resolve` (``--llama-cpp DIR``, ``$MOECC_LLAMA_CPP``
or the ``python -m runtime llama-cpp build`` cache).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.byte_model import block_bytes, is_router_row_block
from optimizer.errors import InputError, MoeccError
from optimizer.formats import get_format
from optimizer.plan import Plan, load_plan

from .export import (
    CHECKPOINT_DIR,
    LEADING_DENSE,
    _architecture,
    gguf_arch,
    gguf_name,
    gguf_split_names,
    llamacpp_recipe,
    untie_needed,
)
from .llamacpp import LlamaCpp, resolve, run_tool
from .plan_check import check_plan
from .prune_checkpoint import ZERO_GATE_NUDGE, is_tied, plan_digest, write_pruned_checkpoint, zero_gate_names

#: I-quants llama-quantize refuses to make without an importance matrix
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
#: GGUF types llama.cpp may store a fixed (unquantized) tensor in
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFCheckError(MoeccError):
    """The GGUF llama.cpp wrote differs from the plan (the message lists the differences)."""


@dataclass(frozen=True)
class Expected:
    """What the plan says about one GGUF tensor."""

    type: str | None  # GGUF type; None for a fixed tensor (llama.cpp picks a float type)
    bytes: int  # planned bytes (fixed tensors: the plan's bytes in the checkpoint's dtype)
    elements: int
    planned: bool = True  # False: a tensor llama.cpp adds beyond the plan (the untied output head)
    parts: tuple[str, ...] = ()  # the tensors the converter may split it into (deepseek2's attn_kv_b)


@dataclass
class GGUFCheck:
    """Result of :func:`check_gguf`."""

    tensors: int  # tensors in the GGUF
    planned: int  # GGUF tensors with a planned type (all matched)
    planned_bytes: int  # their bytes in the plan (= in the GGUF)
    fixed: int  # fixed tensors (norms, routers, biases)
    fixed_bytes_plan: int
    fixed_bytes_gguf: int
    extra: dict[str, int] = field(default_factory=dict)  # GGUF tensors the plan does not have -> bytes
    expert_count: int | None = None
    expert_used_count: int | None = None

    @property
    def gguf_bytes(self) -> int:
        """Tensor data of the GGUF."""
        return self.planned_bytes + self.fixed_bytes_gguf + sum(self.extra.values())

    def summary(self) -> str:
        extra = "".join(f"; {n} not in the plan ({b:,} B)" for n, b in self.extra.items())
        return (f"{self.planned} planned tensors: types and bytes as planned ({self.planned_bytes:,} B); "
                f"{self.fixed} norms/routers/biases kept in float ({self.fixed_bytes_gguf:,} B, plan "
                f"{self.fixed_bytes_plan:,} B); {self.expert_count} experts, top-{self.expert_used_count}" + extra
                + f"; tensor data {self.gguf_bytes:,} B")


def _is_fixed(block) -> bool:
    return not block.quantizable or len(block.shape) < 2


def expected_tensors(plan: Plan, arch) -> dict[str, Expected]:
    """GGUF tensor name -> what the plan says about it (experts of a layer merged into one tensor)."""
    out: dict[str, Expected] = {}
    per_layer = {m.index: m.num_experts for m in arch.moe_layers}
    kept = {lp.layer: len(lp.kept_experts) for lp in plan.layers}
    for block in arch.blocks:
        fmt = plan.formats.get(block.name)
        if fmt is None:
            continue  # a pruned expert
        target = gguf_name(block.name, arch.family, arch.num_layers)
        if target is None:
            raise InputError(f"{block.name}: no GGUF tensor name known")
        ggml_type = None if _is_fixed(block) else get_format(fmt).name
        elements = 1
        for d in block.shape:
            elements *= int(d)
        prev = out.get(target)
        if prev is not None and prev.type != ggml_type:
            raise InputError(f"llama.cpp stores {target} as one tensor, but the plan gives its parts different "
                             f"formats ({prev.type}, {ggml_type})")
        nbytes = block_bytes(block, fmt)
        if block.layer in kept and is_router_row_block(block, per_layer):  # rows of the kept experts only
            nbytes = nbytes // block.shape[0] * kept[block.layer]
            elements = elements // block.shape[0] * kept[block.layer]
        out[target] = Expected(ggml_type, nbytes + (prev.bytes if prev else 0),
                               elements + (prev.elements if prev else 0),
                               parts=gguf_split_names(target, arch.family))
    if untie_needed(plan, arch.family) and "token_embd.weight" in out and "output.weight" not in out:
        emb = out["token_embd.weight"]  # llama.cpp's untied head: a copy of the embedding, in its type
        out["output.weight"] = Expected(emb.type, emb.bytes, emb.elements, planned=False)
    return out


def check_gguf(path: str | Path, plan: Plan, arch) -> GGUFCheck:
    """Read ``path`` back and compare every tensor with the plan; raise :class:`GGUFCheckError` listing the
    differences (type, bytes, element count, missing tensors, expert count, top-k)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    expected = expected_tensors(plan, arch)
    problems: list[str] = []
    check = GGUFCheck(tensors=len(got), planned=0, planned_bytes=0, fixed=0, fixed_bytes_plan=0, fixed_bytes_gguf=0)
    split: set[str] = set()
    for name, exp in expected.items():
        names = (name,) if name in got or not exp.parts else exp.parts
        missing = [n for n in names if n not in got]
        if missing:
            problems.append(f"{', '.join(missing)}: missing from the GGUF")
            continue
        if names != (name,):
            split.update(names)
            name = "+".join(names)  # split by the converter: each part in the plan's type, bytes summed
        types = {got[n].tensor_type.name for n in names}
        ggml_type = types.pop() if len(types) == 1 else "/".join(sorted(types))
        nbytes, elements = (sum(int(got[n].n_bytes) for n in names), sum(int(got[n].n_elements) for n in names))
        if exp.type is None:
            if ggml_type not in FLOAT_TYPES or elements != exp.elements:
                problems.append(f"{name}: {ggml_type} with {elements} elements, plan: float with {exp.elements}")
            check.fixed += 1
            check.fixed_bytes_plan += exp.bytes
            check.fixed_bytes_gguf += nbytes
            continue
        if ggml_type != exp.type or nbytes != exp.bytes or elements != exp.elements:
            problems.append(f"{name}: {ggml_type} {nbytes:,} B ({elements} elements), "
                            f"plan {exp.type} {exp.bytes:,} B ({exp.elements} elements)")
            continue
        if exp.planned:
            check.planned += 1
            check.planned_bytes += nbytes
    check.extra = {n: int(t.n_bytes) for n, t in got.items()
                   if n not in split and (n not in expected or not expected[n].planned)}
    prefix = gguf_arch(arch.family)

    def field_int(key: str) -> int | None:
        f = reader.fields.get(key)
        return int(f.contents()) if f is not None else None

    check.expert_count = field_int(f"{prefix}.expert_count")
    check.expert_used_count = field_int(f"{prefix}.expert_used_count")
    n = {len(lp.kept_experts) for lp in plan.layers}
    k = {lp.top_k for lp in plan.layers}
    if n and {check.expert_count} != n:
        problems.append(f"{prefix}.expert_count: {check.expert_count}, plan {sorted(n)}")
    if k and {check.expert_used_count} != k:
        problems.append(f"{prefix}.expert_used_count: {check.expert_used_count}, plan {sorted(k)}")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise GGUFCheckError(f"{path}: {len(problems)} differences from the plan: {shown}")
    return check


def check_layers_runnable(arch, model: Path) -> None:
    """Refuse a model whose dense (non-MoE) decoder layers llama.cpp's arch cannot hold: qwen2moe, qwen3moe,
    olmoe and Mixtral's llama have MoE in every layer; deepseek2, glm4moe and dots1 allow leading dense layers
    only (:data:`~runtime.export.LEADING_DENSE`). A family without a GGUF arch is refused (:func:`gguf_arch`)."""
    moe = {m.index for m in arch.moe_layers}
    dense = [i for i in range(arch.num_layers) if i not in moe]
    target = gguf_arch(arch.family)
    leading = target in LEADING_DENSE
    if not dense or (leading and dense == list(range(len(dense)))):
        return
    raise InputError(f"llama.cpp's {target} needs an MoE block in every layer"
                     + (" after the leading dense ones" if leading else "")
                     + f", but layers {dense} of {model} are dense (mlp_only_layers / decoder_sparse_step / "
                     "first_k_dense_replace in config.json); llama.cpp cannot load this model")


def check_convertible(arch, model: Path) -> None:
    """Refuse a checkpoint llama.cpp's converter or loader cannot take (:func:`check_layers_runnable`; the
    converter's llama class needs the sentencepiece package even with a tokenizer.json)."""
    check_layers_runnable(arch, model)
    if gguf_arch(arch.family) == "llama" and importlib.util.find_spec("sentencepiece") is None:
        raise InputError("llama.cpp's converter imports the sentencepiece package for llama-architecture models "
                         f"({arch.family}), even with a tokenizer.json: `pip install sentencepiece` first")


def _check_out(out: Path, overwrite: bool, model: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise InputError(f"-o {out}: --to gguf writes one file; name it *.gguf")
    if out.is_dir() or out.is_symlink():
        raise InputError(f"-o {out}: is a directory or a link; give a new file name")
    if out.exists() and not overwrite:
        raise InputError(f"-o {out}: exists; give --overwrite to replace it")
    if model.resolve() in out.resolve().parents:
        raise InputError(f"-o {out}: lies inside the model directory {model}; write it elsewhere")
    return out


def export_gguf(plan_path: str | Path, model: str | Path | None, out: str | Path, llama_cpp: str | Path | None = None,
                calibration_text: str | Path | None = None, threads: int | None = None, overwrite: bool = False,
                keep_work: bool = False) -> GGUFCheck:
    """Write ``out``, the plan's quantized GGUF, checked against the plan (see the module docstring).

    Raises InputError for bad input and plans llama.cpp cannot run, RuntimeError when a llama.cpp step fails,
    GGUFCheckError when the result differs from the plan (the work directory is then kept).
    """
    if model is None or not Path(model).is_dir():
        raise InputError("--model: --to gguf needs the checkpoint directory the plan was made for")
    model = Path(model)
    plan = load_plan(plan_path)
    arch = _architecture(plan, model)
    check_plan(plan, arch)
    out = _check_out(Path(out), overwrite, model)
    used = {get_format(f).name for b in arch.blocks if (f := plan.formats.get(b.name)) and not _is_fixed(b)}
    iquants = sorted(t for t in used if t.startswith("IQ"))
    if calibration_text is not None and not Path(calibration_text).is_file():
        raise InputError(f"--calibration-text {calibration_text}: no such file")
    if sorted(IMATRIX_REQUIRED & used) and calibration_text is None:
        raise InputError(f"the plan uses {', '.join(sorted(IMATRIX_REQUIRED & used))}, which llama-quantize makes "
                         "only with an importance matrix: give --calibration-text FILE (plain text, e.g. the "
                         "profile's calibration corpus) for llama-imatrix")
    zero_gates = zero_gate_names(model)
    untie = untie_needed(plan, arch.family) and is_tied(model)
    files = llamacpp_recipe(plan, arch, model, CHECKPOINT_DIR, len(zero_gates))  # refuses what llama.cpp can't do
    check_convertible(arch, model)
    expected_tensors(plan, arch)  # every planned tensor has a GGUF name
    tools = ("llama-quantize",) + (("llama-imatrix",) if iquants and calibration_text is not None else ())
    llama: LlamaCpp = resolve(llama_cpp, tools, converter=True)
    threads = threads or os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".moecc-work", dir=out.parent))
    ok = False
    try:
        for name, text in files.items():
            (work / name).write_text(text, encoding="utf-8")
        t0 = time.perf_counter()
        written = write_pruned_checkpoint(plan, arch, model, work / CHECKPOINT_DIR, plan_digest(plan_path),
                                          untie_embeddings=untie, zero_gates=zero_gates)
        print(f"[export] pruned checkpoint: {written.experts} experts, top-{written.top_k}, "
              f"{written.tensors} tensors in {time.perf_counter() - t0:.1f} s", flush=True)
        if zero_gates:
            print(f"note: {len(zero_gates)} all-zero shared_expert_gate weights ({zero_gates[0]}, ...) set to "
                  f"{ZERO_GATE_NUDGE:g}: llama.cpp computes that gate as silu(x)/x, NaN for a zero row; "
                  "sigmoid(1e-20 x) is the same 0.5 in float32", flush=True)
        if untie:
            print("note: llama.cpp's {} needs an output head: the GGUF stores output.weight, a copy of the "
                  "embedding in its type, beyond the plan's bytes".format(gguf_arch(arch.family)), flush=True)
        outtype = "f32" if used & {"F32", "F16"} else "bf16"
        source = work / f"model-{outtype}.gguf"
        run_tool("convert", [sys.executable, str(llama.converter), str(work / CHECKPOINT_DIR), "--outtype", outtype,
                             "--outfile", str(source)], work / "convert.log", "export", env=llama.converter_env())
        quantize = [str(llama.tool("llama-quantize"))]
        if iquants and calibration_text is not None:
            imatrix = work / "imatrix.gguf"
            run_tool("imatrix", [str(llama.tool("llama-imatrix")), "-m", str(source), "-f", str(calibration_text),
                                 "-o", str(imatrix), "-t", str(threads)], work / "imatrix.log", "export")
            quantize += ["--imatrix", str(imatrix)]
        elif iquants:
            print(f"note: the plan uses {', '.join(iquants)} without an importance matrix "
                  "(give --calibration-text for one)", flush=True)
        result = work / "model-plan.gguf"
        run_tool("quantize", [*quantize, "--tensor-type-file", str(work / "tensor-types.txt"), str(source),
                              str(result), "Q8_0", str(threads)], work / "quantize.log", "export")
        check = check_gguf(result, plan, arch)
        os.replace(result, out)
        ok = True
        print(f"[export] check: {check.summary()} (plan bytes.total {plan.bytes.total:,} B)", flush=True)
        return check
    finally:
        if ok and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[export] work directory kept: {work}", file=sys.stderr, flush=True)


__all__ = ["export_gguf", "check_gguf", "check_layers_runnable", "check_convertible", "expected_tensors", "GGUFCheck",
           "GGUFCheckError", "IMATRIX_REQUIRED"]
