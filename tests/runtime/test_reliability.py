"""Nothing of the user's is lost, nothing is unpickled, a bad plan is refused before any weight is read.

Each test reproduces one finding of the reliability issue with the real commands: ``runtime apply`` /
``export`` on tiny random checkpoints, output paths that overlap the inputs, edited plans, a hostile pickle.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.architectures import load_architecture
from optimizer.profile import save_profile
from runtime import apply as apply_module
from runtime.apply import ByteCountError, apply_plan
from runtime.outdir import MARKER, check_output_dir, output_dir, written_by_moecc
from runtime.testing import made_up_plan, made_up_profile
from runtime.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))


@pytest.fixture(scope="module")
def plan_doc(tiny: Path) -> dict:
    return made_up_plan(tiny).to_json()


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _one_line_exit(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _plan_file(tmp: Path, doc: dict, name: str = "plan.json") -> Path:
    path = tmp / name
    path.write_text(json.dumps(doc))
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- output paths
def test_overwrite_onto_the_parent_of_the_model_deletes_nothing(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    work = tmp_path / "W"
    shutil.copytree(tiny, work / "model")
    (work / "notes.txt").write_text("mine")
    plan = _plan_file(tmp_path, plan_doc)
    before = _snapshot(work)
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(work / "model"), "-o", str(work),
                               "--overwrite", "--quiet"))
    assert "overlap the input" in line
    assert _snapshot(work) == before
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(work / "model"),
                               "-o", str(work / "model" / "out"), "--quiet"))
    assert "overlap the input" in line and not (work / "model" / "out").exists()


def test_overwrite_onto_a_file_or_a_directory_of_the_user_is_refused(tiny: Path, plan_doc: dict,
                                                                      tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, plan_doc)
    target = tmp_path / "results.csv"
    target.write_text("precious")
    for _ in range(2):  # a second try sees the same state: nothing was moved aside
        line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(target),
                                   "--overwrite", "--quiet"))
        assert "not a directory" in line and target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "results.csv"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("keep")
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(mine),
                               "--overwrite", "--quiet"))
    assert "not written by moecc" in line and (mine / "a.txt").read_text() == "keep"


def test_plan_inside_the_output_is_refused(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    apply_plan(_plan_file(tmp_path, plan_doc), tiny, out)
    plan = _plan_file(out, plan_doc, "plan-copy.json")
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(out),
                               "--overwrite", "--quiet"))
    assert "overlap the input" in line and plan.is_file()


def test_overwrite_replaces_only_moecc_output(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, plan_doc)
    out = tmp_path / "out"
    apply_plan(plan, tiny, out)
    assert written_by_moecc(out) and json.loads((out / MARKER).read_text())["complete"] is True
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(out), "--quiet"))
    assert "--overwrite" in line
    (out / "stale.txt").write_text("from the earlier run")
    proc = _cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(out), "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists() and written_by_moecc(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plan.json"]  # no partial or old directory


def test_legacy_apply_output_counts_as_moecc_output(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "moecc_manifest.json").write_text(json.dumps({"schema": "moecc.runtime_manifest", "version": 1}))
    assert written_by_moecc(legacy)
    (legacy / "moecc_manifest.json").write_text(json.dumps({"schema": "something.else"}))
    assert not written_by_moecc(legacy)


def test_symlink_output_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / MARKER).write_text(json.dumps({"schema": "moecc.output"}))
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(Exception, match="symbolic link"):
        check_output_dir(tmp_path / "link", True)


def test_failure_inside_leaves_no_partial_and_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_dir(out, False, command="test") as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with output_dir(out, True, command="test") as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_disk_full_names_the_users_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Exception) as info:
        with output_dir(out, False, command="test"):
            raise OSError(28, "No space left on device")
    assert str(out) in str(info.value) and "moecc-partial" not in str(info.value)
    assert "No space left on device" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_line_naming_it(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, plan_doc)
    out = "/proc/moecc-cannot-write-here"
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", out, "--quiet"))
    assert out in line and "moecc-partial" not in line


def test_export_refuses_a_user_directory_and_overwrites_its_own(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, plan_doc)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    line = _one_line_exit(_cli("runtime", "export", str(plan), "--to", "gptqmodel", "--model", str(tiny),
                               "-o", str(mine)))
    assert "not written by moecc" in line and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    recipe = tmp_path / "recipe"
    for extra in ([], ["--overwrite"]):
        proc = _cli("runtime", "export", str(plan), "--to", "gptqmodel", "--model", str(tiny), "-o", str(recipe),
                    *extra)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in recipe.iterdir()) == ["gptqmodel.json", MARKER]


# ------------------------------------------------------------------------------------ the plan is checked
def _edited(doc: dict, edit) -> dict:
    doc = json.loads(json.dumps(doc))
    edit(doc)
    return doc


def _router(doc: dict) -> str:
    return next(n for n in doc["formats"] if n.endswith("mlp.gate.weight"))


def _norm(doc: dict) -> str:
    return next(n for n in doc["formats"] if n.endswith("input_layernorm.weight"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["formats"].__setitem__(_router(d), "int2_g32"), "cannot be changed to int2_g32"),
    (lambda d: d["formats"].__setitem__(_norm(d), "int2_g32"), "cannot be changed to int2_g32"),
    (lambda d: d["bytes"].__setitem__("total", 123), "plan.bytes.total: 123 bytes"),
    (lambda d: d["bytes"]["by_kind"].__setitem__("attention", d["bytes"]["by_kind"]["attention"] + 2),
     "plan.bytes.by_kind.attention"),
    (lambda d: d["solve"].__setitem__("status", "infeasible"), "plan.solve.status: 'infeasible'"),
    (lambda d: d["layers"].pop(0), "no entry for MoE layer"),
])
def test_apply_refuses_an_edited_plan_before_writing(tiny: Path, plan_doc: dict, tmp_path: Path, edit,
                                                     message: str) -> None:
    plan = _plan_file(tmp_path, _edited(plan_doc, edit))
    line = _one_line_exit(_cli("runtime", "apply", str(plan), "--model", str(tiny), "-o", str(tmp_path / "o"),
                               "--quiet"))
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_byte_count_outside_tolerance_is_an_error_and_writes_nothing(tiny: Path, plan_doc: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan_file(tmp_path, plan_doc)
    monkeypatch.setattr(apply_module, "BYTES_TOLERANCE", -1.0)  # any count, even an exact one, is "outside"
    with pytest.raises(ByteCountError, match="was not written"):
        apply_plan(plan, tiny, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# ------------------------------------------------------------------------------------------ model card
def test_output_has_its_own_card_and_not_the_sources(tiny: Path, plan_doc: dict, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "README.md").write_text("# the original model card")
    (model / "metrics.json").write_text("{}")
    (model / "train_log.txt").write_text("step 1")
    plan = _plan_file(tmp_path, plan_doc)
    proc = _cli("runtime", "apply", str(plan), "--model", str(model), "-o", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert not (out / "metrics.json").exists() and not (out / "train_log.txt").exists()
    card = (out / "README.md").read_text()
    assert "the original model card" not in card
    for lp in plan_doc["layers"]:
        assert f"| {lp['layer']} | {len(lp['kept_experts'])} of 8 | {lp['top_k']} of 2 |" in card
    assert f"**{plan_doc['bytes']['total']:,}**" in card and "checkpoint fingerprint `sha256:" in card
    assert f"python -m runtime apply {plan} --model {model} -o {out} --quiet" in card


# -------------------------------------------------------------------------------------- no unpickling
class _Hostile:
    """Unpickling this calls ``open(path, "w")``: the file appears if anything ever unpickles it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture()
def hostile(tiny: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "hostile"
    model.mkdir()
    for name in ("config.json", "byte_tokenizer.json", "generation_config.json"):
        if (tiny / name).is_file():
            shutil.copyfile(tiny / name, model / name)
    canary = tmp_path / "PWNED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Hostile(canary)}))
    return model, canary


def test_no_command_unpickles_a_checkpoint(hostile: tuple[Path, Path], plan_doc: dict, tmp_path: Path) -> None:
    model, canary = hostile
    plan = _plan_file(tmp_path, plan_doc)
    profile = tmp_path / "profile.json"  # made for the same architecture, so every command gets to the weights
    save_profile(made_up_profile(load_architecture(model)), profile)
    details = tmp_path / "profile.details.json"  # the calibration text of a profile run, for the commands that measure
    details.write_text(json.dumps({"data": "english:calibration", "tokens": 64, "window": 32}))
    commands = [
        ("runtime", "apply", str(plan), "--model", str(model), "-o", str(tmp_path / "a"), "--quiet"),
        ("runtime", "export", str(plan), "--to", "gptqmodel", "--model", str(model), "-o", str(tmp_path / "e")),
        ("runtime", "export", str(plan), "--to", "llamacpp", "--model", str(model), "-o", str(tmp_path / "l")),
        ("runtime", "eval", str(model), "--max-tokens", "64", "--window", "32", "--no-progress"),
        ("profiling", "run", "--model", str(model), "--max-tokens", "64", "-o", str(tmp_path / "p.json")),
        ("profiling", "run", "--model", str(model), "--max-tokens", "64", "--streamed", "-o", str(tmp_path / "q.json")),
        ("profiling", "memory", "--model", str(model), "--max-tokens", "64"),
        ("profiling", "validate", str(profile), "--model", str(model), "--plans", "3"),
        ("profiling", "calibrate", str(profile), "--model", str(model), "-o", str(tmp_path / "c.json")),
        ("profiling", "prune-curve", str(profile), "--model", str(model), "-o", str(tmp_path / "k.json")),
        ("profiling", "refine", str(profile), "--model", str(model), "--budget", "1GB", "--overhead", "0",
         "-o", str(tmp_path / "r.json")),
    ]
    for module, *args in commands:
        line = _one_line_exit(_cli(module, *args))
        assert "pickle" in line, (module, args, line)
        assert not canary.exists(), (module, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile", "plan.json", "profile.details.json",
                                                          "profile.json"]
