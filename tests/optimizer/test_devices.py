"""``--device NAME|FILE``: presets price decode by published bandwidth; a file replaces the device section."""
from __future__ import annotations

import json

import pytest

from optimizer.cli import main
from optimizer.devices import PRESETS, load_device
from optimizer.errors import InputError
from optimizer.profile import device_to_json, load_profile, save_profile
from optimizer.synthetic import synthetic_profile


def test_every_preset_has_a_source_and_a_bandwidth_in_bytes():
    assert {"m3-max", "m4-max", "m3-ultra", "ryzen-ai-max-395", "dgx-spark"} <= set(PRESETS)
    for name, p in PRESETS.items():
        d = load_device(name)
        assert d.memory_bandwidth_bytes_per_s == p.bandwidth_gb_s * 1e9  # GB/s are 1e9 bytes
        assert d.measurement.prior and d.measurement.source == p.source and p.source
        assert d.format_throughput == {}  # bytes alone decide: an upper bound on tokens/s
    assert load_device("m4-max").memory_bandwidth_bytes_per_s == 546e9
    assert load_device("ddr5-2ch-5600").memory_bandwidth_bytes_per_s == 2 * 8 * 5.6e9


def test_device_file_round_trip_and_refusals(tmp_path):
    d = load_device("dgx-spark")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(device_to_json(d)))
    assert load_device(str(path)) == d
    with pytest.raises(InputError, match="neither a preset"):
        load_device(str(tmp_path / "missing.json"))
    path.write_text(json.dumps({"memory_bandwidth_bytes_per_s": 0, "measurement": {"method": "x"}}))
    with pytest.raises(InputError, match=r"--device .*memory_bandwidth_bytes_per_s: must be > 0"):
        load_device(str(path))


def _solve(tmp_path, capsys, *extra):
    src = tmp_path / "p.json"
    if not src.exists():
        save_profile(synthetic_profile(seed=2, num_layers=2, num_experts=4, top_k=2), src)
    out = tmp_path / f"plan{len(extra)}.json"
    assert main(["solve", str(src), "--budget", "1GB", "--context", "0", "--overhead", "0", "--reproducible",
                 "-o", str(out), *extra]) == 0
    capsys.readouterr()
    return json.loads(out.read_text()), load_profile(src)


def test_solve_prices_decode_on_the_named_device_and_records_it(tmp_path, capsys):
    own, profile = _solve(tmp_path, capsys)
    m4, _ = _solve(tmp_path, capsys, "--device", "m4-max")
    assert "device" not in own["solve"]["options"]  # without --device the plan is what it always was
    assert m4["solve"]["options"]["device"] == {"name": "m4-max", "bandwidth_bytes_per_s": 546e9}
    # same plan (no speed floor), same bytes read; tokens/s scale with the bandwidth
    assert m4["formats"] == own["formats"]
    assert m4["predicted"]["bytes_read_per_token"] == own["predicted"]["bytes_read_per_token"]
    ratio = 546e9 / profile.device.memory_bandwidth_bytes_per_s
    assert m4["predicted"]["decode_tokens_per_s"] == pytest.approx(own["predicted"]["decode_tokens_per_s"] * ratio,
                                                                   rel=1e-8)


def test_unknown_device_exits_2_with_one_line(tmp_path, capsys):
    save_profile(synthetic_profile(seed=2, num_layers=2, num_experts=4, top_k=2), tmp_path / "p.json")
    assert main(["solve", str(tmp_path / "p.json"), "--device", "m9-max", "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a preset" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_devices_lists_every_preset(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out and p.source in out for name, p in PRESETS.items())


def test_a_tied_embedding_is_read_whole_per_token():
    """With a separate lm_head the embedding reads one row per token; tied (no lm_head block), the embedding
    matrix is the output projection too and every token reads all of it (hand count: vocab 64 x hidden 32 in
    BF16 = 4,096 bytes; one row 64 bytes)."""
    from optimizer.budget import make_budget
    from optimizer.formulation.instance import FormulationOptions, build_instance
    from optimizer.model_spec import BlockKind

    def read_of_embedding(tied: bool) -> int:
        p = synthetic_profile(seed=1, num_layers=2, num_experts=4, top_k=2, hidden=32, vocab=64, formats=("BF16",),
                              tied=tied)
        emb = [i for i, b in enumerate(p.architecture.blocks) if b.kind == BlockKind.EMBEDDING][0]
        assert p.architecture.blocks[emb].shape == (64, 32)
        assert any(b.kind == BlockKind.LM_HEAD for b in p.architecture.blocks) != tied
        inst = build_instance(p, make_budget(p.architecture, "1GB", 0, 0), FormulationOptions())
        return int(inst.pair_read[inst.pairs_of(emb)][0])

    assert read_of_embedding(tied=False) == 64  # one BF16 row of 32
    assert read_of_embedding(tied=True) == 64 * 32 * 2


def test_per_token_overhead_prices_every_token(tmp_path, capsys):
    """t = overhead + bytes / bandwidth. Hand numbers: 1e9 B/s and 10 ms per token; a plan reading R bytes
    decodes at 1 / (0.01 + R / 1e9) tokens/s, and no floor at or above 1 / 0.01 = 100 tokens/s can be met."""
    from optimizer.profile import Device, Measurement

    d = Device(1e9, Measurement("hand"), {}, token_overhead_s=0.01)
    assert d.tokens_per_s(1e7) == pytest.approx(1 / (0.01 + 0.01))  # 50 tokens/s
    assert d.bytes_within(50.0) == pytest.approx(1e7)
    assert d.bytes_within(100.0) == pytest.approx(0.0, abs=1e-6)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(device_to_json(d)))
    assert json.loads(path.read_text())["token_overhead_s"] == 0.01
    assert load_device(str(path)) == d
    assert "token_overhead_s" not in device_to_json(Device(1e9, Measurement("hand")))  # old files unchanged
    path.write_text(json.dumps({**device_to_json(d), "token_overhead_s": -1}))
    with pytest.raises(InputError, match="token_overhead_s"):
        load_device(str(path))
    # on a solve: the plan's speed carries the overhead, and a floor the overhead alone forbids is refused
    path.write_text(json.dumps(device_to_json(d)))
    plan, _ = _solve(tmp_path, capsys, "--device", str(path))
    read = plan["predicted"]["bytes_read_per_token"]
    assert plan["predicted"]["decode_tokens_per_s"] == pytest.approx(1 / (0.01 + read / 1e9), rel=1e-8)
    src = str(tmp_path / "p.json")
    assert main(["solve", src, "--budget", "1GB", "--context", "0", "--overhead", "0", "--device", str(path),
                 "--min-tokens-per-s", "100", "-o", str(tmp_path / "fast.json")]) == 2
    assert "reaches at most" in capsys.readouterr().err
