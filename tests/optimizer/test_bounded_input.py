"""Bounded input: every file and flag that comes into ``python -m optimizer`` and ``python -m profiling``.

Each bad input ends in exit code 2 with one line ``error: ...`` on stderr naming the flag or field, no
traceback, nothing written, and before any heavy work (flags are refused even when the profile they would
apply to does not exist). Files go through :func:`optimizer.jsonio.read_json`: regular files only, a size
cap on the raw and the gunzipped bytes (a bomb is abandoned one byte past the cap), a nesting cap counted
without recursion, numbers finite and within int64; contracts and configs bound every shape and count.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import resource
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from optimizer import jsonio
from optimizer.architectures import architecture_from_config, load_architecture
from optimizer.budget import MAX_BYTES, parse_bytes
from optimizer.cli import main
from optimizer.errors import InputError
from optimizer.model_spec import MAX_DIM
from optimizer.plan import load_plan, plan_to_json, save_plan
from optimizer.profile import MAX_COST_NATS, load_profile, profile_to_json, save_profile
from optimizer.synthetic import synthetic_profile
from profiling.cli import main as profiling_main

ROOT = Path(__file__).resolve().parents[2]
ARCH = {"num_layers": 3, "num_experts": 8, "top_k": 2, "hidden": 256, "expert_inter": 256, "dense_inter": 256,
        "vocab": 256}
NO_RESERVES = ["--context", "0", "--overhead", "0"]
FEASIBLE = "0.002GiB"  # 2,147,484 bytes: between the smallest (632,832) and the largest plan (9,329,664)
MIXTRAL = {
    "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 128,
}


@pytest.fixture(scope="module")
def profile_doc() -> dict:
    return profile_to_json(synthetic_profile(seed=9, **ARCH))


@pytest.fixture()
def doc(profile_doc) -> dict:
    return copy.deepcopy(profile_doc)


@pytest.fixture()
def profile_path(tmp_path, profile_doc) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_doc))
    return path


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused(capsys, argv: list[str], out: Path, *needles: str, cli=main) -> str:
    assert cli(argv) == 2
    line = one_line_error(capsys, *needles)
    assert not out.exists() or out.is_fifo()
    return line


def names_flag(line: str, flag: str) -> None:
    """The message leads with the flag (argparse's own errors say ``argument --flag``)."""
    assert line.startswith((f"error: {flag}: ", f"error: argument {flag}: ")), line


def solve(path: Path, out: Path, *extra: str, budget: str = FEASIBLE) -> list[str]:
    return ["solve", str(path), "-o", str(out), "--budget", budget, *NO_RESERVES, "--time-limit", "30", *extra]


# ------------------------------------------------------------------------------------ solve: flags
BAD_FLAGS = [
    (["--budget", "1e400GB"], "--budget"),
    (["--overhead", "1e400GB"], "--overhead"),
    (["--budget", f"{MAX_BYTES + 1}B"], "--budget"),
    (["--budget", "0.4B"], "--budget"),
    (["--gap", "inf"], "--gap"),
    (["--gap", "nan"], "--gap"),
    (["--gap", "2"], "--gap"),
    (["--time-limit", "inf"], "--time-limit"),
    (["--time-limit", "-1"], "--time-limit"),
    (["--expert-weight", "1e308"], "--expert-weight"),
    (["--expert-weight", str(MAX_COST_NATS * 2)], "--expert-weight"),
    (["--expert-weight", "nan"], "--expert-weight"),
    (["--expert-weight", "-1"], "--expert-weight"),
    (["--context", "-1"], "--context"),
    (["--context", str(2**31)], "--context"),
    (["--context", "lots"], "--context"),
    (["--min-experts", "inf"], "--min-experts"),
    (["--min-experts", "nan"], "--min-experts"),
    (["--min-experts", "-1"], "--min-experts"),
    (["--min-top-k", "0"], "--min-top-k"),
    (["--min-top-k", str(2**40)], "--min-top-k"),
    (["--min-tokens-per-s", "inf"], "--min-tokens-per-s"),
    (["--min-tokens-per-s", "nan"], "--min-tokens-per-s"),
    (["--min-tokens-per-s", "0"], "--min-tokens-per-s"),
    (["--importance-alpha", "nan"], "--importance-alpha"),
    (["--importance-alpha", "-0.5"], "--importance-alpha"),
    (["--retain-ratio", "nan"], "--retain-ratio"),
    (["--retain-ratio", "0"], "--retain-ratio"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**31)], "--seed"),
    (["--formats", ",,"], "--formats"),
    (["--formats", "Q4_K,Q9_X"], "--formats"),
    (["--formats", "Q4_K,int4_g" + "8" * 5000], "--formats"),
]


@pytest.mark.parametrize("extra,flag", BAD_FLAGS, ids=[" ".join(f)[:40] for f, _ in BAD_FLAGS])
def test_bad_flag_is_refused_before_the_profile_is_read(tmp_path, capsys, extra, flag) -> None:
    out = tmp_path / "plan.json"
    names_flag(refused(capsys, solve(tmp_path / "absent.json", out, *extra), out, flag), flag)


@pytest.mark.parametrize("extra,flag", [(["--expert-weight", "1e308"], "--expert-weight"), (["--gap", "inf"], "--gap"),
                                        (["--time-limit", "inf"], "--time-limit"),
                                        (["--threads", "100000"], "--threads")])  # HiGHS aborted the process
def test_bad_flag_with_a_real_profile(tmp_path, profile_path, capsys, extra, flag) -> None:
    out = tmp_path / "plan.json"
    names_flag(refused(capsys, solve(profile_path, out, *extra), out, flag), flag)


def test_budget_leaving_nothing_for_weights(tmp_path, profile_doc, profile_path, capsys) -> None:
    out = tmp_path / "plan.json"
    kv = synthetic_profile(seed=9, **ARCH).architecture.kv_cache.bytes_for(16)
    argv = ["solve", str(profile_path), "-o", str(out), "--context", "16", "--overhead", "1KB"]
    refused(capsys, [*argv, "--budget", f"{kv + 1000}B"], out, "--budget", "leaves nothing for weights")
    refused(capsys, [*argv, "--budget", "1KB"], out, "--budget", "leaves nothing for weights")


def test_gib_is_binary_and_gb_decimal(tmp_path, profile_path, capsys) -> None:
    assert parse_bytes("120GiB") == 120 * 2**30 and parse_bytes("128GB") == 128 * 10**9
    assert parse_bytes("1.5KiB") == 1536 and parse_bytes(" 2 mib ") == 2 * 2**20 and parse_bytes("5e9") == 5 * 10**9
    assert parse_bytes("0GiB", "--overhead", minimum=0) == 0
    assert parse_bytes(MAX_BYTES) == MAX_BYTES
    for bad in ("1e400GB", "nan", "-1GB", "1EiB0", 10**400, float("inf"), float("nan"), True):
        with pytest.raises(InputError, match="--budget"):
            parse_bytes(bad, "--budget")
    out = tmp_path / "plan.json"
    assert main(solve(profile_path, out, budget="0.002GiB")) == 0
    assert load_plan(out).bytes.budget == round(0.002 * 2**30)
    capsys.readouterr()


def test_overhead_of_zero_in_any_unit(tmp_path, profile_path, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(["solve", str(profile_path), "-o", str(out), "--budget", FEASIBLE, "--context", "0",
                 "--overhead", "0GB"]) == 0
    assert load_plan(out).bytes.reserves["overhead"] == 0
    capsys.readouterr()


def test_usage_errors_are_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    refused(capsys, ["solve", str(tmp_path / "p.json"), "-o", str(out), "--threads", "two"], out, "--threads")
    refused(capsys, ["solve", str(tmp_path / "p.json"), "--no-such-flag"], out, "--no-such-flag")
    refused(capsys, ["explain"], out, "plan")


def test_message_with_a_newline_stays_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "plan.json"
    refused(capsys, solve(tmp_path / "a\nb.json", out), out, "no such file")


# ----------------------------------------------------------------------------------- solve: output
def test_output_under_a_file_is_refused_before_solving(tmp_path, profile_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "plan.json"
    names_flag(refused(capsys, solve(profile_path, out), out, "not a directory"), "-o")


def test_output_that_is_a_fifo_is_not_replaced(tmp_path, profile_path, capsys) -> None:
    out = tmp_path / "fifo"
    os.mkfifo(out)
    names_flag(refused(capsys, solve(profile_path, out), out, "not a regular file"), "-o")
    assert out.is_fifo()


def test_example_output_is_checked_first(tmp_path, capsys) -> None:
    names_flag(refused(capsys, ["example", "-o", str(tmp_path)], tmp_path / "x", "is a directory"), "-o")


# ---------------------------------------------------------------------------------- files: reader
def _run_capped(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The real entry point in a child with 4 GiB of address space: a reader that waits on a FIFO or reads
    /dev/zero without end fails the test instead of hanging it or eating the machine's memory."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run([sys.executable, "-m", *argv], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, preexec_fn=limit)


@pytest.mark.parametrize("module", ["optimizer", "profiling"])
def test_device_and_fifo_are_refused(tmp_path, module) -> None:
    fifo = tmp_path / "profile.fifo"
    os.mkfifo(fifo)  # no writer: an open without O_NONBLOCK would wait forever
    out = tmp_path / "plan.json"
    commands = ([["solve", "/dev/zero", "-o", str(out)], ["solve", str(fifo), "-o", str(out)], ["explain", str(fifo)]]
                if module == "optimizer" else [["inspect", "/dev/zero"], ["refit", str(fifo)]])
    for argv in commands:
        proc = _run_capped([module, *argv])
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "not a regular file" in lines[0], proc.stderr
        assert not out.exists()


def test_raw_size_cap(tmp_path, monkeypatch, profile_path, capsys) -> None:
    out = tmp_path / "plan.json"
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, str(profile_path.stat().st_size - 1))
    refused(capsys, solve(profile_path, out), out, "limit", jsonio.MAX_JSON_BYTES_ENV)
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, str(profile_path.stat().st_size))
    assert load_profile(profile_path).architecture.num_layers == 3
    for bad in ("0", "-5", "1GB", "lots"):
        monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, bad)
        refused(capsys, solve(profile_path, out), out, jsonio.MAX_JSON_BYTES_ENV)


def test_gzip_bomb_stops_one_byte_past_the_cap(tmp_path, monkeypatch, capsys) -> None:
    cap = 1_000_000
    bomb = tmp_path / "bomb.json.gz"
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb.write_bytes(b"".join(c.compress(b" " * 2**20) for _ in range(64)) + c.flush())  # 64 MiB of spaces
    assert bomb.stat().st_size < 100_000
    produced = []

    class Counting:  # counts what the reader makes zlib produce
        def __init__(self, wbits):
            self.d = real(wbits)

        def decompress(self, data, max_length=0):
            piece = self.d.decompress(data, max_length)
            produced.append(len(piece))
            return piece

        def __getattr__(self, name):
            return getattr(self.d, name)

    real = zlib.decompressobj
    monkeypatch.setattr(jsonio.zlib, "decompressobj", Counting)
    monkeypatch.setattr(jsonio.gzip, "decompress", lambda data: pytest.fail("the bomb was decompressed whole"))
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, str(cap))
    out = tmp_path / "plan.json"
    refused(capsys, solve(bomb, out), out, "decompresses to more than", f"{cap}-byte")
    assert sum(produced) == cap + 1


def test_gzip_within_the_cap_and_multi_member(tmp_path, monkeypatch, profile_doc) -> None:
    text = json.dumps(profile_doc).encode()
    path = tmp_path / "p.json.gz"
    path.write_bytes(gzip.compress(text[:1000], mtime=0) + gzip.compress(text[1000:], mtime=0))
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, str(len(text)))
    assert load_profile(path).hash == jsonio.canonical_hash(profile_doc)
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, str(len(text) - 1))
    with pytest.raises(InputError, match="decompresses to more than"):
        load_profile(path)


@pytest.mark.parametrize("command", ["solve", "explain"])
def test_deep_nesting(tmp_path, capsys, command) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    out = tmp_path / "plan.json"
    argv = solve(path, out) if command == "solve" else ["explain", str(path)]
    refused(capsys, argv, out, "deep.json", f"deeper than {jsonio.MAX_JSON_DEPTH}")


def test_nesting_is_counted_outside_strings_only() -> None:
    limit = jsonio.MAX_JSON_DEPTH
    assert jsonio.parse_json(b"[" * limit + b"]" * limit, "x")
    with pytest.raises(InputError, match="deeper than"):
        jsonio.parse_json(b"[" * (limit + 1) + b"]" * (limit + 1), "x")
    with pytest.raises(InputError, match="deeper than"):
        jsonio.parse_json(b'{"a": ' * (limit + 1) + b"1" + b"}" * (limit + 1), "x")
    tricky = {"a\\": "[" * 200, 'say "{{{"': ["\\\\[", '\\"[[['], "b": [[["\\"]]]}
    assert jsonio.parse_json(json.dumps(tricky).encode(), "x") == tricky


def test_committed_profiles_are_shallow() -> None:
    paths = [*sorted((ROOT / "experiments" / "profiles").glob("*/*.json")),
             ROOT / "examples/deepseek-v3/profile.json.gz"]
    for path in paths:  # profiles, details files and validation results: far below MAX_JSON_DEPTH
        assert not jsonio._too_deep(jsonio.read_bytes(path), 8), path


def test_numbers_beyond_int64_and_overlong_integers(tmp_path, doc, capsys) -> None:
    out = tmp_path / "plan.json"
    path = tmp_path / "p.json"
    doc["experts"]["frequency"][0][1] = 1e300
    path.write_text(json.dumps(doc))
    refused(capsys, solve(path, out), out, "experts.frequency[0][1]", "out of range")
    text = json.dumps(profile_to_json(synthetic_profile(seed=9, **ARCH)))
    path.write_text(text.replace('"seed": 9', '"seed": ' + "9" * 5000, 1))
    refused(capsys, solve(path, out), out, "longer than")
    path.write_text(text.replace('"seed": 9', f'"seed": {2**70}', 1))
    refused(capsys, solve(path, out), out, "measurement.seed", "must be")
    path.write_text(text.replace("0.0]", "NaN]", 1))
    refused(capsys, solve(path, out), out, "NaN", "not a finite number")


# ------------------------------------------------------------------------------ contracts: bounds
def _block(doc: dict, kind: str) -> int:
    return next(i for i, b in enumerate(doc["architecture"]["blocks"]) if b["kind"] == kind)


PROFILE_CASES = [
    ("shape_1e30", lambda d: d["architecture"]["blocks"][0].update(shape=[10**30, 256]), "blocks[0].shape[0]"),
    ("shape_dim", lambda d: d["architecture"]["blocks"][0].update(shape=[MAX_DIM + 1, 256]), "blocks[0].shape[0]"),
    ("shape_elements", lambda d: d["architecture"]["blocks"][0].update(shape=[MAX_DIM, MAX_DIM]), "elements"),
    ("num_layers", lambda d: d["architecture"].update(num_layers=10**9), "architecture.num_layers"),
    ("hidden", lambda d: d["architecture"].update(hidden_size=2**40), "architecture.hidden_size"),
    ("num_experts", lambda d: d["architecture"]["moe_layers"][0].update(num_experts=10**6),
     "moe_layers[0].num_experts"),
    ("top_k", lambda d: d["architecture"]["moe_layers"][0].update(top_k=10**7), "moe_layers[0].top_k"),
    ("kv_dtype", lambda d: d["architecture"]["kv_cache"].update(dtype_bytes=16), "kv_cache.dtype_bytes"),
    ("kv_elements", lambda d: d["architecture"]["kv_cache"].update(elements_per_token_per_layer=10**30),
     "kv_cache.elements_per_token_per_layer"),
    ("block_layer", lambda d: d["architecture"]["blocks"][0].update(layer=10**12), "blocks[0].layer"),
    ("tokens", lambda d: d["experts"]["measurement"].update(tokens=2**64), "experts.measurement.tokens"),
    ("sensitivity", lambda d: d["sensitivity"]["values"][3].__setitem__(0, 1e300), "sensitivity.values[3][0]"),
    ("topk_cost", lambda d: d["topk_cost"]["values"][0].__setitem__(0, MAX_COST_NATS * 10), "topk_cost.values[0][0]"),
    ("prune_cost", lambda d: d["experts"]["prune_cost"][1].__setitem__(2, 1e18), "experts.prune_cost[1][2]"),
]


@pytest.mark.parametrize("case,mutate,needle", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_profile_out_of_bounds(tmp_path, doc, capsys, case, mutate, needle) -> None:
    mutate(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "plan.json"
    refused(capsys, solve(path, out), out, needle)


def test_profile_block_count_limit(tmp_path, doc, monkeypatch) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setattr("optimizer.profile.MAX_BLOCKS", len(doc["architecture"]["blocks"]) - 1)
    with pytest.raises(InputError, match=r"profile\.architecture\.blocks: \d+ blocks, more than the limit"):
        load_profile(path)


@pytest.fixture()
def plan_path(tmp_path, profile_path, capsys) -> Path:
    out = tmp_path / "good-plan.json"
    assert main(solve(profile_path, out)) == 0
    capsys.readouterr()
    return out


PLAN_CASES = [
    ("kept", lambda d: d["layers"][0]["kept_experts"].append(10**6), "plan.layers[0].kept_experts"),
    ("top_k", lambda d: d["layers"][0].update(top_k=2**40), "plan.layers[0].top_k"),
    ("layer", lambda d: d["layers"][0].update(layer=10**9), "plan.layers[0].layer"),
    ("total", lambda d: d["bytes"].update(total=2**61), "plan.bytes.total"),
    ("reserve", lambda d: d["bytes"]["reserves"].update(kv_cache=10**30), "plan.bytes.reserves.kv_cache"),
]


@pytest.mark.parametrize("case,mutate,needle", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan_out_of_bounds(tmp_path, plan_path, capsys, case, mutate, needle) -> None:
    doc = json.loads(plan_path.read_text())
    mutate(doc)
    path = tmp_path / "bad-plan.json"
    path.write_text(json.dumps(doc))
    refused(capsys, ["explain", str(path)], tmp_path / "nothing", needle)


def test_plan_round_trip_unchanged(tmp_path, plan_path) -> None:
    plan = load_plan(plan_path)
    save_plan(plan, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == plan_path.read_bytes()
    assert plan_to_json(plan)["bytes"]["budget"] == round(0.002 * 2**30)


def test_profile_round_trip_unchanged(tmp_path, profile_doc, profile_path) -> None:
    path = tmp_path / "p.json.gz"
    digest = save_profile(load_profile(profile_path), path)
    assert load_profile(path).hash == digest == jsonio.canonical_hash(profile_doc)


# ---------------------------------------------------------------------------- architecture configs
CONFIG_CASES = [
    (dict(MIXTRAL, num_hidden_layers=10**9), "'num_hidden_layers' must be <="),
    (dict(MIXTRAL, hidden_size=1e30), "'hidden_size' must be <="),
    (dict(MIXTRAL, hidden_size=float("inf")), "'hidden_size' must be an integer"),
    (dict(MIXTRAL, num_local_experts=10**6), "'num_local_experts' must be <="),
    (dict(MIXTRAL, num_hidden_layers=4096, num_local_experts=65536), "exceed the limit"),
    (dict(MIXTRAL, num_attention_heads=2**20, head_dim=2**20), "shape"),
    (dict(MIXTRAL, hidden_size=2**31, intermediate_size=2**31), "elements"),
]


@pytest.mark.parametrize("config,needle", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_config_out_of_bounds(config, needle) -> None:
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        architecture_from_config(config)


def test_config_file_is_read_bounded(tmp_path, monkeypatch) -> None:
    assert architecture_from_config(MIXTRAL).num_layers == 2
    (tmp_path / "config.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(InputError, match="cannot read JSON config: .*deeper than"):
        load_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL))
    assert load_architecture(tmp_path).num_layers == 2
    monkeypatch.setenv(jsonio.MAX_JSON_BYTES_ENV, "10")
    with pytest.raises(InputError, match="limit"):
        load_architecture(tmp_path)


def test_limits_are_documented() -> None:
    docs = {name: (ROOT / "docs" / name).read_text() for name in ("profile.md", "plan.md", "optimizer.md")}
    for name in ("MAX_JSON_DEPTH", "DEFAULT_MAX_JSON_BYTES", "MOECC_MAX_JSON_BYTES", "MAX_JSON_NUMBER", "MAX_DIM",
                 "MAX_BLOCK_ELEMENTS", "MAX_MODEL_ELEMENTS", "MAX_LAYERS", "MAX_EXPERTS", "MAX_BLOCKS",
                 "MAX_KV_DTYPE_BYTES", "MAX_COST_NATS"):
        assert name in docs["profile.md"], name
    assert "MOECC_MAX_JSON_BYTES" in docs["plan.md"] and "MAX_BYTES" in docs["plan.md"]
    for name in ("MAX_BYTES", "MAX_CONTEXT", "MAX_TIME_LIMIT_S", "MAX_GAP", "MAX_THREADS", "MAX_SEED",
                 "MAX_TOKENS_PER_S", "MAX_COST_NATS"):
        assert name in docs["optimizer.md"], name


# ------------------------------------------------------------------------------------ profiling CLI
PROFILING_FLAGS = [
    (["run", "--max-tokens", "0"], "--max-tokens"),
    (["run", "--max-tokens", str(2**40)], "--max-tokens"),
    (["run", "--window", "-1"], "--window"),
    (["run", "--batch-size", "0"], "--batch-size"),
    (["run", "--seed", "-1"], "--seed"),
    (["run", "--prune-per-layer", "0"], "--prune-per-layer"),
    (["run", "--measure-blocks", "-3"], "--measure-blocks"),
    (["run", "--state-budget-mib", "0"], "--state-budget-mib"),
    (["run", "--state-budget-mib", str(2**40)], "--state-budget-mib"),
    (["run", "--device-repeats", "0"], "--device-repeats"),
    (["run", "--threads", "0"], "--threads"),
    (["run", "--threads", "100000"], "--threads"),
    (["run", "--max-tokens", "1e3"], "--max-tokens"),
    (["validate", "PROFILE", "--plans", "2"], "--plans"),
    (["validate", "PROFILE", "--max-tokens", "-5"], "--max-tokens"),
    (["compare-domains", "PROFILE", "PROFILE", "--keep", "nan"], "--keep"),
    (["compare-domains", "PROFILE", "PROFILE", "--keep", "inf"], "--keep"),
    (["compare-domains", "PROFILE", "PROFILE", "--keep", "0"], "--keep"),
    (["memory", "--max-tokens", "0"], "--max-tokens"),
]


@pytest.mark.parametrize("argv,flag", PROFILING_FLAGS, ids=[" ".join(a)[:40] for a, _ in PROFILING_FLAGS])
def test_profiling_flag_is_refused_before_any_model_is_read(tmp_path, capsys, argv, flag) -> None:
    argv = [str(tmp_path / "absent.json") if a == "PROFILE" else a for a in argv]
    if argv[0] in ("run", "validate", "memory"):
        argv += ["--model", str(tmp_path / "no-model")]
    out = tmp_path / "out.json"
    if argv[0] == "run":
        argv += ["-o", str(out)]
    names_flag(refused(capsys, argv, out, flag, cli=profiling_main), flag)


@pytest.mark.parametrize("argv,flag", [(["run", "--model", "M", "-o", "DIR"], "-o"),
                                       (["refit", "PROFILE", "-o", "DIR"], "-o"),
                                       (["validate", "PROFILE", "--model", "M", "--json", "DIR"], "--json"),
                                       (["compare-domains", "PROFILE", "PROFILE", "--json", "DIR"], "--json")])
def test_profiling_output_is_checked_first(tmp_path, capsys, argv, flag) -> None:
    names = {"M": str(tmp_path / "no-model"), "PROFILE": str(tmp_path / "absent.json"), "DIR": str(tmp_path)}
    line = refused(capsys, [names.get(a, a) for a in argv], tmp_path / "nothing", "is a directory", cli=profiling_main)
    names_flag(line, flag)


@pytest.mark.parametrize("command", ["inspect", "refit"])
def test_profiling_reads_profiles_bounded(tmp_path, capsys, command) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, [command, str(deep)], tmp_path / "nothing", f"deeper than {jsonio.MAX_JSON_DEPTH}",
            cli=profiling_main)


def test_profiling_usage_error_is_one_line(tmp_path, capsys) -> None:
    refused(capsys, ["run", "--model", str(tmp_path), "--cost", "mse"], tmp_path / "nothing", "--cost",
            cli=profiling_main)


def test_profiling_deep_details_file_is_one_line(tmp_path, profile_path, capsys) -> None:
    (tmp_path / "profile.details.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, ["inspect", str(profile_path)], tmp_path / "nothing", "too deeply nested", cli=profiling_main)
