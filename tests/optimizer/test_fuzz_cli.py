"""Property-based fuzzing of the CLIs: mutated profiles, plans and flags never end in a traceback.

Every case runs a real command in-process (``optimizer.cli.main``, ``runtime.__main__.main``) on a small
synthetic profile, its plan, or a tiny random checkpoint, mutated by hypothesis. The property: the command
returns 0 and writes a loadable output, or returns 2 (1 for the documented "no plan within the time limit")
with exactly one ``error: ...`` line on stderr and no output written; an exception escaping ``main`` fails the
test. 200 cases run in the default suite; ``pytest -m slow tests/optimizer/test_fuzz_cli.py`` runs 5,000.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer import cli as optimizer_cli
from optimizer.plan import load_plan, plan_to_json
from optimizer.profile import profile_to_json
from optimizer.synthetic import synthetic_profile

BUDGET = "300KB"  # the small synthetic profile below: pruning and low-bit formats both bind
SMALL = dict(num_layers=3, num_experts=4, top_k=2, hidden=64, expert_inter=64, dense_inter=128, vocab=128)
FUZZ = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
FUZZ_SLOW = settings(max_examples=1700, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic profile and a plan solved from it, as JSON documents."""
    d = tmp_path_factory.mktemp("fuzz")
    profile = synthetic_profile(seed=3, **SMALL)
    (d / "profile.json").write_text(json.dumps(profile_to_json(profile)))
    rc, _, err = run_optimizer(["solve", str(d / "profile.json"), "--budget", BUDGET, "--context", "0",
                                "--overhead", "0", "--reproducible", "-o", str(d / "plan.json")])
    assert rc == 0, err
    return {"profile": json.loads((d / "profile.json").read_text()), "plan": json.loads((d / "plan.json").read_text())}


def run_optimizer(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = optimizer_cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_outcome(rc: int, err: str, output: Path, load: Callable[[Path], Any]) -> None:
    """The property every case must satisfy (see the module docstring)."""
    if rc == 0:
        load(output)  # what was written reads back
        return
    assert rc in (1, 2), (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error: ", "solver error: ")), err
    if rc == 1:
        assert "time limit" in lines[0], err
    assert not output.exists(), "nothing may be written on failure"


# ------------------------------------------------------------------------------------------ mutations
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=3),
    st.sampled_from([10 ** 30, -(10 ** 30), 2 ** 63, 1e308, -1e308, 1e-320, 0.5, -0.5, math.pi]),
    st.sampled_from(["", "x", "Q4_K", "int4_g32", "BF16", "F32", "routed_expert", "NaN", "Infinity", "1e400"]),
    st.just([]), st.just({}), st.just([[[[[]]]]]),
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into ``doc``, long lists sampled at their ends."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        idx = range(len(doc)) if len(doc) <= 4 else [0, 1, len(doc) - 1]
        for i in idx:
            out += _paths(doc[i], prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> tuple[str, Any]:
    """``doc`` with one mutation at a random path; returns (description, new document)."""
    doc = json.loads(json.dumps(doc))
    paths = _paths(doc)
    path = paths[draw(st.integers(0, len(paths) - 1))]
    kind = draw(st.sampled_from(["replace", "delete", "unknown_key", "scale", "truncate", "duplicate", "negate"]))
    parent, key = (_get(doc, path[:-1]), path[-1]) if path else (None, None)
    node = _get(doc, path)
    if kind == "replace" and parent is not None:
        parent[key] = draw(_VALUES)
    elif kind == "delete" and parent is not None:
        del parent[key]
    elif kind == "unknown_key" and isinstance(node, dict):
        node["surprise"] = draw(_VALUES)
    elif kind in ("scale", "negate") and parent is not None and isinstance(node, (int, float)) \
            and not isinstance(node, bool):
        parent[key] = -node if kind == "negate" else node * draw(st.sampled_from([0, 2, 1000, 10 ** 12]))
    elif kind == "truncate" and isinstance(node, list) and node:
        del node[draw(st.integers(0, len(node) - 1)):]
    elif kind == "duplicate" and isinstance(node, list) and node:
        node.append(node[0])
    elif parent is not None:
        parent[key] = draw(_VALUES)
    return f"{kind} at {'.'.join(map(str, path)) or '(top)'}", doc


# ----------------------------------------------------------------------------------------------- cases
def _solve_case(base: dict, data: st.DataObject) -> None:
    what, doc = data.draw(mutated(base["profile"]), label="profile mutation")
    with tempfile.TemporaryDirectory() as tmp:
        profile, plan = Path(tmp) / "profile.json", Path(tmp) / "plan.json"
        profile.write_text(json.dumps(doc))
        rc, _, err = run_optimizer(["solve", str(profile), "--budget", BUDGET, "--context", "0", "--overhead", "0",
                                    "--time-limit", "20", "-o", str(plan)])
        check_outcome(rc, err, plan, load_plan)


def _explain_and_apply_case(base: dict, data: st.DataObject, model: Path) -> None:
    from runtime.__main__ import main as runtime_main

    what, doc = data.draw(mutated(base["plan"]), label="plan mutation")
    with tempfile.TemporaryDirectory() as tmp:
        plan, out = Path(tmp) / "plan.json", Path(tmp) / "out"
        plan.write_text(json.dumps(doc))
        rc, _, err = run_optimizer(["explain", str(plan)])
        assert rc in (0, 2), err
        if rc == 2:
            assert len(err.strip().splitlines()) == 1, err
        buf_out, buf_err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            rc = runtime_main(["apply", str(plan), "--model", str(model), "-o", str(out), "--quiet"])
        check_outcome(rc, buf_err.getvalue(), out, lambda p: (p / "moecc_output.json").is_file() or 1 / 0)


_FLAGS: dict[str, st.SearchStrategy] = {
    "--budget": st.sampled_from(["300KB", "1e400GB", "0", "-5MB", "1e-9", "inf", "nan", "12 parsecs", "0.3MiB",
                                 "1TiB", "100B"]),
    "--context": st.sampled_from(["0", "-1", "100000000000", "x", "3.5"]),
    "--overhead": st.sampled_from(["0", "1e400GB", "1KiB", "-1", "inf"]),
    "--gap": st.sampled_from(["1e-4", "inf", "nan", "0", "-1", "1", "1e308"]),
    "--time-limit": st.sampled_from(["20", "inf", "nan", "0", "-3", "1e308"]),
    "--expert-weight": st.sampled_from(["1", "1e308", "inf", "nan", "-1", "0"]),
    "--min-experts": st.sampled_from(["0", "0.5", "2", "4", "5", "-1", "inf", "nan"]),
    "--min-top-k": st.sampled_from(["1", "2", "3", "0", "-1", "99"]),
    "--min-tokens-per-s": st.sampled_from(["1", "1e308", "inf", "nan", "-1", "0"]),
    "--importance-alpha": st.sampled_from(["0.5", "0", "1", "2", "-1", "nan", "inf"]),
    "--retain-ratio": st.sampled_from(["0.75", "0", "1", "2", "nan"]),
    "--threads": st.sampled_from(["1", "0", "-1", "1000000"]),
    "--formats": st.sampled_from(["Q4_K,BF16", "nope", ",", "Q4_K,Q4_K", "F32", ""]),
    "--solver": st.sampled_from(["highs", "cbc", "cpsat", "uniform", "greedy", "sequential", "magic"]),
    "--formulation": st.sampled_from(["importance", "routing_mass", "saliency", "predicted_loss", "x"]),
    "--target": st.sampled_from(["hf", "llamacpp"]),
}


def _flags_case(base_dir: Path, data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(sorted(_FLAGS)), min_size=1, max_size=4, unique=True), label="flags")
    argv = ["solve", str(base_dir / "profile.json"), "--context", "0", "--overhead", "0", "--budget", BUDGET]
    for name in names:
        argv += [name, data.draw(_FLAGS[name], label=name)]
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.json"
        try:
            rc, _, err = run_optimizer(argv + ["-o", str(plan)])
        except SystemExit as exc:  # argparse's own usage error: exit 2 with a usage line
            assert exc.code == 2
            return
        check_outcome(rc, err, plan, load_plan)


@pytest.fixture(scope="module")
def base_dir(base: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz_flags")
    (d / "profile.json").write_text(json.dumps(base["profile"]))
    return d


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.tiny_models import make_tiny_model

    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_plan(tiny_model: Path) -> dict:
    from runtime.testing import made_up_plan

    return {"plan": plan_to_json(made_up_plan(tiny_model))}


def test_fuzz_profiles(base: dict) -> None:
    given(data=st.data())(FUZZ(lambda data: _solve_case(base, data)))()


def test_fuzz_plans(tiny_plan: dict, tiny_model: Path) -> None:
    given(data=st.data())(FUZZ(lambda data: _explain_and_apply_case(tiny_plan, data, tiny_model)))()


def test_fuzz_flags(base_dir: Path) -> None:
    given(data=st.data())(settings(FUZZ, max_examples=60)(lambda data: _flags_case(base_dir, data)))()


@pytest.mark.slow
def test_fuzz_profiles_long(base: dict) -> None:
    given(data=st.data())(FUZZ_SLOW(lambda data: _solve_case(base, data)))()


@pytest.mark.slow
def test_fuzz_plans_long(tiny_plan: dict, tiny_model: Path) -> None:
    given(data=st.data())(FUZZ_SLOW(lambda data: _explain_and_apply_case(tiny_plan, data, tiny_model)))()


@pytest.mark.slow
def test_fuzz_flags_long(base_dir: Path) -> None:
    given(data=st.data())(settings(FUZZ_SLOW, max_examples=1600)(lambda data: _flags_case(base_dir, data)))()
