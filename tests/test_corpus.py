"""tq.corpus: wikitext cleaning rules on handwritten markup, the dump reader on a handwritten dump,
the wheel download's failure modes, token windows, and the real Wikipedia text in the gensim wheel.

The real-corpus tests download the pinned gensim wheel (about 28 MB) once into the persistent
cache (``$TQ_CACHE_DIR_PERSISTENT``, else ``$TQ_CACHE_DIR`` as it was before conftest redirected
it, else ``~/.cache/tq``) and are skipped, with pip's message, when PyPI is unreachable.
"""

from __future__ import annotations

import bz2
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tq import corpus
from tq.corpus import (
    GENSIM_WHEEL,
    WIKIPEDIA_MEMBER,
    CorpusError,
    WheelDownloadError,
    clean_wikitext,
    corpus_text,
    fetch_gensim_wheel,
    token_windows,
    wikipedia_articles,
)
from tq.fileio import CacheWarning, read_checked_json

# Read at import (collection) time, before conftest's session fixture points TQ_CACHE_DIR at a
# temporary directory: the wheel is downloaded once per machine, not once per test run.
PERSISTENT_CACHE = Path(
    os.environ.get("TQ_CACHE_DIR_PERSISTENT")
    or os.environ.get("TQ_CACHE_DIR")
    or Path.home() / ".cache" / "tq"
)

# Measured on the pinned wheel: 106 articles, 442,611 words, 2,815,402 characters (DESIGN.md says
# about 450k words). Leaving the <ref> contents in would give about 477k words.
ARTICLES_RANGE = (100, 115)
WORDS_RANGE = (420_000, 470_000)
# Markup that must not survive cleaning; "http" catches leaked citations and external-link URLs.
LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "&amp;", "&nbsp;", "''", "<!--", "http")


# --- clean_wikitext on handwritten markup -----------------------------------------------------

CLEANING_CASES = {
    "template": ("A{{cite web|url=http://x|title=T}} b.", "A b."),
    "nested templates": ("A {{outer|x={{inner|{{deep}}}}|y}}b.", "A b."),
    "inline lang template": (
        "From the Greek {{lang|grc|ἀναρχία}}, anarchy.",
        "From the Greek ἀναρχία, anarchy.",
    ),
    "inline convert template": ("It is {{convert|10|km|mi}} long.", "It is 10 km long."),
    "convert range": ("Between {{convert|1|to|2|m|ft}} tall.", "Between 1 to 2 m tall."),
    "nowrap with a link": ("On {{nowrap|[[May 5|5 May]] 1900}}.", "On 5 May 1900."),
    "table": ("Before.\n{| class=x\n|-\n| a || b\n|}\nAfter.", "Before.\n\nAfter."),
    "nested tables": ("X\n{|\n| {|\n| inner\n|}\n| outer\n|}\nY", "X\n\nY"),
    "ref with content": ('Fact.<ref name="a">Smith, {{cite book|t=B}} p. 3.</ref> Next.', "Fact. Next."),
    "self-closing ref": ('Fact.<ref name="a/b" /> Next.', "Fact. Next."),
    "html comment": ("Keep<!-- drop\nthis --> this.", "Keep this."),
    "html tags kept content": ("H<sub>2</sub>O is <span style=x>water</span>.", "H2O is water."),
    "br breaks the line": ("One<br />Two", "One\nTwo"),
    "math dropped": ("Defined as <math>\\frac{a}{b}</math> here.", "Defined as here."),
    "file link with nested links": (
        "[[File:A.jpg|thumb|A [[cat|big cat]] and [[dog]]]]Text.",
        "Text.",
    ),
    "image link": ("[[Image:B.png|200px|caption]] Text.", "Text."),
    "category link": ("Text.\n[[Category:Cats]]\n[[Category:Pets|*]]", "Text."),
    "visible category link": ("See [[:Category:Cats|the cats]].", "See the cats."),
    "interlanguage links": ("Text.\n[[de:Katze]]\n[[zh-min-nan:Niau]]", "Text."),
    "interwiki link with label": ("The term [[wikt:anarchism|anarchism]].", "The term anarchism."),
    "piped link": ("A [[political philosophy|philosophy]].", "A philosophy."),
    "plain link and trail": ("Two [[cat]]s.", "Two cats."),
    "external link with label": ("See [http://example.com/x?a=1 the site] now.", "See the site now."),
    "external link without label": ("See [http://example.com/x] now.", "See now."),
    "bold and italic": ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
    "heading kept as paragraph": ("Intro.\n== History ==\nText.", "Intro.\n\nHistory\n\nText."),
    "subheading": ("Intro.\n===Early life===\nText.", "Intro.\n\nEarly life\n\nText."),
    "reference sections dropped": (
        "Body.\n== See also ==\n* [[Dog]]\n== References ==\n{{reflist}}\n=== Books ===\n* A book\n"
        "== Later ==\nMore.",
        "Body.\n\nLater\n\nMore.",
    ),
    "list markers": (
        "Items:\n* one\n** two\n# three\n: indented\n; term",
        "Items:\none\ntwo\nthree\nindented\nterm",
    ),
    "entities": ("Salt &amp; pepper&nbsp;mill &ndash; &lt;b&gt;", "Salt & pepper mill \u2013 <b>"),
    "magic word and rule": ("__NOTOC__Text.\n----\nMore.", "Text.\n\nMore."),
    "whitespace": ("A   lot \t of\n\n\n\nspace.  ", "A lot of\n\nspace."),
    "leftovers of removed templates": (
        "Aristotle ({{IPAc-en|\u02c8|æ}};, Aristotélēs; 384 BC) and Plato ({{IPA|x}}) {{cn}}.",
        "Aristotle (Aristotélēs; 384 BC) and Plato.",
    ),
    "line with no letters": ("Text.\n{{a}} . {{b}}\nMore.", "Text.\nMore."),
}


@pytest.mark.parametrize(("markup", "expected"), CLEANING_CASES.values(), ids=CLEANING_CASES.keys())
def test_clean_wikitext_rule(markup, expected):
    assert clean_wikitext(markup) == expected


def test_clean_wikitext_whole_article():
    markup = """{{Infobox animal
| name = Cat
| image = [[File:Cat.jpg|200px]]
}}
'''The cat''' (''Felis catus'')<ref>{{cite web|url=http://a}}</ref> is a [[mammal|small mammal]].

== Biology ==
[[Image:Paw.jpg|thumb|A paw, see [[claw]].]]
Cats have {{convert|30|teeth}}.<ref name="t" />
{| class="wikitable"
! Sense !! Range
|-
| Hearing || {{convert|64|Hz}}
|}

== External links ==
* [http://cats.example Cats]
[[Category:Felines]]
[[fr:Chat]]
"""
    assert clean_wikitext(markup) == (
        "The cat (Felis catus) is a small mammal.\n\nBiology\n\nCats have 30 teeth."
    )


# --- wikipedia_articles on a handwritten dump ------------------------------------------------

DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Cat</title><ns>0</ns><id>1</id>
    <revision><text xml:space="preserve">'''Cats''' purr.&lt;ref&gt;x&lt;/ref&gt;</text></revision></page>
  <page><title>Kitty</title><ns>0</ns><id>2</id><redirect title="Cat" />
    <revision><text xml:space="preserve">#REDIRECT [[Cat]]</text></revision></page>
  <page><title>Moggy</title><ns>0</ns><id>3</id>
    <revision><text xml:space="preserve">#redirect [[Cat]]</text></revision></page>
  <page><title>Wikipedia:About</title><ns>4</ns><id>4</id>
    <revision><text xml:space="preserve">Project page.</text></revision></page>
  <page><title>Stub</title><ns>0</ns><id>5</id>
    <revision><text xml:space="preserve">{{stub}}</text></revision></page>
  <page><title>Dog</title><ns>0</ns><id>6</id>
    <revision><text xml:space="preserve">Dogs [[bark|bark]] &amp;amp; wag.</text></revision></page>
</mediawiki>
"""


def _fake_wheel(path: Path, dump: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(WIKIPEDIA_MEMBER, bz2.compress(dump.encode()))
    return path


def test_wikipedia_articles_skips_redirects_other_namespaces_and_empty_pages(tmp_path):
    wheel = _fake_wheel(tmp_path / "fake.whl", DUMP)
    assert wikipedia_articles(tmp_path, wheel=wheel) == [("Cat", "Cats purr."), ("Dog", "Dogs bark & wag.")]


def test_wikipedia_articles_without_articles_is_an_error(tmp_path):
    wheel = _fake_wheel(tmp_path / "fake.whl", '<mediawiki xmlns="x"><siteinfo /></mediawiki>')
    with pytest.raises(CorpusError, match="holds no article"):
        wikipedia_articles(tmp_path, wheel=wheel)


# --- fetch_gensim_wheel failure modes (no network needed) --------------------------------------


def test_pip_failure_names_the_command_and_pypi(tmp_path, monkeypatch):
    failing = (sys.executable, "-c", "import sys; print('no route to host'); sys.exit(3)")
    monkeypatch.setattr(corpus, "PIP_DOWNLOAD_COMMAND", failing)
    with pytest.raises(WheelDownloadError) as error:
        fetch_gensim_wheel(tmp_path)
    message = str(error.value)
    assert "import sys" in message and "exit 3" in message
    assert "PyPI must be reachable" in message and "no route to host" in message


def test_a_cached_wheel_with_the_wrong_checksum_is_not_used(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / GENSIM_WHEEL).write_bytes(b"not the wheel")
    monkeypatch.setattr(corpus, "PIP_DOWNLOAD_COMMAND", (sys.executable, "-c", "raise SystemExit(1)"))
    with pytest.raises(WheelDownloadError), pytest.warns(CacheWarning, match="not the pinned sha256"):
        fetch_gensim_wheel(tmp_path)


def test_a_downloaded_wheel_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    # A stand-in for pip that saves a wrong file under the pinned wheel's name into its -d folder.
    fake_pip = f"import sys, pathlib; (pathlib.Path(sys.argv[-1]) / {GENSIM_WHEEL!r}).write_bytes(b'x')"
    monkeypatch.setattr(corpus, "PIP_DOWNLOAD_COMMAND", (sys.executable, "-c", fake_pip))
    with pytest.raises(CorpusError, match="sha256") as error:
        fetch_gensim_wheel(tmp_path)
    assert not isinstance(error.value, WheelDownloadError)
    assert list((tmp_path / "wheels").iterdir()) == []


# --- token_windows ----------------------------------------------------------------------------


def test_token_windows_adjacent_from_the_start():
    windows = token_windows(list(range(100, 111)), window=3, count=3)
    assert windows.dtype == np.int64 and windows.shape == (3, 3)
    np.testing.assert_array_equal(windows, [[100, 101, 102], [103, 104, 105], [106, 107, 108]])


def test_token_windows_with_stride_and_exact_length():
    ids = np.arange(10, dtype=np.int32)
    windows = token_windows(ids, window=4, count=4, stride=2)
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]])
    assert windows.dtype == np.int64


def test_token_windows_too_short():
    with pytest.raises(ValueError, match=r"too short: 3 windows of 4 tokens .* need 12 tokens, it has 11"):
        token_windows(range(11), window=4, count=3)


@pytest.mark.parametrize(
    ("ids", "window", "count", "stride", "match"),
    [
        (range(10), 0, 1, None, "window must be at least 1"),
        (range(10), 2, 0, None, "count must be at least 1"),
        (range(10), 2, 2, 0, "stride must be at least 1"),
        (np.zeros((2, 5)), 2, 1, None, "must be 1-D"),
    ],
)
def test_token_windows_rejects_bad_arguments(ids, window, count, stride, match):
    with pytest.raises(ValueError, match=match):
        token_windows(ids, window, count, stride)


# --- The real corpus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return fetch_gensim_wheel(PERSISTENT_CACHE)
    except WheelDownloadError as error:
        pytest.skip(f"the gensim wheel cannot be downloaded (is PyPI reachable?): {error}")


@pytest.fixture(scope="module")
def articles(wheel) -> list[tuple[str, str]]:
    return wikipedia_articles(PERSISTENT_CACHE, wheel=wheel)


def test_real_articles_are_clean_prose(articles):
    assert ARTICLES_RANGE[0] <= len(articles) <= ARTICLES_RANGE[1]
    titles = [title for title, _ in articles]
    assert len(set(titles)) == len(titles)
    assert titles[0] == "Anarchism" and "Albert Einstein" in titles
    assert "AccessibleComputing" not in titles  # the dump's first page, a redirect
    assert articles[0][1].startswith("Anarchism is a political philosophy that advocates")
    for title, text in articles:
        for token in LEFTOVER_MARKUP:
            assert token not in text, (title, token)
    words = sum(len(text.split()) for _, text in articles)
    assert WORDS_RANGE[0] <= words <= WORDS_RANGE[1]


def test_corpus_text_is_cached_on_disk(wheel, tmp_path, articles):
    (tmp_path / "wheels").mkdir()
    shutil.copyfile(wheel, tmp_path / "wheels" / GENSIM_WHEEL)
    text = corpus_text(tmp_path)
    assert text == "\n\n".join(f"{title}\n\n{body}" for title, body in articles) + "\n"
    (cached,) = (tmp_path / "corpus").iterdir()
    assert read_checked_json(cached)["text"] == text
    cached.write_text(cached.read_text(encoding="utf-8").replace("Anarchism", "Anarchy", 1), encoding="utf-8")
    with pytest.warns(CacheWarning, match=f"{cached.name}: the content does not match"):
        assert corpus_text(tmp_path) == text  # extracted again, not the edited text
    assert read_checked_json(cached)["text"] == text


def test_corpus_text_words_and_markup():
    try:
        text = corpus_text(PERSISTENT_CACHE)
    except WheelDownloadError as error:
        pytest.skip(f"the gensim wheel cannot be downloaded (is PyPI reachable?): {error}")
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert WORDS_RANGE[0] <= len(text.split()) <= WORDS_RANGE[1]
    assert not any(token in text for token in LEFTOVER_MARKUP)
    assert "\n\n\n" not in text
