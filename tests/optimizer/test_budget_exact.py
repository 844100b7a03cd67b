"""Exact strings and boundaries of optimizer/budget.py: every unit of ``format_bytes`` at its scale boundary,
every refusal message of ``parse_bytes`` / ``make_budget`` word for word, and the int/float edges of parsing."""
from __future__ import annotations

import re

import pytest

from optimizer.budget import MAX_BYTES, format_bytes, make_budget, parse_bytes
from optimizer.errors import InputError
from optimizer.synthetic import synthetic_architecture


# ------------------------------------------------------------------------------------------------ format_bytes
@pytest.mark.parametrize("n,text", [
    # each unit exactly at its scale (>= picks the larger unit), and one below it (the next unit down)
    (10**12, "1.00 TB"), (10**12 - 10**7, "999.99 GB"),
    (10**9, "1.00 GB"), (10**9 - 10**4, "999.99 MB"),
    (10**6, "1.00 MB"), (10**6 - 10, "999.99 KB"),
    (10**3, "1.00 KB"), (999, "999 B"),
    # values are divided by the scale, with two decimals
    (2 * 10**12, "2.00 TB"), (1_500_000_000_000_000, "1500.00 TB"), (127_400_000_000, "127.40 GB"),
    (1_234_567, "1.23 MB"), (45_678, "45.68 KB"), (1, "1 B"), (0, "0 B"),
    # floats: the same boundaries; below 1 KB the value is truncated to whole bytes
    (1e12, "1.00 TB"), (1e9, "1.00 GB"), (1e6, "1.00 MB"), (1e3, "1.00 KB"), (999.9, "999 B"),
    # negative sizes (a deficit) pick their unit by magnitude and keep the sign
    (-(10**12), "-1.00 TB"), (-2_500_000_000, "-2.50 GB"), (-(10**6), "-1.00 MB"), (-1000, "-1.00 KB"),
    (-999, "-999 B"),
])
def test_format_bytes_every_unit_and_boundary(n: float, text: str) -> None:
    assert format_bytes(n) == text


# ------------------------------------------------------------------------------------------------ parse_bytes
def _message(excinfo: pytest.ExceptionInfo[InputError]) -> str:
    return str(excinfo.value)


def test_parse_bytes_messages_word_for_word() -> None:
    with pytest.raises(InputError) as e:
        parse_bytes(None)  # type: ignore[arg-type]
    assert _message(e) == "size: expected a size such as 128GB, got None"  # the default `what` is "size"
    with pytest.raises(InputError) as e:
        parse_bytes(True, "--budget")
    assert _message(e) == "--budget: expected a size such as 128GB, got True"
    with pytest.raises(InputError) as e:
        parse_bytes("12 apples!", "--budget")
    assert _message(e) == "--budget: cannot read '12 apples!' as a size (examples: 128GB, 120GiB, 512MB)"
    with pytest.raises(InputError) as e:  # the text is cut to its first 40 characters
        parse_bytes("x" * 50, "--budget")
    assert _message(e) == f"--budget: cannot read {'x' * 40!r} as a size (examples: 128GB, 120GiB, 512MB)"
    with pytest.raises(InputError) as e:
        parse_bytes("3XB", "--overhead")
    assert _message(e) == "--overhead: unknown unit 'xb' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
    with pytest.raises(InputError) as e:
        parse_bytes(float("nan"), "--budget")
    assert _message(e) == "--budget: expected a size, got nan"
    with pytest.raises(InputError) as e:
        parse_bytes("1048577TiB", "--budget")
    assert _message(e) == "--budget: 1048577TiB is more than the limit of 1152921504606846976 bytes (2**60, 1 EiB)"
    with pytest.raises(InputError) as e:  # 41 nines: read as a float 1e41, over the limit; the echo is cut to 40
        parse_bytes("9" * 41 + "B", "--budget")
    assert _message(e) == f"--budget: {'9' * 40} is more than the limit of {MAX_BYTES} bytes (2**60, 1 EiB)"
    with pytest.raises(InputError) as e:
        parse_bytes("0GB", "--budget")
    assert _message(e) == "--budget: must be positive, got '0GB'"
    with pytest.raises(InputError) as e:
        parse_bytes(0)
    assert _message(e) == "size: must be positive, got 0"
    with pytest.raises(InputError) as e:
        parse_bytes("1KiB", "--x", minimum=1025)
    assert _message(e) == "--x: must be >= 1025 bytes, got '1KiB'"
    with pytest.raises(InputError) as e:
        parse_bytes("1B", "--x", minimum=2)
    assert _message(e) == "--x: must be >= 2 bytes, got '1B'"


def test_parse_bytes_smallest_values() -> None:
    # the default minimum is 1 byte, and exactly the minimum is allowed
    assert parse_bytes("1") == 1 and parse_bytes(1) == 1 and parse_bytes("1B") == 1
    assert parse_bytes("1.4") == 1  # rounds to the nearest byte
    assert parse_bytes("2B", minimum=2) == 2
    assert parse_bytes(0, minimum=0) == 0 and parse_bytes("0", minimum=0) == 0
    assert parse_bytes("1.5KB") == 1500 and parse_bytes("1.5kIb") == 1536  # the unit is case-insensitive


def test_parse_bytes_integers_stay_exact_up_to_30_digits() -> None:
    # 2**60 - 1 = 1152921504606846975 has no exact float (a float would round it to 2**60): up to 30 digits are
    # read as an int, so it comes back exactly; 30 digits with leading zeros still are
    below = MAX_BYTES - 1
    assert parse_bytes("1152921504606846975B") == below
    assert parse_bytes("0" * 11 + "1152921504606846975") == below  # 30 digits
    # from 31 digits on the text is read as a float: 2**60 - 1 rounds to 2**60 (still within the limit)
    assert parse_bytes("0" * 12 + "1152921504606846975") == MAX_BYTES
    # 2**60 + 1 is over the limit, seen exactly as an int (a float would round it down to 2**60 and pass)
    with pytest.raises(InputError, match="more than the limit"):
        parse_bytes("1152921504606846977B")
    with pytest.raises(InputError, match="more than the limit"):
        parse_bytes(MAX_BYTES + 1)
    assert parse_bytes(MAX_BYTES) == MAX_BYTES and parse_bytes(float(MAX_BYTES)) == MAX_BYTES
    # a huge int is refused as too large (it is never converted to a float, which would overflow)
    with pytest.raises(InputError, match=re.escape(f"size: {str(10**400)[:40]} is more than the limit")):
        parse_bytes(10**400)


# ------------------------------------------------------------------------------------------------ make_budget
def _arch():
    # gqa KV cache: 2 * hidden = 64 elements per token and layer, 2 layers, 2 bytes: 256 bytes per token
    return synthetic_architecture(num_layers=2, num_experts=4, top_k=2, hidden=32, expert_inter=32, dense_inter=32,
                                  vocab=32)


def test_make_budget_messages_name_the_option() -> None:
    arch = _arch()
    with pytest.raises(InputError) as e:
        make_budget(arch, "0GB")
    assert _message(e) == "--budget: must be positive, got '0GB'"
    with pytest.raises(InputError) as e:
        make_budget(arch, "lots")
    assert _message(e).startswith("--budget: cannot read 'lots'")
    with pytest.raises(InputError) as e:
        make_budget(arch, "1TB", overhead="-1GB")
    assert _message(e) == "--overhead: cannot read '-1GB' as a size (examples: 128GB, 120GiB, 512MB)"
    with pytest.raises(InputError) as e:
        make_budget(arch, "1TB", overhead="2PB")
    assert _message(e) == "--overhead: unknown unit 'pb' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
    with pytest.raises(InputError) as e:
        make_budget(arch, "1TB", context=-1)
    assert _message(e) == "--context: expected a number of tokens in [0, 2147483647], got -1"
    # KV 100 * 256 = 25,600 bytes + overhead 1,000 = 26,600 = the whole budget: nothing left
    with pytest.raises(InputError) as e:
        make_budget(arch, 26_600, context=100, overhead=1_000)
    assert _message(e) == ("--budget: 26.60 KB leaves nothing for weights after reserves "
                           "(KV cache 25.60 KB for 100 tokens, overhead 1.00 KB)")
    # an overhead of 0 is allowed (its minimum is 0, not 1)
    b = make_budget(arch, 26_601, context=100, overhead="0B")
    assert b.reserves == {"kv_cache": 25_600, "overhead": 0} and b.available == 1_001


def test_make_budget_context_and_availability_edges() -> None:
    arch = _arch()  # 256 bytes of KV cache per token
    # the context bounds are inclusive: 0 and 2**31 - 1 tokens are both allowed
    assert make_budget(arch, 1_000, context=0, overhead=0).reserves["kv_cache"] == 0
    top = make_budget(arch, "1TiB", context=2**31 - 1, overhead=0)
    assert top.reserves["kv_cache"] == (2**31 - 1) * 256 and top.available == 2**40 - (2**31 - 1) * 256
    for bad in (2**31, -1, True, False, 1.0):
        with pytest.raises(InputError, match=r"^--context: "):
            make_budget(arch, "1TiB", context=bad, overhead=0)
    # exactly one byte left for the weights is enough: KV 256 (1 token) + overhead 10 + 1 = 267
    assert make_budget(arch, 267, context=1, overhead=10).available == 1
    with pytest.raises(InputError, match="leaves nothing for weights"):
        make_budget(arch, 266, context=1, overhead=10)
