"""Real English text for perplexity: the Wikipedia excerpt shipped inside the ``gensim`` wheel.

No model hub or dataset server is reachable here, but PyPI is, and the gensim wheel carries
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``:
a MediaWiki XML dump of the first Wikipedia pages (2016), about 100 real articles. This module

1. downloads one pinned gensim wheel (a fixed platform tag, so one sha256 everywhere) into
   ``<cache>/wheels`` once and checks its sha256 (:func:`fetch_gensim_wheel`);
2. reads the dump straight out of the wheel (zipfile + bz2 + ElementTree, nothing unzipped to
   disk), keeps main-namespace pages that are not redirects, and turns their markup into plain
   prose (:func:`wikipedia_articles`, :func:`clean_wikitext`);
3. caches the articles, and their join into one text, under ``<cache>/corpus`` with a checksum,
   verified on every read (:func:`corpus_articles`, :func:`corpus_text`);
4. draws token windows across the articles, reproducibly from a seed, never across an article
   boundary and at most one per article while articles remain (:func:`sample_windows`,
   :func:`draw_windows`).

``cache`` is the cache root everywhere: an explicit directory, or ``None`` for
:func:`tq.core.codebook.cache_dir` (``$TQ_CACHE_DIR``, default ``~/.cache/tq``). Nothing here is
tokenizer-specific: callers pass their own model's tokenizer (:func:`draw_windows`) or tokenize
:func:`corpus_text` themselves.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import os
import re
import subprocess
import sys
import tempfile
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from tq.core.codebook import cache_dir
from tq.core.fileio import (
    CHECKSUM_KEY,
    CacheWarning,
    atomic_write_bytes,
    read_cache_json,
    read_checked_json,
    sha256_file,
    write_checked_json,
)

GENSIM_VERSION = "4.4.0"
# One wheel, whatever machine runs this: pip is asked for this platform tag explicitly.
GENSIM_WHEEL = f"gensim-{GENSIM_VERSION}-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
GENSIM_WHEEL_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
WIKIPEDIA_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
PIP_DOWNLOAD_COMMAND = (
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
    "--implementation", "cp", "--abi", "cp311", f"gensim=={GENSIM_VERSION}",
)  # fmt: skip
_PIP_TIMEOUT_S = 900
_CORPUS_FORMAT = "tq.corpus/2"


class CorpusError(RuntimeError):
    """The corpus cannot be built: a wheel with the wrong checksum, or a dump without articles."""


class WheelDownloadError(CorpusError):
    """``pip download`` failed, typically because PyPI (or the configured index) is unreachable."""


def _root(cache: str | os.PathLike | None) -> Path:
    return Path(cache) if cache is not None else cache_dir()


def fetch_gensim_wheel(cache: str | os.PathLike | None = None) -> Path:
    """The pinned gensim wheel (about 28 MB), downloaded once into ``<cache>/wheels``.

    A cached wheel is used if its sha256 matches (checked on every call: 28 MB, milliseconds);
    otherwise (with a :class:`~tq.core.fileio.CacheWarning` naming it) the wheel is downloaded with
    :data:`PIP_DOWNLOAD_COMMAND` into a temporary directory, checked, and renamed into place.

    Raises:
        WheelDownloadError: pip failed or timed out (the message names the command and pip's
            last output lines).
        CorpusError: the downloaded wheel's sha256 is not the pinned one.
    """
    wheels = _root(cache) / "wheels"
    target = wheels / GENSIM_WHEEL
    if target.is_file():
        if sha256_file(target) == GENSIM_WHEEL_SHA256:
            return target
        warnings.warn(f"{target}: not the pinned sha256; downloading it again", CacheWarning, stacklevel=2)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        command = [*PIP_DOWNLOAD_COMMAND, "-d", tmp]
        shown = " ".join(command)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise WheelDownloadError(
                f"`{shown}` did not finish in {_PIP_TIMEOUT_S} s: PyPI must be reachable to fetch "
                f"the Wikipedia text in the gensim wheel"
            ) from None
        downloaded = Path(tmp) / GENSIM_WHEEL
        if result.returncode != 0 or not downloaded.is_file():
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
            raise WheelDownloadError(
                f"`{shown}` failed (exit {result.returncode}); PyPI must be reachable to fetch the "
                f"Wikipedia text in the gensim wheel ({GENSIM_WHEEL}). pip said:\n{tail}"
            )
        digest = sha256_file(downloaded)
        if digest != GENSIM_WHEEL_SHA256:
            raise CorpusError(f"{GENSIM_WHEEL}: sha256 {digest}, expected {GENSIM_WHEEL_SHA256}")
        os.replace(downloaded, target)
    return target


# --- Wikitext to plain text -------------------------------------------------------------------

# Sections that hold citations and link lists, not prose; dropped with their subsections.
_DROPPED_SECTIONS = frozenset(
    {
        "references", "notes", "footnotes", "citations", "sources", "bibliography",
        "further reading", "external links", "see also", "notes and references",
    }
)  # fmt: skip
# Elements whose content is not prose (formulas, galleries, code listings, reference lists).
_DROPPED_ELEMENTS = "math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero|references|ce"
# Tags that break a line when rendered; every other tag is removed and its content kept.
_BLOCK_TAGS = frozenset({"br", "p", "div", "blockquote", "center", "poem", "li", "ol", "ul", "hr"})
# Link namespaces that render as media or page metadata, not as text.
_HIDDEN_LINKS = re.compile(r"\s*(?:file|image|media|category)\s*:", re.IGNORECASE)
# Interlanguage links: a lowercase language code (en, simple, zh-min-nan, ...) and a colon.
_INTERLANGUAGE = re.compile(r"[a-z]{2,}(?:-[a-z]+)*:")

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*/\s*>", re.IGNORECASE)
_REF = re.compile(r"<ref\b[^>]*>.*?(?:</ref\s*>|\Z)", re.IGNORECASE | re.DOTALL)
_DROPPED_ELEMENT = re.compile(
    rf"<({_DROPPED_ELEMENTS})\b[^>]*?(?:/>|>.*?</\1\s*>)", re.IGNORECASE | re.DOTALL
)
# Innermost constructs (nothing of the same kind inside): removing them repeatedly removes nesting.
_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.DOTALL)
_WIKILINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.DOTALL)
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]", re.IGNORECASE)
_TAG = re.compile(r"</?([a-zA-Z][a-zA-Z0-9]*)\b[^<>]*>")
_BOLD_ITALIC = re.compile(r"'''''|'''|''")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HORIZONTAL_RULE = re.compile(r"^-{4,}\s*$")
_SPACES = re.compile(r"[^\S\n]+")
_PAREN_OPENING = re.compile(r"\((?:\s|[,;:])+")
_EMPTY_PARENS = re.compile(r"\(\)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" +([.,;:!?)])")
_ALPHANUMERIC = re.compile(r"\w")
_CONVERT_RANGE = frozenset({"-", "\u2013", "to", "and", "or", "by", "x", "\u00d7", "+/-", "\u00b1"})


def _split_arguments(body: str) -> list[str]:
    """Split a template body at ``|`` characters that are outside ``[[...]]`` links."""
    parts, depth, start = [], 0, 0
    for match in re.finditer(r"\[\[|\]\]|\|", body):
        token = match.group()
        if token == "[[":
            depth += 1
        elif token == "]]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            parts.append(body[start : match.start()])
            start = match.end()
    parts.append(body[start:])
    return [part.strip() for part in parts]


def _render_template(match: re.Match[str]) -> str:
    """Keep the text of the few inline templates that stand for words; drop every other one."""
    name, *arguments = _split_arguments(match.group(1))
    positional = [arg for arg in arguments if "=" not in arg]
    name = name.lower().replace("_", " ").strip()
    if name in {"lang", "transl"} and len(positional) >= 2:
        return positional[-1]
    if name in {"nowrap", "small", "nihongo"} and positional:
        return positional[0]
    if name in {"convert", "cvt"} and len(positional) >= 2:
        if positional[1] in _CONVERT_RANGE and len(positional) >= 4:
            return " ".join(positional[:4])
        return " ".join(positional[:2])
    return ""


def _render_link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if _HIDDEN_LINKS.match(target):
        return ""
    if target.startswith(":"):  # [[:Category:X]] is a visible link to the category page
        target = target[1:]
    elif not label and _INTERLANGUAGE.match(target):
        return ""
    return label.strip() or target.strip()


def _replace_innermost(
    pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str], text: str
) -> str:
    """Apply ``pattern.sub`` until nothing matches: nested constructs go from the inside out."""
    while True:
        text, count = pattern.subn(replacement, text)
        if count == 0:
            return text


def _drop_sections(lines: list[str]) -> Iterator[str]:
    """Skip each section in :data:`_DROPPED_SECTIONS` up to the next heading of its level or above."""
    skip_level = 0
    for line in lines:
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level > skip_level:
                continue
            skip_level = level if heading.group(2).strip(" :").lower() in _DROPPED_SECTIONS else 0
        if not skip_level:
            yield line


def _render_tag(match: re.Match[str]) -> str:
    return "\n" if match.group(1).lower() in _BLOCK_TAGS else ""


def _plain_lines(text: str) -> Iterator[str]:
    """Line-level markup: headings become their own paragraph, list markers, rules and lines
    with no letter or digit (leftovers of removed markup) go; blank lines separate paragraphs."""
    for raw in text.split("\n"):
        line = _SPACES.sub(" ", raw).strip()
        heading = _HEADING.match(line)
        if heading:
            yield ""
            yield heading.group(2)
            yield ""
            continue
        line = _LIST_MARKER.sub("", line)
        if _HORIZONTAL_RULE.match(line):
            line = ""
        if line and not _ALPHANUMERIC.search(line):
            continue
        yield line


def clean_wikitext(markup: str) -> str:
    """Turn MediaWiki markup into plain prose (one article body in, its text out).

    Rules, in the order applied:

    - HTML comments go; sections titled References, Notes, Sources, Bibliography, Further
      reading, External links, See also (and similar) go with their subsections.
    - ``<ref>...</ref>`` and ``<ref .../>`` go, and so do non-prose elements with their content:
      ``<math>``, ``<gallery>``, ``<source>``/``<syntaxhighlight>``, ``<timeline>``,
      ``<references>``, ...
    - Templates ``{{...}}`` go, nested ones included, except a few inline templates that stand for
      words: ``{{lang|xx|text}}`` and ``{{transl|xx|text}}`` -> text, ``{{nowrap|text}}``,
      ``{{small|text}}`` and ``{{nihongo|text|...}}`` -> text, ``{{convert|10|km|...}}`` ->
      ``10 km`` (``{{convert|1|to|2|km}}`` -> ``1 to 2 km``).
    - Tables ``{| ... |}`` go, nested ones included.
    - External links ``[http://x label]`` -> label; without a label they go.
    - Wiki links ``[[target|label]]`` -> label, ``[[target]]`` -> target; ``[[File:...]]``,
      ``[[Image:...]]``, ``[[Media:...]]`` and ``[[Category:...]]`` go whole (links nested in
      their captions too), and so do interlanguage links (``[[de:...]]``, no label);
      ``[[:Category:X]]`` -> ``Category:X``.
    - Remaining HTML tags go, their content kept; ``<br>``, ``<p>``, ``<div>``, ``<blockquote>``
      and other block tags become line breaks.
    - Bold and italic quotes (``'''''``, ``'''``, ``''``) and magic words (``__NOTOC__``) go.
    - Headings ``== X ==`` become ``X`` as a paragraph of its own (kept, not dropped); list
      markers (``*``, ``#``, ``:``, ``;``) and horizontal rules go.
    - HTML entities are decoded (``&amp;`` -> ``&``, ``&nbsp;`` -> a space).
    - Whitespace: runs of spaces collapse to one, lines are stripped, empty parentheses and
      spaces before punctuation left by removed markup go (``(; born 1950)`` -> ``(born 1950)``),
      lines with no letter or digit go, a line emptied by removed markup (a table, a template
      on its own line) ends a paragraph, and paragraphs are separated by exactly one blank line.
    """
    text = _COMMENT.sub("", markup)
    text = "\n".join(_drop_sections(text.split("\n")))
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _replace_innermost(_TEMPLATE, _render_template, text)
    text = _replace_innermost(_TABLE, "", text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _replace_innermost(_WIKILINK, _render_link, text)
    text = _TAG.sub(_render_tag, text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text)
    text = _SPACES.sub(" ", text)
    text = _PAREN_OPENING.sub("(", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    paragraphs = "\n".join(_plain_lines(text)).split("\n\n")
    return "\n\n".join(p.strip("\n") for p in paragraphs if p.strip())


# --- The dump ---------------------------------------------------------------------------------


def _local(tag: str) -> str:
    """An XML tag without its ``{namespace}``."""
    return tag.rpartition("}")[2]


def _iter_pages(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(title, markup) of each main-namespace page of a MediaWiki XML dump that is no redirect."""
    for _, element in ET.iterparse(stream, events=("end",)):
        if _local(element.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in element}
        text = next((node.text for node in element.iter() if _local(node.tag) == "text"), None) or ""
        namespace = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        is_redirect = "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT")
        if namespace == "0" and not is_redirect and "title" in fields:
            yield fields["title"].text or "", text
        element.clear()


def wikipedia_articles(
    cache: str | os.PathLike | None = None, *, wheel: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """(title, plain text) of every article in the Wikipedia dump in the gensim wheel, in dump order.

    Redirects and pages outside the main namespace are skipped, and so are articles whose text
    is empty after :func:`clean_wikitext`. The wheel is :func:`fetch_gensim_wheel` ``(cache)``
    unless ``wheel`` names a file (any zip holding :data:`WIKIPEDIA_MEMBER`).

    Raises:
        CorpusError: the dump holds no article.
    """
    path = wheel if wheel is not None else fetch_gensim_wheel(cache)
    with zipfile.ZipFile(path) as archive, archive.open(WIKIPEDIA_MEMBER) as member:
        with bz2.open(member) as stream:
            articles = [(title, clean_wikitext(markup)) for title, markup in _iter_pages(stream)]
    articles = [(title, text) for title, text in articles if text]
    if not articles:
        raise CorpusError(f"{path}: {WIKIPEDIA_MEMBER} holds no article")
    return articles


def _corpus_path(cache: str | os.PathLike | None) -> Path:
    # Keyed by this module's source, so a change to the cleaning rules never reads a stale text.
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return _root(cache) / "corpus" / f"enwiki-gensim-{GENSIM_VERSION}-{version}.json"


def _join(articles: Sequence[Sequence[str]]) -> str:
    """The corpus text of (title, body) pairs: see :func:`corpus_text`."""
    return "\n\n".join(f"{title}\n\n{body}" for title, body in articles) + "\n"


def _corpus_problem(data: dict) -> str | None:
    """Why a verified cache file is not a corpus, or None."""
    articles = data.get("articles")
    if (
        data.get("format") != _CORPUS_FORMAT
        or not isinstance(articles, list)
        or not isinstance(data.get("text"), str)
    ):
        return f"not a {_CORPUS_FORMAT} file"
    pairs = (isinstance(a, list) and len(a) == 2 and all(isinstance(x, str) for x in a) for a in articles)
    if not articles or not all(pairs):
        return "its articles are not a non-empty list of (title, text) pairs"
    if data["text"] != _join(articles):
        return "its text is not the join of its articles"
    return None


def _corpus(cache: str | os.PathLike | None) -> dict:
    """The verified cache file of the corpus (articles and text), written first if need be."""
    path = _corpus_path(cache)
    cached = read_cache_json(path, _corpus_problem, "extracting the text again")
    if cached is not None:
        return cached
    articles = [[title, body] for title, body in wikipedia_articles(cache)]
    data = {"format": _CORPUS_FORMAT, "articles": articles, "text": _join(articles)}
    write_checked_json(path, data)
    return data


def corpus_articles(cache: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(title, plain text) of every article of :func:`wikipedia_articles`, in dump order, cached
    on disk in the same file as :func:`corpus_text` (read, verified and rebuilt the same way)."""
    return [(title, body) for title, body in _corpus(cache)["articles"]]


def write_corpus_files(
    text_path: str | os.PathLike, articles_path: str | os.PathLike, cache: str | os.PathLike | None = None
) -> str:
    """Write the corpus for jobs that must read it as files of their own (the pipeline's corpus
    rule), each atomically: its text (:func:`corpus_text`) as UTF-8 to ``text_path``, and its
    articles and text as a checksummed JSON file to ``articles_path``, which the jobs that draw
    windows read with :func:`read_corpus_file`, needing neither the cache nor PyPI. Returns the
    text."""
    data = {key: value for key, value in _corpus(cache).items() if key != CHECKSUM_KEY}
    atomic_write_bytes(text_path, data["text"].encode("utf-8"))
    write_checked_json(articles_path, data)
    return data["text"]


def read_corpus_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(title, plain text) of every article of the articles file of :func:`write_corpus_files`.

    Raises:
        OSError: it cannot be read; ChecksumError: it does not match its checksum;
        CorpusError: it is not a corpus (the message says why).
    """
    data = read_checked_json(path)
    problem = _corpus_problem(data)
    if problem is not None:
        raise CorpusError(f"{path}: {problem}")
    return [(title, body) for title, body in data["articles"]]


def corpus_text(cache: str | os.PathLike | None = None) -> str:
    """All articles of :func:`corpus_articles` as one UTF-8 text, cached on disk.

    Each article is its title on a line of its own, a blank line, then its paragraphs; articles
    are separated by a blank line, and the text ends with a newline. The articles and this text
    are written atomically to one file under ``<cache>/corpus/``, a checksummed JSON file
    (:func:`tq.core.fileio.write_checked_json`; the file name carries the gensim version and a hash of
    this module's source), and later calls read that file if it verifies (else the articles are
    extracted again and the file rewritten, with a :class:`~tq.core.fileio.CacheWarning`).
    """
    return _corpus(cache)["text"]


# --- Token windows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextWindow:
    """Where a window of tokens was cut: article ``article`` (an index into
    :func:`corpus_articles`, titled ``title``), from token ``offset`` of its token ids."""

    article: int
    title: str
    offset: int


def sample_windows(
    article_tokens: Sequence[Sequence[int]], titles: Sequence[str], count: int, window: int, seed: int
) -> list[TextWindow]:
    """``count`` windows of ``window`` tokens spread over the articles, reproducibly from ``seed``.

    Each article of ``n >= window`` tokens is cut into ``slots = n // window`` adjacent,
    non-overlapping slots after a random phase in ``[0, n - slots * window]``, and its slots are
    taken in a random order. Windows are drawn in rounds: in round r every article with more than
    r slots gives its r-th slot, the articles in a random order (drawn anew each round), so every
    long-enough article gives one window before any gives a second. Hence a window never crosses
    an article boundary, an article shorter than ``window`` tokens gives none, and windows inside
    one article never overlap. Only the lengths of ``article_tokens`` are read.

    All randomness comes from ``numpy.random.default_rng(seed)``, drawn in a fixed order (every
    phase and slot order first, then one article order per round): the same arguments give the
    same windows, and the windows for ``count`` are the first ``count`` of those for any larger
    count.

    Returns:
        The windows in the order they were drawn.

    Raises:
        ValueError: ``count`` or ``window`` is below 1, ``article_tokens`` and ``titles`` differ in
            length, or the articles hold fewer than ``count`` windows of ``window`` tokens (the
            message says how many they hold).
    """
    for name, value in (("count", count), ("window", window)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if len(article_tokens) != len(titles):
        raise ValueError(f"{len(article_tokens)} token sequences for {len(titles)} titles")
    rng = np.random.default_rng(seed)
    slots: list[list[int]] = []  # per article: its windows' offsets, in the order they are taken
    for tokens in article_tokens:
        n = len(tokens)
        k = n // window
        if k == 0:
            slots.append([])
            continue
        phase = int(rng.integers(0, n - k * window, endpoint=True))
        slots.append([phase + window * int(i) for i in rng.permutation(k)])
    held = sum(len(s) for s in slots)
    if held < count:
        long_articles = sum(1 for s in slots if s)
        raise ValueError(
            f"the text holds {held} windows of {window} tokens ({long_articles} of its "
            f"{len(slots)} articles have at least {window} tokens), {count} requested"
        )
    windows: list[TextWindow] = []
    for round_ in range(max(len(s) for s in slots)):
        for article in rng.permutation([i for i, s in enumerate(slots) if len(s) > round_]):
            article = int(article)
            windows.append(TextWindow(article, titles[article], slots[article][round_]))
            if len(windows) == count:
                return windows
    raise AssertionError(f"drew {len(windows)} of {count} windows")  # unreachable: held >= count


def article_tokens(
    encode: Callable[[str], Sequence[int]],
    cache: str | os.PathLike | None = None,
    corpus_file: str | os.PathLike | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Every article of the corpus encoded on its own, as ``title + "\\n\\n" + body``, by
    ``encode``: int64 token ids per article, and the titles. The articles are those of
    ``corpus_file`` (:func:`read_corpus_file`), or else :func:`corpus_articles` ``(cache)``."""
    articles = read_corpus_file(corpus_file) if corpus_file is not None else corpus_articles(cache)
    tokens = [np.asarray(encode(f"{title}\n\n{body}"), dtype=np.int64) for title, body in articles]
    return tokens, [title for title, _ in articles]


def draw_windows(
    encode: Callable[[str], Sequence[int]],
    count: int,
    window: int,
    seed: int,
    cache: str | os.PathLike | None = None,
    corpus_file: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[TextWindow]]:
    """``count`` windows of ``window`` tokens from across the corpus's articles (``corpus_file``,
    else :func:`corpus_articles` ``(cache)``; see :func:`article_tokens`).

    Each article is encoded on its own by ``encode`` (:func:`article_tokens`; e.g. a model
    bundle's ``encode``), and its ids are taken as they come: special tokens that ``encode``
    adds are part of the article's ids (a BOS that it puts first is the first token of the
    article, so only a window at offset 0 starts with it; SmolLM2's ``encode`` adds none). The
    windows are :func:`sample_windows` of those ids.

    Returns:
        The windows' token ids, int64 [count, window], row i cut from the article of window i;
        and the windows, in the order they were drawn.

    Raises:
        ValueError: as :func:`sample_windows` (too few windows of that length in the text).
    """
    tokens, titles = article_tokens(encode, cache, corpus_file)
    windows = sample_windows(tokens, titles, count, window, seed)
    ids = np.stack([tokens[w.article][w.offset : w.offset + window] for w in windows])
    return ids, windows
