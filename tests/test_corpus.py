"""Corpus preparation: wiki stripping, sources, cutting to a token limit, the split, the files written."""

from __future__ import annotations

import bz2
import json
import sys
import types
import zipfile
from pathlib import Path

import pytest
from conftest import tokenizer_for_tiny_model

from engine.corpus import (
    count_tokens,
    cut_to_tokens,
    cut_to_words,
    load_documents,
    main,
    prepare_corpus,
    read_prompts_texts,
    split_documents,
)
from engine.corpus_sources import LEE_MEMBER, WIKI_MEMBER, CorpusError, Document, iter_documents
from engine.corpus_wiki import article_text, strip_wikitext
from engine.tokenizer import load_tokenizer

# ---- the wiki stripper --------------------------------------------------------------------


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("'''Albedo''' is ''diffuse'' reflectivity.", "Albedo is diffuse reflectivity."),
        ("Alice''''s cat", "Alice's cat"),
        (
            "A [[political philosophy]] that [[self-governance|self-governed]] [[state]]s",
            "A political philosophy that self-governed states",
        ),
        ("See [[Paris (France)|]] and [[:Category:Cities]].", "See Paris and Category:Cities."),
        ("Text.[[Category:Anarchism]][[de:Anarchismus]]", "Text."),
        ("[[File:X.jpg|thumb|A [[cat|kitten]] on [[mat]]]]Body", "Body"),
        ("[[Image:C4.png|thumb|Bicyclo[1.1.0]butane,\nsee [[alkane]]]]Alkanes", "Alkanes"),
        ("Born {{birth date|1809|2|12}} in {{nowrap|{{flag|USA}} Kentucky}}.", "Born in."),
        ("''{{GGY}}'' (UK)", "(UK)"),
        ('Before\n{| class="wikitable"\n|-\n| {{x}} || cell\n|}\nAfter', "Before\n\nAfter"),
        ("Stateless.<ref>Woodcock, ''Anarchism'', p. 7</ref><ref name=\"a/b\"/> Next", "Stateless. Next"),
        ("x<!-- hidden {{tpl}} --> y <math>E=mc^2</math>z", "x y z"),
        ("== History ==\nText\n=== Origins ===\nMore", "History\nText\nOrigins\nMore"),
        ("[http://example.org Kropotkin's essay] and [http://example.org/2]", "Kropotkin's essay and"),
        ("a&nbsp;b &amp; c &ndash; d<br/>e <small>f</small>", "a b & c \u2013 d e f"),
        ("Greek ({{lang-grc|ἀναρχία}}) word , ok", "Greek word, ok"),
        ("* one\n# two\n: three\n----\n__TOC__", "one\ntwo\nthree"),
        ("keep {{a|}} stray }} end", "keep stray end"),
    ],
)
def test_strip_wikitext(wikitext, expected):
    assert strip_wikitext(wikitext) == expected


def test_unclosed_template_drops_only_its_opener():
    assert strip_wikitext("a {{b {{c}} d") == "a b d"


def test_article_text_stops_at_the_appendix():
    wikitext = "Intro.\n== Life ==\nBorn.\n== See also ==\n* [[Other]]\n== References ==\n{{reflist}}"
    assert article_text(wikitext) == "Intro.\nLife\nBorn."


# ---- sources ------------------------------------------------------------------------------


def _wiki_export(pages: list[tuple[str, int, str, bool]]) -> bytes:
    """A MediaWiki XML export of (title, namespace, wikitext, is_redirect) pages."""
    xml = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">']
    for title, ns, text, redirect in pages:
        flag = f'<redirect title="{text}" />' if redirect else ""
        xml.append(f"<page><title>{title}</title><ns>{ns}</ns>{flag}<revision><text>{text}</text></revision></page>")
    return "\n".join([*xml, "</mediawiki>"]).encode()


@pytest.fixture
def fake_gensim_cache(tmp_path) -> Path:
    """A cache dir holding a wheel-shaped zip with the two corpora at gensim's member paths."""
    pages = [
        ("Albedo", 0, "'''Albedo''' is [[light|reflected light]].{{cite|x}}", False),
        ("AccessibleComputing", 0, "Computer accessibility", True),
        ("Talk:Albedo", 1, "chatter", False),
        ("Austin (disambiguation)", 0, "{{disambiguation}}", False),
        ("Anarchism", 0, "Anarchism is a [[political philosophy]].", False),
    ]
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / "gensim-4.4.0-cp311-cp311-fake.whl", "w") as wheel:
        wheel.writestr(LEE_MEMBER, "First article.\n\nSecond article.\nFirst article.\n")
        wheel.writestr(WIKI_MEMBER, bz2.compress(_wiki_export(pages)))
    return cache


def test_gensim_sources_read_the_cached_wheel(fake_gensim_cache):
    lee = list(iter_documents("gensim-lee", fake_gensim_cache))
    assert lee == [
        Document("lee-0000", "First article."),
        Document("lee-0001", ""),
        Document("lee-0002", "Second article."),
        Document("lee-0003", "First article."),
    ]
    wiki = list(iter_documents("gensim-wiki", fake_gensim_cache))
    assert wiki == [
        Document("wiki-0000", "Albedo is reflected light."),
        Document("wiki-0001", "Anarchism is a political philosophy."),
    ]
    assert load_documents("gensim-lee", fake_gensim_cache, max_docs=2) == ["First article.", "Second article."]


def test_broken_wheel_is_named(tmp_path):
    (tmp_path / "gensim-4.4.0-py3-none-any.whl").write_text("not a zip")
    with pytest.raises(CorpusError, match="gensim-4.4.0-py3-none-any.whl: not a valid wheel"):
        list(iter_documents("gensim-lee", tmp_path))


def test_local_txt_sources(tmp_path):
    path = tmp_path / "my notes.txt"
    path.write_text("One para\nstill one.\n\n  \nTwo.\n\n\n")
    assert load_documents(str(path)) == ["One para\nstill one.", "Two."]
    assert load_documents(str(path), one_per_line=True) == ["One para", "still one.", "Two."]
    assert [d.id for d in iter_documents(str(path))] == ["my_notes-0000", "my_notes-0001", "my_notes-0002"]


def test_local_jsonl_source_and_prompt_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "from text"}\n\n{"prompt": "from prompt", "id": "x"}\n')
    assert [(d.id, d.text) for d in iter_documents(str(path))] == [
        ("docs-0000", "from text"),
        ("docs-0002", "from prompt"),
    ]
    assert read_prompts_texts(path) == ["from text", "from prompt"]


@pytest.mark.parametrize(
    "line, message",
    [('{"prompt": "ok"', r"bad\.jsonl:2: malformed JSON"), ('{"prompt": 3}', r"bad\.jsonl:2: expected an object")],
)
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=message):
        read_prompts_texts(path)


def test_unknown_source_is_named(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: no such file, and not a named source"):
        iter_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data.csv: unknown file type '.csv'"):
        iter_documents(str(tmp_path / "data.csv"))


def test_c4_without_datasets_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusError, match="needs the optional `datasets` package"):
        load_documents("c4")


def test_c4_offline_says_so(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(CorpusError, match=r"cannot stream allenai/c4 .* \(offline\?\)"):
        load_documents("c4", max_docs=3)


def test_c4_streams_only_what_is_asked(monkeypatch):
    rows = ({"text": f"doc {i}"} for i in range(10**6))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: rows))
    assert load_documents("c4", max_docs=2) == ["doc 0", "doc 1"]
    assert next(rows) == {"text": "doc 2"}  # nothing read past the cap


# ---- cutting ------------------------------------------------------------------------------


def test_cut_to_words_keeps_original_spacing():
    assert cut_to_words("a  b\nc d", 3) == ("a  b\nc", 3)
    assert cut_to_words(" a b ", 5) == (" a b ", 2)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return tokenizer_for_tiny_model()


#: Words the tiny tokenizer never saw split into many tokens: a long text from a short string.
TEXT = "The quick brown fox jumps over the lazy dog. Zebras quietly juggle seventeen violet umbrellas."


@pytest.mark.parametrize("limit", [1, 2, 5, 9, 17])
def test_cut_to_tokens_keeps_the_first_tokens(tiny_tokenizer, limit):
    ids = tiny_tokenizer(TEXT)["input_ids"]
    assert len(ids) > 17
    prompt, n = cut_to_tokens(TEXT, tiny_tokenizer, limit)
    assert prompt == tiny_tokenizer.decode(ids[:limit]).rstrip()
    assert n == count_tokens(prompt, tiny_tokenizer) == limit


def test_cut_to_tokens_leaves_short_text_alone(tiny_tokenizer):
    n = count_tokens(TEXT, tiny_tokenizer)
    assert cut_to_tokens(TEXT, tiny_tokenizer, n) == (TEXT, n)


def test_cut_counts_the_bos_token():
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer_for_tiny_model().backend_tokenizer
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    assert count_tokens("", with_bos) == 1
    prompt, n = cut_to_tokens(TEXT, with_bos, 5)
    assert n == 5 and len(with_bos(prompt, add_special_tokens=False)["input_ids"]) == 4
    with pytest.raises(CorpusError, match="no room beside the 1 special token"):
        cut_to_tokens(TEXT, with_bos, 1)


# ---- split and the files written -----------------------------------------------------------


def _docs(n: int) -> list[Document]:
    return [Document(f"d-{i:04d}", f"document number {i}") for i in range(n)]


def test_split_is_disjoint_seeded_and_order_free():
    docs = _docs(50)
    train, val = split_documents(docs, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    assert {d.id for d in train}.isdisjoint(d.id for d in val)
    assert train == sorted(train, key=lambda d: d.id)  # input order kept
    assert split_documents(docs, 0.2, seed=0) == (train, val)
    assert {d.id for d in split_documents(docs[::-1], 0.2, seed=0)[1]} == {d.id for d in val}
    assert split_documents(docs, 0.2, seed=1)[1] != val


def test_split_edge_fractions():
    assert len(split_documents(_docs(5), 0.1, seed=0)[1]) == 1  # any positive fraction keeps one
    assert split_documents(_docs(5), 0.0, seed=0)[1] == []
    assert split_documents(_docs(5), 1.0, seed=0)[0] == []
    with pytest.raises(ValueError, match="not in"):
        split_documents(_docs(5), 1.5, seed=0)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_writes_splits_and_summary(fake_gensim_cache, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--source", "gensim-lee", "--out-dir", str(out), "--cache-dir", str(fake_gensim_cache)]
    assert main([*args, "--val-fraction", "0.5", "--max-new-tokens", "4"]) == 0
    train, val = _read_jsonl(out / "train.jsonl"), _read_jsonl(out / "validation.jsonl")
    # Four lines: one empty, one a duplicate of the first, so two documents, one per split.
    assert sorted(r["id"] for r in train + val) == ["lee-0000", "lee-0002"]
    assert len(train) == len(val) == 1 and all(r["max_tokens"] == 4 for r in train + val)
    summary = json.loads((out / "corpus.json").read_text())
    assert summary["counts"] == {"read": 4, "empty": 1, "duplicates": 1, "cut": 0, "train": 1, "validation": 1}
    assert summary["words"]["train"] + summary["words"]["validation"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["corpus.json", "train.jsonl", "validation.jsonl"]
    first = (out / "train.jsonl").read_bytes()
    assert main(args + ["--val-fraction", "0.5", "--max-new-tokens", "4"]) == 0
    assert (out / "train.jsonl").read_bytes() == first  # stable across runs
    assert '"counts"' in capsys.readouterr().out


def test_cli_reports_errors(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "bad.jsonl:1: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_prepare_cuts_to_the_model_context(tiny_hf_dir, tmp_path):
    """The tiny model's context is 256 tokens: with 200 new tokens a prompt keeps at most 56."""
    path = tmp_path / "long.txt"
    path.write_text(f"{TEXT * 40}\n\nshort one")
    summary = prepare_corpus(str(path), tmp_path / "out", model_name=tiny_hf_dir, max_new_tokens=200, val_fraction=0)
    assert summary["cut"] == {"unit": "tokens", "limit": 56, "max_tokens_per_doc": 2048, "max_new_tokens": 200}
    prompts = read_prompts_texts(tmp_path / "out" / "train.jsonl")
    tokenizer = load_tokenizer(tiny_hf_dir)
    assert [count_tokens(p, tokenizer) for p in prompts] == [56, count_tokens("short one", tokenizer)]
    assert summary["counts"]["cut"] == 1 and summary["tokens"]["max"] == 56


@pytest.mark.slow
def test_real_gensim_corpora(tmp_path):
    """Downloads the gensim wheel (~28 MB) from PyPI and reads both corpora whole."""
    lee = load_documents("gensim-lee", tmp_path)
    assert len(lee) == 300 and len(set(lee)) == 293  # the Lee background corpus repeats 7 articles
    wiki = load_documents("gensim-wiki", tmp_path)
    assert 95 <= len(wiki) <= 105
    assert not any(marker in text for text in wiki for marker in ("{{", "[[", "<ref", "'''"))
