import numpy as np
import pytest

from mlsys24.models import ByteTrigram


@pytest.mark.parametrize("method", ["kn", "add_k"])
def test_distributions_normalise(method):
    rng = np.random.default_rng(0)
    data = bytes(rng.integers(97, 110, 5000, dtype=np.uint8)) + b"def f(x):\n    return x\n" * 50
    m = ByteTrigram(method).fit(data)
    cs = np.arange(256)
    for a, b in [(ord("d"), ord("e")), (0, 0), (ord("a"), 250), (255, 255)]:
        p = m.prob(np.full(256, a), np.full(256, b), cs)
        assert np.all(p > 0)
        assert abs(p.sum() - 1) < 1e-9


def test_kn_beats_add_k_and_uniform_on_held_out_text():
    text = b"def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40
    held = b"def g(y):\n    return y + 2\n"
    kn, ak = ByteTrigram("kn").fit(text), ByteTrigram("add_k", k=1.0).fit(text)
    assert kn.evaluate(held)["loss"] < ak.evaluate(held)["loss"] < np.log(256)
    assert kn.evaluate(held)["n_tokens"] == len(held) - 1
