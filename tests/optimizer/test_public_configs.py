"""Real public configs of large MoEs (``optimizer/data/configs``, sources in its ``SOURCES.md``): the project's
own parameter count matches each published total within 0.5%, and the config-only path (``python -m optimizer
example --config``) builds a documented-prior profile that plans at 40% of the model's BF16 size."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

import pytest

from optimizer.architectures import architecture_from_config
from optimizer.budget import Budget
from optimizer.cli import main
from optimizer.examples.deepseek_v3 import build_prior_profile
from optimizer.plan import SolveStatus
from optimizer.profile import load_profile
from optimizer.solve import SolveOptions, optimize

CONFIGS = resources.files("optimizer").joinpath("data", "configs")  # as the installed package ships them
#: a small format menu keeps the solves fast; the full example menu plans the same way, only slower
FORMATS = ("Q2_K", "Q4_K", "Q8_0", "BF16")
BUDGET_FRACTION = 0.4


@dataclass(frozen=True)
class Published:
    family: str
    total: float  # parameters, as published (SOURCES.md says where)
    moe_layers: int
    experts: int
    top_k: int
    tolerance: float = 0.005  # relative to the published figure
    why: str = ""  # when the tolerance is not 0.5%


PUBLISHED = {
    "mixtral-8x7b-v0.1": Published("mixtral", 46.7e9, 32, 8, 2),
    "mixtral-8x22b-v0.1": Published("mixtral", 141e9, 56, 8, 2),
    "qwen3-30b-a3b": Published("qwen3_moe", 30.5e9, 48, 128, 8),
    "qwen3-235b-a22b": Published("qwen3_moe", 235e9, 94, 128, 8),
    "qwen2-57b-a14b": Published(
        "qwen2_moe", 57e9, 28, 64, 8, tolerance=0.5e9 / 57e9,
        why="published only as '57B' (whole billions); the count, 57.41B, is 0.72% above it: within the figure's "
            "rounding, not within 0.5% (SOURCES.md)"),
    "olmoe-1b-7b-0924": Published("olmoe", 6.9e9, 16, 64, 8),
    "deepseek-v2-236b-reference": Published("deepseek_v2", 236e9, 59, 160, 6),
    "deepseek-coder-v2-instruct": Published("deepseek_v2", 236e9, 59, 160, 6),
}
#: the same architecture in another format: its profile and plan are those of the first (checked equal below)
SAME_ARCHITECTURE = {"deepseek-coder-v2-instruct": "deepseek-v2-236b-reference"}


def _config(name: str) -> dict:
    return json.loads(CONFIGS.joinpath(f"{name}.json").read_text())


def test_every_shipped_config_has_a_published_total_and_a_source_row() -> None:
    shipped = {p.name[:-5] for p in CONFIGS.iterdir() if p.name.endswith(".json")}
    assert shipped == set(PUBLISHED)
    sources = CONFIGS.joinpath("SOURCES.md").read_text()
    rows = set(re.findall(r"^\| `([^`]+)\.json` \|", sources, re.MULTILINE))
    assert rows == shipped


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_published_total(name: str) -> None:
    pub = PUBLISHED[name]
    arch = architecture_from_config(_config(name), name)
    assert arch.family == pub.family
    assert len(arch.moe_layers) == pub.moe_layers
    assert {(m.num_experts, m.top_k) for m in arch.moe_layers} == {(pub.experts, pub.top_k)}
    rel = (arch.num_parameters - pub.total) / pub.total
    assert abs(rel) <= pub.tolerance, f"{name}: {arch.num_parameters / 1e9:.3f}B vs {pub.total / 1e9:g}B ({rel:+.2%})"
    if pub.tolerance > 0.005:  # the documented exception stays one: recheck it if the figure or the count moves
        assert pub.why and abs(rel) > 0.005


def test_deepseek_v2_reference_and_transformers_formats_build_the_same_model() -> None:
    """V2 is told apart from V3 in both formats (softmax routing over 8 groups, 3 chosen; no score bias)."""
    ref = architecture_from_config(_config("deepseek-v2-236b-reference"), "reference")
    hf = architecture_from_config(_config("deepseek-coder-v2-instruct"), "hf")
    assert ref.shape_hash() == hf.shape_hash() and ref.num_parameters == hf.num_parameters
    for arch in (ref, hf):
        assert (arch.family, arch.expert_groups, arch.topk_groups, arch.shared_experts) == ("deepseek_v2", 8, 3, 2)
        assert arch.extra["score_func"] == "softmax"
        assert not any(b.name.endswith("e_score_correction_bias") for b in arch.blocks)
        assert any(b.projection == "q_a_proj" for b in arch.blocks)  # V2 (236B) has a query LoRA, V2-Lite not


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) - set(SAME_ARCHITECTURE)))
def test_config_alone_plans_at_40_percent_of_bf16(name: str) -> None:
    profile = build_prior_profile(_config(name), name, formats=FORMATS, source=f"config {name}.json", where=name)
    arch = profile.architecture
    assert profile.experts.measurement.prior and profile.sensitivity.measurement.prior
    assert profile.formats == FORMATS
    bf16 = 2 * arch.num_parameters
    budget = Budget(int(BUDGET_FRACTION * bf16), {})
    plan = optimize(profile, budget, None, SolveOptions(time_limit=60))
    assert plan.solve.status == SolveStatus.OPTIMAL, plan.solve.message
    assert plan.bytes.total <= budget.available
    assert plan.bytes.total >= 0.95 * budget.available  # the budget binds: a prior that never quantized would not
    assert plan.family == arch.family and plan.architecture_hash == arch.shape_hash()


def test_example_command_on_a_shipped_config(tmp_path, capsys) -> None:
    """The command a user runs before downloading: ``python -m optimizer example --config CONFIG -o ...``."""
    out = tmp_path / "profile.json"
    config = CONFIGS.joinpath("mixtral-8x7b-v0.1.json")
    assert main(["example", "--config", str(config), "-o", str(out)]) == 0
    assert "mixtral, 46.70B parameters, 32 MoE layers" in capsys.readouterr().out
    profile = load_profile(out)
    assert profile.architecture.num_parameters == architecture_from_config(_config("mixtral-8x7b-v0.1")).num_parameters
    assert profile.experts.measurement.prior
