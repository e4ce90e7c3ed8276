import pytest

from mlsys24.params import Bool, Choice, Float, Int, ListOf, ParameterError, Str, validate


def test_good_values_pass():
    ns = dict(N=5, X=0.5, B=True, C="fcfs", L=[1, 2, 3], S="abc")
    validate(ns, N=Int(1, 10), X=Float(0, 1, lo_open=True), B=Bool(), C=Choice("fcfs", "sjf"),
             L=ListOf(Int(1), min_len=1), S=Str())


@pytest.mark.parametrize("name,value,spec,needle", [
    ("N", -3, Int(1, 10), "in [1, 10]"),
    ("N", 2.5, Int(1, 10), "integer"),
    ("N", True, Int(0, 10), "integer"),           # a bool is not an integer parameter
    ("X", 0.0, Float(0, 1, lo_open=True), "(0, 1]"),
    ("X", float("nan"), Float(0, 1), "finite"),
    ("X", "1", Float(0, 1), "number"),
    ("B", "yes", Bool(), "True or False"),
    ("C", "lifo", Choice("fcfs", "sjf"), "'fcfs', 'sjf'"),
    ("C", 1, Choice("1", "2"), "one of"),
    ("L", [1, 0], ListOf(Int(1)), "item 1 = 0"),
    ("L", "1,2", ListOf(Int(1)), "list"),
    ("L", [], ListOf(Int(1), min_len=1), "at least 1"),
    ("S", "", Str(), "non-empty"),
])
def test_bad_values_name_the_parameter(name, value, spec, needle):
    with pytest.raises(ParameterError) as e:
        validate({name: value}, **{name: spec})
    msg = str(e.value)
    assert f"parameter {name!r}" in msg and needle in msg, msg


def test_missing_parameter_and_bad_spec():
    with pytest.raises(ParameterError, match="'N' is not defined"):
        validate({}, N=Int(1))
    with pytest.raises(TypeError):
        validate({"N": 1}, N=int)


def test_progress_is_quiet_in_batch(monkeypatch):
    from mlsys24.progress import batch_mode, progress

    monkeypatch.setenv("MLSYS24_BATCH", "1")
    xs = [1, 2, 3]
    assert batch_mode() and progress(xs) is xs
    monkeypatch.delenv("MLSYS24_BATCH")
    monkeypatch.delenv("CI", raising=False)
    bar = progress(xs, desc="x")
    assert list(bar) == xs and bar is not xs
