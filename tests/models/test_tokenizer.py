from hypothesis import given, settings
from hypothesis import strategies as st

from mlsys24.models import ByteTokenizer, iter_documents


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(s):
    tok = ByteTokenizer()
    ids = tok.encode(s)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(s.encode("utf-8"))
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode_tensor(s)) == s


def test_round_trip_corpus_document():
    tok = ByteTokenizer()
    path, text = next(iter(iter_documents("validation")))
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(tok) == 256


def test_cut_multibyte_character_is_replaced_not_raised():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]
    assert tok.decode(ids) == "\ufffd"
