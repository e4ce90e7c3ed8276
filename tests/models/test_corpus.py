import hashlib

from mlsys24.models import DOC_SEP, iter_documents, load_split, load_split_bytes
from mlsys24.models.corpus import manifest, split_of


def test_manifest_matches_committed_documents():
    man = manifest()
    assert man["python_version"] == "3.11.7"
    files = {f["path"]: f for f in man["files"]}
    seen = set()
    for split in ("train", "validation"):
        docs = list(iter_documents(split))
        assert [p for p, _ in docs] == sorted(p for p, _ in docs)
        for path, text in docs:
            f = files[path]
            b = text.encode("utf-8")
            assert f["split"] == split == split_of(path)
            assert f["bytes"] == len(b) and f["sha256"] == hashlib.sha256(b).hexdigest()
            assert DOC_SEP not in text
            seen.add(path)
        stream = load_split_bytes(split)
        assert hashlib.sha256(stream).hexdigest() == man["splits"][split]["stream_sha256"]
        assert len(stream) == man["splits"][split]["bytes"]
    assert seen == set(files)


def test_splits_are_disjoint_and_sized():
    tr = {p for p, _ in iter_documents("train")}
    va = {p for p, _ in iter_documents("validation")}
    assert not tr & va
    n_tr, n_va = len(load_split_bytes("train")), len(load_split_bytes("validation"))
    assert 0.02 < n_va / (n_tr + n_va) < 0.10
    assert not any(p.startswith(("test/", "idlelib/", "tkinter/", "lib2to3/")) for p in tr | va)
    assert isinstance(load_split("validation", as_bytes=False), str)
