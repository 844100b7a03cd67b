"""The profile.json / plan.json contracts: round trips, the JSON Schemas, and one-line errors naming the field."""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import pytest

from optimizer.errors import InputError
from optimizer.formats import GGUF_NAMES, get_format
from optimizer.jsonio import canonical_hash
from optimizer.plan import (
    LayerPlan,
    Plan,
    PlanBytes,
    SolveRecord,
    SolveStatus,
    Target,
    load_plan,
    plan_from_json,
    plan_to_json,
    save_plan,
)
from optimizer.profile import load_profile, profile_from_json, profile_to_json, save_profile
from optimizer.schema_check import load_schema, schema_errors, validate_with_schema
from optimizer.synthetic import synthetic_profile

ROOT = Path(__file__).resolve().parents[2]

# 3 layers, the first dense: two MoE layers (1 and 2) of 4 experts, top-2.
SMALL = dict(num_layers=3, num_experts=4, hidden=32, expert_inter=32, dense_inter=64, vocab=64)
FORMATS = ("int4_g32", "Q8_0", "BF16", "Q4_K")  # Q4_K (256-element blocks) cannot store rows of 32 or 64


@pytest.fixture(scope="module")
def profile_doc() -> dict:
    return profile_to_json(synthetic_profile(seed=3, formats=FORMATS, **SMALL))


@pytest.fixture()
def doc(profile_doc) -> dict:
    return copy.deepcopy(profile_doc)


def make_plan() -> Plan:
    return Plan(
        model_name="synthetic-3", family="synthetic", architecture_hash="sha256:" + "ab" * 32, target=Target.HF,
        layers=(LayerPlan(1, (0, 2, 3), 2), LayerPlan(2, (1, 3), 1)),
        formats={
            "model.embed_tokens.weight": "Q8_0",
            "model.layers.1.mlp.experts.0.down_proj.weight": "int4_g32",
            "model.layers.1.input_layernorm.weight": "F32",
            "lm_head.weight": "BF16",
        },
        bytes=PlanBytes(total=123456, by_kind={"embedding": 2176, "routed_expert": 1000}, budget=10**6,
                        reserves={"kv_cache": 4096, "overhead": 512}),
        solve=SolveRecord(solver="highs", formulation="predicted_loss", status=SolveStatus.OPTIMAL, objective=0.0123,
                          bound=0.0122, gap=0.0081300813, seconds=1.2345, profile_hash="sha256:" + "cd" * 32,
                          options={"mip_rel_gap": 0.01, "time_limit": 60}, message="ok"),
        predicted={"loss_increase": 0.0123, "tokens_per_s": 41.5},
    )


@pytest.fixture()
def plan_doc() -> dict:
    return plan_to_json(make_plan())


def write(tmp_path: Path, doc: dict, name: str = "doc.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def block_index(doc: dict, name_part: str) -> int:
    return next(i for i, b in enumerate(doc["architecture"]["blocks"]) if name_part in b["name"])


# ------------------------------------------------------------------------------------------- round trips
def test_profile_round_trip(tmp_path, profile_doc):
    path = tmp_path / "profile.json"
    digest = save_profile(profile_from_json(profile_doc), path)
    loaded = load_profile(path)
    assert profile_to_json(loaded) == profile_doc
    assert loaded.hash == digest == canonical_hash(profile_doc)
    assert loaded.sensitivity.values.shape == (len(loaded.architecture.blocks), len(FORMATS))
    assert [len(f) for f in loaded.experts.frequency] == [4, 4]


def test_profile_gzip_round_trip(tmp_path, profile_doc):
    plain, packed = tmp_path / "p.json", tmp_path / "p.json.gz"
    profile = profile_from_json(profile_doc)
    assert save_profile(profile, packed) == save_profile(profile, plain)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(packed.read_bytes())) == profile_doc
    loaded = load_profile(packed)
    assert profile_to_json(loaded) == profile_doc
    assert loaded.hash == load_profile(plain).hash  # the hash is of the document, not of the bytes on disk


def test_profile_hash_is_canonical_json(profile_doc):
    text = json.dumps(profile_doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    import hashlib
    assert canonical_hash(profile_doc) == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    shuffled = dict(reversed(list(profile_doc.items())))
    assert canonical_hash(shuffled) == canonical_hash(profile_doc)


def test_plan_round_trip(tmp_path, plan_doc):
    plan = make_plan()
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    loaded = load_plan(path)
    assert plan_to_json(loaded) == plan_doc
    assert loaded.layers == plan.layers and loaded.layer(2).kept_experts == (1, 3)
    assert loaded.bytes.available == 10**6 - 4096 - 512 == plan_doc["bytes"]["available"]
    assert loaded.solve.status is SolveStatus.OPTIMAL and loaded.solve.status.has_plan


def test_plan_without_solution_round_trips(plan_doc):
    plan_doc["solve"].update(status="no_solution", objective=None, bound=None, gap=None, seconds=None)
    del plan_doc["predicted"]
    loaded = plan_from_json(copy.deepcopy(plan_doc))
    assert loaded.solve.objective is None and not loaded.solve.status.has_plan
    validate_with_schema(plan_doc, "plan")


# --------------------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("which", ["profile", "plan"])
def test_schema_files_are_valid_draft_2020_12(which):
    from jsonschema import Draft202012Validator

    schema = load_schema(which)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema"] == {"const": f"moecc.{which}"}


def test_schema_accepts_what_the_loaders_write(profile_doc, plan_doc):
    assert schema_errors(profile_doc, "profile") == []
    assert schema_errors(plan_doc, "plan") == []
    validate_with_schema(profile_to_json(synthetic_profile(seed=1)), "profile")  # default synthetic, real K-quants


def test_schema_accepts_optional_fields_absent_or_null(doc):
    for key in ("saliency", "prune_cost", "prune_cost_measurement"):
        del doc["experts"][key]
    del doc["architecture"]["expert_groups"], doc["architecture"]["expert_projections"]
    doc["model"]["source"] = None
    doc["device"]["format_throughput"] = {"q8_0": 1e11, "INT4_G32": 5e10}
    doc["experts"]["measurement"].update(tokens=1000, source="wikitext-2", prior=None)
    assert schema_errors(doc, "profile") == []
    profile_from_json(doc)


def _format_name_ok(name: str) -> bool:
    try:
        get_format(name)
        return True
    except InputError:
        return False


def test_schema_format_pattern_matches_the_catalog_exactly():
    """The hand-written regex in both schemas accepts exactly the names get_format accepts."""
    patterns = {load_schema("profile")["$defs"]["format_pattern"]["pattern"],
                load_schema("plan")["$defs"]["format_name"]["pattern"]}
    assert len(patterns) == 1
    rx = re.compile(patterns.pop())
    names = [n for g in GGUF_NAMES for n in (g, g.lower(), g.swapcase(), g + "X", g[:-1])]
    names += ["Q4_1", "Q7_K", "IQ3_XS", "IQ3_M", "IQ4_S", "F8", "BF32", "", "int", "int1_g32", "int9_g32", "INT4_G128"]
    names += [f"int{b}_g{z}{g}" for b in (1, 2, 4, 8, 9) for g in range(0, 1300) for z in ("", "0")]
    names += [f"int4_g{g}" for g in range(1000, 20000, 4)]
    wrong = [n for n in names if bool(rx.search(n)) != _format_name_ok(n)]
    assert wrong == []


# --------------------------------------------------------------------------------------------- bad inputs
def _set(path):
    """A mutation setting the value at ``path`` (a tuple of keys/indices); the last element is the value."""
    def mutate(d):
        *keys, last, value = path
        for k in keys:
            d = d[k]
        d[last] = value
    return mutate


def _delete(*keys):
    def mutate(d):
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return mutate


def _dup_block_name(d):
    d["architecture"]["blocks"][3]["name"] = d["architecture"]["blocks"][2]["name"]


def _short_layer_row(d):
    d["experts"]["frequency"][1] = d["experts"]["frequency"][1][:-1]


def _drop_sensitivity_row(d):
    d["sensitivity"]["values"].pop()


# (id, mutation, text the loader's message must contain, does the schema reject it too)
PROFILE_CASES = [
    ("missing_top", _delete("device"), "profile.device: missing required field", True),
    ("missing_nested", _delete("architecture", "hidden_size"),
     "profile.architecture.hidden_size: missing required field", True),
    ("missing_measurement", _delete("topk_cost", "measurement"),
     "profile.topk_cost.measurement: missing required field", True),
    ("unknown_top", _set(("extra", 1)), "profile.extra: unknown field", True),
    ("unknown_nested", _set(("experts", "measurement", "note", "x")),
     "profile.experts.measurement.note: unknown field", True),
    ("unknown_in_block", _set(("architecture", "blocks", 0, "dtype", "bf16")),
     "profile.architecture.blocks[0].dtype: unknown field", True),
    ("negative_frequency", _set(("experts", "frequency", 0, 1, -0.25)),
     "profile.experts.frequency[0][1]: must be >= 0", True),
    ("string_number", _set(("experts", "mean_score", 1, 0, "0.5")),
     "profile.experts.mean_score[1][0]: expected a number", True),
    ("bool_int", _set(("architecture", "num_layers", True)),
     "profile.architecture.num_layers: expected an integer", True),
    ("zero_bandwidth", _set(("device", "memory_bandwidth_bytes_per_s", 0)),
     "profile.device.memory_bandwidth_bytes_per_s: must be > 0", True),
    ("bad_kv_kind", _set(("architecture", "kv_cache", "kind", "paged")),
     "profile.architecture.kv_cache.kind: 'paged' is not one of", True),
    ("bad_block_kind", _set(("architecture", "blocks", 0, "kind", "conv")),
     "profile.architecture.blocks[0].kind: 'conv' is not one of", True),
    ("shape_4d", _set(("architecture", "blocks", 0, "shape", [1, 2, 3, 4])),
     "profile.architecture.blocks[0].shape", True),
    ("unknown_format", _set(("formats", 1, "Q9_K")), "profile.formats[1]: unknown format 'Q9_K'", True),
    ("duplicate_format", _set(("formats", 1, "int4_g32")), "profile.formats: duplicate format names", True),
    ("empty_formats", _set(("formats", [])), "profile.formats: needs at least one format", True),
    ("wrong_schema", _set(("schema", "moecc.plan")), "profile.schema: expected 'moecc.profile'", True),
    ("newer_version", _set(("version", 2)),
     "profile.version: 2 is newer than this moecc understands (1); upgrade moecc", True),
    ("version_zero", _set(("version", 0)), "profile.version: expected a positive integer", True),
    ("routed_without_expert", _delete("architecture", "blocks", 20, "expert"),
     "profile.architecture.blocks[20]: a routed_expert block needs", True),
    ("prune_cost_unmeasured", _delete("experts", "prune_cost_measurement"),
     "profile.experts.prune_cost_measurement: required", True),
    # Beyond JSON Schema: lengths aligned across fields, uniqueness by a member, comparisons of two fields.
    ("short_layer_row", _short_layer_row, "profile.experts.frequency[1]: expected 4 values, got 3", False),
    ("missing_layer_row", _delete("topk_cost", "values", 1), "profile.topk_cost.values: expected 2 rows, got 1", False),
    ("sensitivity_rows", _drop_sensitivity_row, "profile.sensitivity.values: expected one row per block", False),
    ("sensitivity_columns", _set(("sensitivity", "values", 0, [0.1])),
     "profile.sensitivity.values[0]: expected 4 values, got 1", False),
    ("duplicate_block", _dup_block_name, "profile.architecture.blocks[3].name: duplicate block", False),
    ("topk_gt_experts", _set(("architecture", "moe_layers", 0, "top_k", 5)),
     "profile.architecture.moe_layers[0].top_k: 5 > num_experts 4", False),
    ("layer_out_of_range", _set(("architecture", "moe_layers", 1, "layer", 3)),
     "profile.architecture.moe_layers[1].layer: 3 >= num_layers 3", False),
    ("missing_candidate_sensitivity", _set(("sensitivity", "formats", 0, "int8_g32")),
     "profile.sensitivity.formats: no sensitivity for candidate format int4_g32", False),
]


@pytest.mark.parametrize("mutate, expected, schema_too", [c[1:] for c in PROFILE_CASES],
                         ids=[c[0] for c in PROFILE_CASES])
def test_bad_profile(tmp_path, doc, mutate, expected, schema_too):
    mutate(doc)
    with pytest.raises(InputError) as info:
        load_profile(write(tmp_path, doc))
    message = str(info.value)
    assert expected in message and "\n" not in message
    errors = schema_errors(doc, "profile")
    if schema_too:
        assert errors, "the schema should reject this too"
        field = message.split(":")[0].split("[")[0]  # the loader's field, without indices
        assert errors[0].startswith(field), (errors[0], message)
        with pytest.raises(InputError, match=re.escape(errors[0])):
            validate_with_schema(doc, "profile")
    else:
        assert errors == []


def test_profile_routed_expert_block_index(doc):
    # PROFILE_CASES deletes blocks[20].expert: make sure that is a routed expert of this architecture.
    assert doc["architecture"]["blocks"][20]["kind"] == "routed_expert"


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": "moecc.profile", "version": 1,\n "model": {"name": "x",}}')
    with pytest.raises(InputError, match=r"broken\.json: malformed JSON at line 2 column"):
        load_profile(path)
    with pytest.raises(InputError, match="no such file"):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(InputError, match="expected a JSON object"):
        load_profile(write(tmp_path, [1, 2]))  # type: ignore[arg-type]


def test_nan_literal_is_refused(tmp_path, doc):
    path = write(tmp_path, doc)
    path.write_text(path.read_text().replace("0.0]", "NaN]", 1))
    with pytest.raises(InputError, match="NaN"):
        load_profile(path)
    doc["experts"]["frequency"][0][2] = float("nan")  # a document built in Python
    with pytest.raises(InputError, match=r"profile\.experts\.frequency\[0\]\[2\]: must be finite"):
        validate_with_schema(doc, "profile")
    with pytest.raises(InputError, match=r"profile\.experts\.frequency\[0\]\[2\]: must be finite"):
        profile_from_json(doc)


def test_nan_literal_message_names_the_field(tmp_path, doc):
    path = write(tmp_path, doc)
    path.write_text(json.dumps(doc).replace('"device": {"memory_bandwidth_bytes_per_s": 50000000000.0',
                                            '"device": {"memory_bandwidth_bytes_per_s": NaN'))
    with pytest.raises(InputError, match=r"memory_bandwidth_bytes_per_s"):
        load_profile(path)


def test_gzip_corrupt(tmp_path, profile_doc):
    path = tmp_path / "p.json.gz"
    save_profile(profile_from_json(profile_doc), path)
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(8))  # wrong CRC and length
    with pytest.raises(InputError, match=r"p\.json\.gz: broken gzip stream"):
        load_profile(path)


def test_gzip_truncated(tmp_path, profile_doc):
    path = tmp_path / "p.json.gz"
    save_profile(profile_from_json(profile_doc), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match="broken gzip stream"):
        load_profile(path)


# plan: (id, mutation, loader message, schema rejects too)
def _unsorted_kept(d):
    d["layers"][0]["kept_experts"] = [2, 0, 3]


PLAN_CASES = [
    ("missing_field", _delete("solve", "profile_hash"), "plan.solve.profile_hash: missing required field", True),
    ("missing_bytes", _delete("bytes", "budget"), "plan.bytes.budget: missing required field", True),
    # found by the slow fuzz run: `explain` divided by a zero budget
    ("zero_budget", _set(("bytes", "budget", 0)), "plan.bytes.budget: must be >= 1, got 0", True),
    ("unknown_top", _set(("comment", "x")), "plan.comment: unknown field", True),
    ("unknown_nested", _set(("layers", 1, "weights", 1)), "plan.layers[1].weights: unknown field", True),
    ("bad_target", _set(("target", "onnx")), "plan.target: 'onnx' is not one of hf, llamacpp", True),
    ("bad_status", _set(("solve", "status", "done")), "plan.solve.status: 'done' is not one of", True),
    ("bad_format", _set(("formats", "lm_head.weight", "Q3_X")),
     "plan.formats.lm_head.weight: unknown format 'Q3_X'", True),
    ("negative_bytes", _set(("bytes", "by_kind", "embedding", -1)), "plan.bytes.by_kind.embedding: must be >= 0", True),
    ("float_bytes", _set(("bytes", "total", 1.5)), "plan.bytes.total: expected an integer", True),
    ("negative_gap", _set(("solve", "gap", -0.1)), "plan.solve.gap: must be >= 0", True),
    ("topk_zero", _set(("layers", 0, "top_k", 0)), "plan.layers[0].top_k: must be >= 1", True),
    ("duplicate_kept", _set(("layers", 0, "kept_experts", [0, 0, 3])),
     "plan.layers[0].kept_experts: must be sorted and without duplicates", True),
    ("newer_version", _set(("version", 7)),
     "plan.version: 7 is newer than this moecc understands (1); upgrade moecc", True),
    ("wrong_schema", _set(("schema", "moecc.profile")), "plan.schema: expected 'moecc.plan'", True),
    ("topk_gt_kept", _set(("layers", 1, "top_k", 3)), "plan.layers[1].top_k: 3 > 2 kept experts", False),
    ("unsorted_kept", _unsorted_kept, "plan.layers[0].kept_experts: must be sorted", False),
]


@pytest.mark.parametrize("mutate, expected, schema_too", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_bad_plan(tmp_path, plan_doc, mutate, expected, schema_too):
    mutate(plan_doc)
    with pytest.raises(InputError) as info:
        load_plan(write(tmp_path, plan_doc))
    message = str(info.value)
    assert expected in message and "\n" not in message
    errors = schema_errors(plan_doc, "plan")
    if schema_too:
        assert errors, "the schema should reject this too"
        assert errors[0].startswith(message.split(": ")[0].split("[")[0]), (errors[0], message)
    else:
        assert errors == []


def test_schema_check_errors_are_one_sorted_line(doc):
    doc["zzz"] = 1
    doc["experts"]["frequency"][0][0] = -1
    del doc["architecture"]["family"]
    errors = schema_errors(doc, "profile")
    assert len(errors) == 3 and errors == schema_errors(copy.deepcopy(doc), "profile")
    assert errors[0] == "profile.architecture.family: missing required field"
    assert errors[-1] == "profile.zzz: unknown field"
    with pytest.raises(InputError) as info:
        validate_with_schema(doc, "profile")
    assert str(info.value) == errors[0]
    with pytest.raises(InputError, match="unknown contract"):
        validate_with_schema(doc, "profiles")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- docs stay in sync
def _property_names(schema) -> set[str]:
    out: set[str] = set()
    if isinstance(schema, dict):
        out |= set(schema.get("properties", {}))
        for value in schema.values():
            out |= _property_names(value)
    elif isinstance(schema, list):
        for value in schema:
            out |= _property_names(value)
    return out


@pytest.mark.parametrize("which", ["profile", "plan"])
def test_docs_mention_every_field(which):
    text = (ROOT / "docs" / f"{which}.md").read_text()
    missing = sorted(name for name in _property_names(load_schema(which)) if f"`{name}`" not in text)
    assert missing == []


# ------------------------------------------------------------------ loader bugs found (fixes in the report)
@pytest.mark.parametrize("path", [("model",), ("model", "name"), ("architecture", "num_layers")])
def test_required_null_is_an_input_error(doc, path):
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = None
    with pytest.raises(InputError, match=re.escape("profile." + ".".join(path))):
        profile_from_json(doc)


def test_format_throughput_key_error_names_the_field(doc):
    doc["device"]["format_throughput"] = {"Q9_K": 1.0}
    with pytest.raises(InputError, match=r"profile\.device\.format_throughput\.Q9_K"):
        profile_from_json(doc)


@pytest.mark.parametrize("value", [[], [1, 2, 3], ["gate_proj", "gate_proj", "up_proj", "down_proj"]])
def test_expert_projections_are_checked(doc, value):
    doc["architecture"]["expert_projections"] = value
    with pytest.raises(InputError, match=r"profile\.architecture\.expert_projections"):
        profile_from_json(doc)


def test_quantizable_norm_survives_a_round_trip(doc):
    i = block_index(doc, "input_layernorm")
    block = doc["architecture"]["blocks"][i]
    block["quantizable"] = True
    del block["fixed_format"]
    doc["sensitivity"]["values"][i] = [0.1, 0.1, 0.0, None]
    profile = profile_from_json(doc)
    assert profile.architecture.blocks[i].quantizable
    assert profile_from_json(profile_to_json(profile)).architecture.blocks[i].quantizable


@pytest.mark.parametrize("case", ["duplicate_layer", "options_not_object"])
def test_plan_loader_gaps(plan_doc, case):
    if case == "duplicate_layer":
        plan_doc["layers"][1]["layer"] = 1
    else:
        plan_doc["solve"]["options"] = 5
    with pytest.raises(InputError):
        plan_from_json(plan_doc)
