import pytest

from ._util import small_model


@pytest.fixture
def model():
    return small_model()


@pytest.fixture
def gqa_model():
    return small_model(n_kv_heads=2)
