"""Where documents come from: the gensim wheel's test corpora, local files, or C4 over the network.

Each source yields ``Document``s whose id names the source and the position in it ("lee-0042"),
so an id stays the same whatever is dropped or cut later.
"""

from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.corpus_wiki import article_text, iter_wiki_articles

GENSIM_VERSION = "4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Tried after the running interpreter's own platform: a wheel known to exist on PyPI, since only
#: its data files are read, never its compiled code.
GENSIM_FALLBACK_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")
C4_DATASET = ("allenai/c4", "en")
NAMED_SOURCES = ("gensim-lee", "gensim-wiki", "c4")
#: Fields a .jsonl source may carry its text in, in order of preference.
JSONL_TEXT_FIELDS = ("prompt", "text")


class CorpusError(RuntimeError):
    """A source cannot be read: names the source, file or line at fault."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dejavu-llama"


def _pip_download(dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *extra]
    return subprocess.run([*command, f"gensim=={GENSIM_VERSION}", "-d", str(dest)], capture_output=True, text=True)


def gensim_wheel(cache_dir: str | Path | None = None) -> Path:
    """The gensim wheel in the cache, downloaded with pip on first use (moved in whole, never half-written)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pattern = f"gensim-{GENSIM_VERSION}-*.whl"
    cached = sorted(cache.glob(pattern))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = _pip_download(Path(tmp))
        if result.returncode != 0:
            result = _pip_download(Path(tmp), *GENSIM_FALLBACK_PLATFORM)
        wheels = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not wheels:
            raise CorpusError(
                f"cannot download gensim=={GENSIM_VERSION} from PyPI into {cache} (needs a network, "
                f"or put the wheel there by hand): {result.stderr.strip()[-500:]}"
            )
        return Path(shutil.move(wheels[0], cache / wheels[0].name))


def _open_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipExtFile]:
    try:
        archive = zipfile.ZipFile(wheel)
        return archive, archive.open(member)
    except zipfile.BadZipFile:
        raise CorpusError(f"{wheel}: not a valid wheel (a broken download? delete it to fetch it again)") from None
    except KeyError:
        raise CorpusError(f"{wheel}: has no member {member}") from None


def _lee_documents(wheel: Path) -> Iterator[Document]:
    archive, member = _open_member(wheel, LEE_MEMBER)
    with archive, member:
        for i, line in enumerate(member.read().decode("utf-8").splitlines()):
            yield Document(f"lee-{i:04d}", line)


def _wiki_documents(wheel: Path) -> Iterator[Document]:
    archive, member = _open_member(wheel, WIKI_MEMBER)
    with archive, member, bz2.open(member) as xml_stream:
        for i, (_, wikitext) in enumerate(iter_wiki_articles(xml_stream)):
            yield Document(f"wiki-{i:04d}", article_text(wikitext))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _txt_documents(path: Path, one_per_line: bool) -> Iterator[Document]:
    text = _read_text(path)
    chunks = text.splitlines() if one_per_line else re.split(r"\n\s*\n", text)
    prefix = _id_prefix(path)
    for i, chunk in enumerate(chunks):
        yield Document(f"{prefix}-{i:04d}", chunk)


def _id_prefix(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem) or "doc"


def iter_jsonl_texts(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSON-lines file, the text taken from "prompt" or "text"."""
    path = Path(path)
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})") from None
        field = next((f for f in JSONL_TEXT_FIELDS if isinstance(record, dict) and f in record), None)
        if field is None or not isinstance(record[field], str):
            raise CorpusError(f"{path}:{number}: expected an object with a string field 'prompt' or 'text'")
        yield number, record[field]


def _jsonl_documents(path: Path) -> Iterator[Document]:
    prefix = _id_prefix(path)
    for number, text in iter_jsonl_texts(path):
        yield Document(f"{prefix}-{number - 1:04d}", text)


def _c4_documents() -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "source 'c4' needs the optional `datasets` package (pip install datasets) and a network; "
            "offline, use gensim-lee, gensim-wiki or a local .txt/.jsonl file"
        ) from None
    name, config = C4_DATASET
    try:
        stream = datasets.load_dataset(name, config, split="validation", streaming=True)
        for i, row in enumerate(stream):
            yield Document(f"c4-{i:06d}", row["text"])
    except Exception as e:  # the hub clients (requests, httpx, huggingface_hub) share no error base class
        raise CorpusError(
            f"cannot stream {name} ({config}, validation) from the HF hub (offline?): {e}; "
            "use gensim-lee, gensim-wiki or a local .txt/.jsonl file instead"
        ) from e


def iter_documents(source: str, cache_dir: str | Path | None = None, one_per_line: bool = False) -> Iterator[Document]:
    """Every document of a source, in source order, empty ones included (callers count what they drop)."""
    if source == "gensim-lee":
        return _lee_documents(gensim_wheel(cache_dir))
    if source == "gensim-wiki":
        return _wiki_documents(gensim_wheel(cache_dir))
    if source == "c4":
        return _c4_documents()
    path = Path(source)
    if not path.is_file():
        raise CorpusError(f"{source}: no such file, and not a named source ({', '.join(NAMED_SOURCES)})")
    if path.suffix == ".txt":
        return _txt_documents(path, one_per_line)
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    raise CorpusError(f"{path}: unknown file type {path.suffix!r} (expected .txt or .jsonl)")
