from __future__ import annotations

import pytest

from dynsearch.errors import BudgetError
from dynsearch.search.budget import check_reachable, expand_budgets, format_bytes, parse_budget


@pytest.mark.parametrize("text,file_bytes,bpw", [
    ("100MB", 100_000_000, None), ("16GB", 16_000_000_000, None), ("16GiB", 16 * 2**30, None),
    ("95MiB", 95 * 2**20, None), ("1.5gb", 1_500_000_000, None), (" 4.5bpw ", None, 4.5),
    ("123456", 123456, None), ("2.0BPW", None, 2.0), ("0.5TB", 5 * 10**11, None),
])
def test_parse(text, file_bytes, bpw):
    b = parse_budget(text)
    assert b.file_bytes == file_bytes and b.bpw == bpw


@pytest.mark.parametrize("text,msg", [
    ("16XB", "unknown unit 'XB'"), ("GB", "invalid budget"), ("-5GB", "invalid budget"),
    ("0MB", "must be positive"), ("40bpw", r"must lie in \[0.5, 32\]"), ("1e9", "invalid budget"),
    ("", "invalid budget"),
])
def test_parse_errors(text, msg):
    with pytest.raises(BudgetError, match=msg):
        parse_budget(text)


def test_tensor_bytes():
    assert parse_budget("4bpw").tensor_bytes(1000, 999) == 500
    assert parse_budget("1MB").tensor_bytes(10**9, 12_345) == 1_000_000 - 12_345


def test_reachability():
    b = parse_budget("100MB")
    with pytest.raises(BudgetError, match="unreachable: the smallest assignment"):
        check_reachable(b, 50, 60, 100)
    with pytest.raises(BudgetError, match="above the largest possible file"):
        check_reachable(b, 100, 60, 100)
    check_reachable(b, 80, 60, 100)
    assert format_bytes(105_500_000) == "105.50 MB"


def test_budget_ranges_expand_evenly_with_both_ends():
    from dynsearch.search.budget import expand_budgets

    assert expand_budgets(["60MB..120MB/4"]) == ["60MB", "80MB", "100MB", "120MB"]
    assert expand_budgets(["3bpw..6bpw/3", "100MB"]) == ["3bpw", "4.5bpw", "6bpw", "100MB"]
    assert [parse_budget(b).file_bytes for b in expand_budgets(["1GiB..2GiB/2"])] == [2**30, 2**31]


@pytest.mark.parametrize("bad", ["60MB..120MB", "60MB..120MB/1", "60MB..120MB/x", "60MB..4bpw/3",
                                 "120MB..60MB/3", "60MB..60MB/2", "..120MB/3"])
def test_bad_budget_ranges_are_clear_errors(bad):
    from dynsearch.search.budget import expand_budgets

    with pytest.raises(BudgetError, match="invalid budget"):
        expand_budgets([bad])


def test_byte_budgets_are_named_without_exponents():
    assert parse_budget("105455000").spec == "105455000B"  # not 1.05455e+08B (a run's file name)
    assert parse_budget("100.0MB").spec == "100MB" and parse_budget("1.5GB").spec == "1.5GB"


@pytest.mark.parametrize("text, expected", [
    ("10000MB..20000MB/3", ["10000MB", "15000MB", "20000MB"]),
    ("1KB..2GB/3", ["1KB", "1000000.5KB", "2000000KB"]),
    ("123456..1234567/2", ["123456B", "1234567B"]),
    ("1000.5MB..1001.5MB/3", ["1000.5MB", "1001MB", "1001.5MB"]),  # both ends stay put
])
def test_range_ends_and_steps_are_exact(text, expected):
    budgets = [parse_budget(b) for b in expand_budgets([text])]
    assert [b.spec for b in budgets] == expected
    assert [parse_budget(b.spec).file_bytes for b in budgets] == [b.file_bytes for b in budgets]


def test_a_range_of_a_billion_budgets_is_one_line_at_once():
    with pytest.raises(BudgetError, match="N <= 64"):
        expand_budgets(["1MB..2MB/1000000000"])
