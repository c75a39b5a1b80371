"""Plain text from a MediaWiki XML export, for prompts that read like prose rather than markup.

A small regex stripper rather than a parser dependency: prompts need readable English, not a
faithful rendering, so templates, tables, references and files are dropped, links keep their
visible label, and the appendix sections (references, external links, ...) are cut off.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

#: Elements whose content is not prose: dropped whole, open tag to close tag.
_DROPPED_ELEMENTS = "ref|references|math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|ce|graph"
#: Link namespaces that render as a picture or a page tag, not as text.
_HIDDEN_LINK_NAMESPACES = {"file", "image", "media", "category"}
#: Level-2 sections that close an article: lists of sources and links, not prose.
_APPENDIX_SECTIONS = "see also|references|notes|footnotes|further reading|external links|bibliography|sources|citations"

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_SELF_CLOSED_ELEMENT = re.compile(rf"<(?:{_DROPPED_ELEMENTS})\b[^>]*/>", re.I)
_PAIRED_ELEMENT = re.compile(rf"<({_DROPPED_ELEMENTS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
#: Template braces anywhere; table braces only at the start of a line, as MediaWiki reads them.
_BLOCK_BRACE = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}", re.M)
_CLOSER_OF = {"{{": "}}", "{|": "|}"}
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
#: A link with no link inside; single brackets ("Bicyclo[1.1.0]butane") and, in file captions,
#: line breaks may occur in its text.
_INNERMOST_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*")
_LINE_BREAK_TAG = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^>]*>")
_HEADING = re.compile(r"^(={1,6})[ \t]*(.+?)[ \t]*\1[ \t]*$", re.M)
_BOLD_ITALIC = re.compile(r"'''''|'''|''")
_LIST_MARKER = re.compile(r"^[*#:;]+[ \t]*", re.M)
_RULE_OR_MAGIC_WORD = re.compile(r"^-{4,}[ \t]*$|__[A-Z]+__", re.M)
_DISAMBIGUATION = re.compile(r"\{\{\s*disambig", re.I)
_APPENDIX = re.compile(rf"^==[ \t]*(?:{_APPENDIX_SECTIONS})[ \t]*==[ \t]*$", re.M | re.I)
_EMPTY_PARENS = re.compile(r"\([\s,;]*\)")
_SPACES = re.compile(r"[ \t\xa0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;!?)])")
_SPACE_AFTER_PAREN = re.compile(r"\( +")
_BLANK_LINES = re.compile(r"\n{3,}")


def _scan_blocks(text: str) -> tuple[str, int | None]:
    """Drop balanced templates and tables; return the kept text and, if one never closes, where its body starts."""
    kept, stack, last, body_start = [], [], 0, 0
    for m in _BLOCK_BRACE.finditer(text):
        brace = m.group().strip()
        if brace in _CLOSER_OF:
            if not stack:
                kept.append(text[last : m.start()])
                body_start = m.end()
            stack.append(brace)
        elif stack and _CLOSER_OF[stack[-1]] == brace:
            stack.pop()
            if not stack:
                last = m.end()
        elif not stack:  # a stray closer: markup debris, not text
            kept.append(text[last : m.start()])
            last = m.end()
    if stack:
        return "".join(kept), body_start
    kept.append(text[last:])
    return "".join(kept), None


def _drop_templates_and_tables(text: str) -> str:
    """Nested {{templates}} and {| tables |}; an opener that never closes is dropped alone, as a typo."""
    pieces = []
    while True:
        kept, unclosed_body = _scan_blocks(text)
        pieces.append(kept)
        if unclosed_body is None:
            return "".join(pieces)
        text = text[unclosed_body:]


def _link_label(m: re.Match[str]) -> str:
    target, pipe, label = m.group(1).partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link to the category page
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _HIDDEN_LINK_NAMESPACES or (not pipe and _INTERLANGUAGE.fullmatch(prefix)):
            return ""
    if pipe and not label.strip():  # the pipe trick: [[Paris (France)|]] shows "Paris"
        return re.sub(r"\s*\(.*\)$", "", target.split(":")[-1])
    return label if pipe else target


def _replace_links(text: str) -> str:
    """Innermost links first, so a file caption's own links are resolved before the file is dropped."""
    while True:
        replaced = _INNERMOST_LINK.sub(_link_label, text)
        if replaced == text:
            return text
        text = replaced


def _tidy_whitespace(text: str) -> str:
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_AFTER_PAREN.sub("(", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def strip_wikitext(wikitext: str) -> str:
    """Wikitext to plain text: markup removed, link labels, headings and emphasised words kept."""
    text = _COMMENT.sub("", wikitext)
    text = _PAIRED_ELEMENT.sub("", _SELF_CLOSED_ELEMENT.sub("", text))
    # Emphasis before templates, so ''{{x}}'' does not leave four quotes that read as an apostrophe.
    text = _BOLD_ITALIC.sub("", text)
    text = _drop_templates_and_tables(text)
    text = _replace_links(_EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text))
    text = _TAG.sub("", _LINE_BREAK_TAG.sub(" ", text))
    text = _HEADING.sub(r"\2", text)
    text = _RULE_OR_MAGIC_WORD.sub("", _LIST_MARKER.sub("", text))
    return _tidy_whitespace(html.unescape(text))


def article_text(wikitext: str) -> str:
    """An article's prose: the text before its first appendix section, stripped of markup."""
    m = _APPENDIX.search(wikitext)
    return strip_wikitext(wikitext[: m.start()] if m else wikitext)


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(xml_stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each article, streaming the export.

    Only main-namespace pages; redirects and disambiguation pages (lists of links) are skipped.
    """
    for _, element in ET.iterparse(xml_stream):
        if _local_name(element.tag) != "page":
            continue
        fields = {_local_name(child.tag): child for child in element.iter()}
        wikitext = (fields["text"].text if "text" in fields else None) or ""
        is_redirect = "redirect" in fields or wikitext.lstrip()[:9].upper() == "#REDIRECT"
        is_disambiguation = _DISAMBIGUATION.search(wikitext) is not None
        if fields.get("ns") is not None and fields["ns"].text == "0" and not (is_redirect or is_disambiguation):
            yield fields["title"].text if "title" in fields else "", wikitext
        element.clear()
