"""The workbench corpus: a fixed snapshot of CPython 3.11.7 standard-library source.

Why this text: source code repeats itself over long distances (names, signatures, idioms reappear
hundreds of lines later), which is exactly what KV-cache papers (Keyformer, H2O, Prompt Cache) need
to show, and the PSF licence lets the repository carry it.

The snapshot lives in ``data/corpus/stdlib_py311/``:

- ``train.jsonl.xz`` / ``validation.jsonl.xz`` — one JSON object per line, ``{"path", "text"}``,
  files in sorted path order;
- ``manifest.json`` — every file with its split, size in bytes and sha256;
- ``README.md`` and ``LICENSE.txt`` (the PSF licence shipped with that interpreter).

The split is file-level and deterministic: a file goes to validation iff
``int(sha256(path)[:8], 16) % 100 < VALIDATION_PERCENT``; it depends only on the relative path.

Every evaluation, document and prompt in the workbench comes from the committed validation split,
calibration data from the train split — never from the running interpreter's own stdlib, which
differs between Python versions. :func:`load_split` joins the documents of a split with the
document separator ``DOC_SEP`` (a NUL byte, which never occurs in the sources), the same stream the
model was trained on.

Rebuild (only needed to reproduce the snapshot; the committed files are the reference)::

    python -m mlsys24.models.corpus build --src /root/.pyenv/versions/3.11.7/lib/python3.11
    python -m mlsys24.models.corpus info
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CORPUS_NAME", "DOC_SEP", "SPLITS", "VALIDATION_PERCENT", "corpus_dir", "build", "split_of",
    "iter_documents", "load_split", "load_split_bytes", "manifest",
]

CORPUS_NAME = "stdlib_py311"
SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5
DOC_SEP = "\x00"  # separates documents in the training stream; byte 0 never occurs in the sources

# Selection rules (relative to the stdlib root). A file is kept iff it ends in .py and none of these
# apply. Test suites, GUI toolkits and the 2to3 tool are excluded by directory; the generated
# single-byte codec tables (encodings/cp1252.py ...) by their content marker; a few machine- or
# build-specific files by name.
EXCLUDED_TOP_DIRS = {
    "test", "idlelib", "tkinter", "lib2to3", "site-packages", "turtledemo", "ensurepip",
    "pydoc_data", "__phello__", "__pycache__",
}
EXCLUDED_DIR_NAMES = {"test", "tests", "__pycache__"}  # at any depth (ctypes/test, distutils/tests...)
EXCLUDED_FILE_NAMES = {"this.py", "__hello__.py"}  # rot13 text and a freeze-test stub
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-3.")  # build-machine specific
GENERATED_MARKER = "generated from"  # 'Python Character Mapping Codec ... generated from ...'


def corpus_dir(name: str = CORPUS_NAME) -> Path:
    from mlsys24.paths import DATA_DIR

    return DATA_DIR / "corpus" / name


def split_of(rel_path: str) -> str:
    """The split of a file, a pure function of its relative path (posix separators)."""
    h = int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16)
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def _is_selected(rel: Path, text: str) -> bool:
    parts = rel.parts
    if rel.suffix != ".py":
        return False
    if parts[0] in EXCLUDED_TOP_DIRS or parts[0].startswith(EXCLUDED_PREFIXES):
        return False
    if any(p in EXCLUDED_DIR_NAMES for p in parts[:-1]):
        return False
    name = parts[-1]
    if name in EXCLUDED_FILE_NAMES or name.startswith(EXCLUDED_PREFIXES) or name.startswith("test_"):
        return False
    if parts[0] == "encodings" and GENERATED_MARKER in text[:400] and "Character Mapping Codec" in text[:400]:
        return False
    return True


def _collect(src: Path) -> list[tuple[str, str]]:
    docs = []
    for path in sorted(src.rglob("*.py")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(src)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # every 3.11 stdlib source is UTF-8; skip anything else rather than guess
        if not _is_selected(rel, text):
            continue
        if DOC_SEP in text:
            raise ValueError(f"{rel} contains the document separator")
        docs.append((rel.as_posix(), text))
    return docs


def _write_jsonl_xz(path: Path, docs: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    for rel, text in docs:
        buf.write(json.dumps({"path": rel, "text": text}, ensure_ascii=False))
        buf.write("\n")
    data = buf.getvalue().encode("utf-8")
    # xz with a fixed preset is deterministic for a given liblzma; the manifest's sha256 of each
    # document is the real identity check.
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def build(src: str | Path, out: str | Path | None = None, python_version: str | None = None) -> dict:
    """Snapshot ``src`` (a CPython ``lib/python3.X`` directory) into ``out``; returns the manifest."""
    src = Path(src).resolve()
    out = Path(out) if out is not None else corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    docs = _collect(src)
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    files = []
    for rel, text in docs:
        s = split_of(rel)
        by_split[s].append((rel, text))
        b = text.encode("utf-8")
        files.append({"path": rel, "split": s, "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()})
    sizes = {}
    for s in SPLITS:
        _write_jsonl_xz(out / f"{s}.jsonl.xz", by_split[s])
        stream = DOC_SEP.join(t for _, t in by_split[s]).encode("utf-8")
        sizes[s] = {
            "files": len(by_split[s]),
            "bytes": len(stream),
            "compressed_bytes": (out / f"{s}.jsonl.xz").stat().st_size,
            "stream_sha256": hashlib.sha256(stream).hexdigest(),
        }
    lic = src / "LICENSE.txt"
    if lic.exists():
        (out / "LICENSE.txt").write_bytes(lic.read_bytes())
    man = {
        "name": CORPUS_NAME,
        "source": "CPython standard library (Lib/), as installed by pyenv",
        "python_version": python_version or "unknown",
        "license": "PSF License Agreement for Python (PSF-2.0); full text in LICENSE.txt",
        "split_rule": f"validation iff int(sha256(relative_path)[:8], 16) % 100 < {VALIDATION_PERCENT}",
        "doc_separator": "\\x00 (NUL) between documents in load_split()",
        "selection": {
            "suffix": ".py",
            "excluded_top_dirs": sorted(EXCLUDED_TOP_DIRS),
            "excluded_dir_names_any_depth": sorted(EXCLUDED_DIR_NAMES),
            "excluded_file_names": sorted(EXCLUDED_FILE_NAMES) + ["test_*.py"],
            "excluded_prefixes": list(EXCLUDED_PREFIXES),
            "excluded_generated": "encodings/* single-byte codec tables ('Character Mapping Codec ... "
                                  "generated from')",
        },
        "splits": sizes,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(man, indent=1) + "\n")
    return man


@lru_cache(maxsize=4)
def manifest(name: str = CORPUS_NAME) -> dict:
    return json.loads((corpus_dir(name) / "manifest.json").read_text())


@lru_cache(maxsize=4)
def _documents(split: str, name: str) -> tuple[tuple[str, str], ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = corpus_dir(name) / f"{split}.jsonl.xz"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the corpus is committed under data/corpus/{name}/")
    raw = lzma.decompress(path.read_bytes()).decode("utf-8")
    return tuple((d["path"], d["text"]) for d in map(json.loads, raw.splitlines()))


def iter_documents(split: str, name: str = CORPUS_NAME) -> Iterator[tuple[str, str]]:
    """Yield ``(relative_path, text)`` for every file of ``split``, in sorted path order."""
    yield from _documents(split, name)


@lru_cache(maxsize=4)
def load_split_bytes(split: str, name: str = CORPUS_NAME) -> bytes:
    """The split as one UTF-8 byte stream, documents joined by ``DOC_SEP``."""
    return DOC_SEP.join(t for _, t in _documents(split, name)).encode("utf-8")


def load_split(split: str, name: str = CORPUS_NAME, *, as_bytes: bool = True) -> bytes | str:
    """The whole split as one stream (bytes by default; ``as_bytes=False`` gives ``str``)."""
    b = load_split_bytes(split, name)
    return b if as_bytes else b.decode("utf-8")


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlsys24.models.corpus", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="snapshot a CPython lib directory")
    b.add_argument("--src", default="/root/.pyenv/versions/3.11.7/lib/python3.11")
    b.add_argument("--out", default=None, help="default: data/corpus/stdlib_py311")
    b.add_argument("--python-version", default=None,
                   help="recorded in the manifest; default: read from the interpreter beside --src")
    sub.add_parser("info", help="print split sizes of the committed snapshot")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        ver = args.python_version
        if ver is None:
            import subprocess

            exe = Path(args.src).resolve().parents[1] / "bin" / "python3"
            try:
                ver = subprocess.run([str(exe), "-c", "import platform;print(platform.python_version())"],
                                     capture_output=True, text=True, check=True).stdout.strip()
            except (OSError, subprocess.CalledProcessError):
                ver = "unknown"
        man = build(args.src, args.out, ver)
    else:
        man = manifest()
    print(json.dumps({"python_version": man["python_version"], "splits": man["splits"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
