"""tq.data.corpus: wikitext cleaning rules on handwritten markup, the dump reader on a handwritten dump,
the wheel download's failure modes, the corpus cache, token windows (cut from the start, and
sampled across articles), and the real Wikipedia text in the gensim wheel.

The real-corpus tests download the pinned gensim wheel (about 28 MB) once into the persistent
cache (``$TQ_CACHE_DIR_PERSISTENT``, else ``$TQ_CACHE_DIR`` as it was before conftest redirected
it, else ``~/.cache/tq``) and are skipped, with pip's message, when PyPI is unreachable.
"""

from __future__ import annotations

import bz2
import itertools
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tq.core.fileio import CacheWarning, read_checked_json, write_checked_json
from tq.data import corpus
from tq.data.corpus import (
    GENSIM_WHEEL,
    WIKIPEDIA_MEMBER,
    CorpusError,
    TextWindow,
    WheelDownloadError,
    clean_wikitext,
    corpus_articles,
    corpus_text,
    draw_windows,
    fetch_gensim_wheel,
    read_corpus_file,
    sample_windows,
    wikipedia_articles,
    write_corpus_files,
)

# Read at import (collection) time, before conftest's session fixture points TQ_CACHE_DIR at a
# temporary directory: the wheel is downloaded once per machine, not once per test run.
PERSISTENT_CACHE = Path(
    os.environ.get("TQ_CACHE_DIR_PERSISTENT")
    or os.environ.get("TQ_CACHE_DIR")
    or Path.home() / ".cache" / "tq"
)

# Measured on the pinned wheel: 106 articles, 442,611 words, 2,815,402 characters (docs/design.md says
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


# --- The corpus cache (articles stand in for the wheel's dump) -------------------------------

FAKE_ARTICLES = [("Cat", "Cats purr.\n\nThey sleep."), ("Dog", "Dogs bark."), ("Émeu", "Émeus run.")]


@pytest.fixture
def fake_dump(monkeypatch) -> list[int]:
    """Stand in for the gensim wheel's dump with FAKE_ARTICLES; counts the extractions."""
    calls: list[int] = []

    def articles(cache=None):
        calls.append(1)
        return list(FAKE_ARTICLES)

    monkeypatch.setattr(corpus, "wikipedia_articles", articles)
    return calls


def test_corpus_text_is_the_join_of_the_articles_as_before(tmp_path, fake_dump):
    # The format every existing user (traces, needle) has read: title, blank line, body; a blank
    # line between articles; one trailing newline.
    expected = "Cat\n\nCats purr.\n\nThey sleep.\n\nDog\n\nDogs bark.\n\nÉmeu\n\nÉmeus run.\n"
    assert corpus_articles(tmp_path) == FAKE_ARTICLES
    assert corpus_text(tmp_path) == expected
    assert corpus_text(tmp_path) == "\n\n".join(f"{t}\n\n{b}" for t, b in corpus_articles(tmp_path)) + "\n"
    assert len(fake_dump) == 1  # one extraction, then read from the cache


def test_one_cache_file_holds_the_articles_and_the_text(tmp_path, fake_dump):
    text = corpus_text(tmp_path)
    (cached,) = (tmp_path / "corpus").iterdir()
    data = read_checked_json(cached)
    assert data["format"] == "tq.corpus/2"
    assert data["articles"] == [list(article) for article in FAKE_ARTICLES] and data["text"] == text
    assert corpus_articles(tmp_path) == FAKE_ARTICLES and len(fake_dump) == 1
    assert [path.name for path in (tmp_path / "corpus").iterdir()] == [cached.name]


def test_an_edited_article_in_the_cache_is_extracted_again(tmp_path, fake_dump):
    corpus_articles(tmp_path)
    (cached,) = (tmp_path / "corpus").iterdir()
    cached.write_text(
        cached.read_text(encoding="utf-8").replace("Dogs bark", "Dogs meow", 1), encoding="utf-8"
    )
    with pytest.warns(CacheWarning, match=f"{cached.name}: the content does not match"):
        assert corpus_articles(tmp_path) == FAKE_ARTICLES
    assert len(fake_dump) == 2 and read_checked_json(cached)["articles"][1] == ["Dog", "Dogs bark."]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"format": "tq.corpus/1", "text": "Cat\n\nCats purr.\n"}, "not a tq.corpus/2 file"),
        ({"format": "tq.corpus/2", "articles": [["Cat"]], "text": "Cat\n"}, "not a non-empty list"),
        ({"format": "tq.corpus/2", "articles": [], "text": "\n"}, "not a non-empty list"),
        ({"format": "tq.corpus/2", "articles": [["Cat", "Purr."]], "text": "Dog"}, "not the join"),
    ],
    ids=["old format", "not pairs", "no articles", "text not the join"],
)
def test_a_corpus_cache_that_is_not_a_corpus_is_extracted_again(tmp_path, fake_dump, data, problem):
    corpus_text(tmp_path)
    (cached,) = (tmp_path / "corpus").iterdir()
    write_checked_json(cached, data)  # a valid checksum, a wrong content
    with pytest.warns(CacheWarning, match=f"{problem}.*; extracting the text again"):
        assert corpus_articles(tmp_path) == FAKE_ARTICLES
    assert len(fake_dump) == 2


# --- sample_windows and draw_windows ------------------------------------------------------------

# Articles of these lengths, cut into windows of 10 tokens: 0, 5, 3, 0, 1, 1, 2 and 0 windows.
LENGTHS = [9, 57, 30, 0, 10, 19, 25, 3]
WINDOW = 10
SLOTS = [n // WINDOW for n in LENGTHS]
TITLES = [f"article {i}" for i in range(len(LENGTHS))]


def _articles(lengths=LENGTHS) -> list[np.ndarray]:
    """Article i is the ids 1000 i, 1000 i + 1, ...: every token says where it came from."""
    return [1000 * i + np.arange(n) for i, n in enumerate(lengths)]


def _all(seed: int) -> list[TextWindow]:
    return sample_windows(_articles(), TITLES, sum(SLOTS), WINDOW, seed)


def test_sample_windows_is_reproducible_from_the_seed():
    first = sample_windows(_articles(), TITLES, 8, WINDOW, seed=7)
    assert sample_windows(_articles(), TITLES, 8, WINDOW, seed=7) == first
    assert sample_windows(_articles(), TITLES, 8, WINDOW, seed=8) != first
    assert all(isinstance(w, TextWindow) and w.title == TITLES[w.article] for w in first)


def test_fewer_windows_are_the_first_of_more():
    for seed, count in itertools.product(range(5), range(1, sum(SLOTS) + 1)):
        assert sample_windows(_articles(), TITLES, count, WINDOW, seed) == _all(seed)[:count]


def test_one_window_per_article_while_articles_remain():
    long_articles = sum(1 for k in SLOTS if k)
    for seed in range(20):
        first_round = sample_windows(_articles(), TITLES, long_articles, WINDOW, seed)
        assert sorted(w.article for w in first_round) == [i for i, k in enumerate(SLOTS) if k]
        # Along the whole draw, an article's r-th window comes only after every article with
        # more than r windows gave its (r-1)-th: the round of each window never goes down.
        given = [0] * len(LENGTHS)
        rounds = []
        for w in _all(seed):
            rounds.append(given[w.article])
            given[w.article] += 1
        assert rounds == sorted(rounds)
        assert given == SLOTS  # every slot of every article, and no more


def test_article_orders_differ_between_seeds():
    orders = {tuple(w.article for w in _all(seed)) for seed in range(10)}
    assert len(orders) > 5


def test_windows_stay_inside_their_article_and_never_overlap():
    for seed in range(20):
        by_article: dict[int, list[int]] = {}
        for w in _all(seed):
            assert 0 <= w.offset and w.offset + WINDOW <= LENGTHS[w.article], w
            by_article.setdefault(w.article, []).append(w.offset)
        for article, offsets in by_article.items():
            offsets.sort()
            assert all(b - a >= WINDOW for a, b in itertools.pairwise(offsets)), (article, offsets)


def test_short_articles_give_no_window():
    short = {i for i, n in enumerate(LENGTHS) if n < WINDOW}
    for seed in range(20):
        assert not short & {w.article for w in _all(seed)}


def test_offsets_are_random_not_always_the_start():
    first = [sample_windows(_articles(), TITLES, 1, WINDOW, seed)[0] for seed in range(10)]
    assert {w.offset for w in first} != {0}
    # Article 1 (57 tokens, 5 windows): a random phase in [0, 7] ...
    windows = [[w.offset for w in _all(seed) if w.article == 1] for seed in range(10)]
    assert len({min(offsets) for offsets in windows}) > 1
    # ... and its slots in a random order, not front to back.
    assert any(offsets != sorted(offsets) for offsets in windows)
    assert len({offsets[0] // WINDOW for offsets in windows}) > 1


def test_too_many_windows_names_how_many_the_text_holds():
    assert sum(SLOTS) == 12
    assert len(sample_windows(_articles(), TITLES, 12, WINDOW, seed=0)) == 12
    with pytest.raises(
        ValueError, match=r"holds 12 windows of 10 tokens \(5 of its 8 articles.*13 requested"
    ):
        sample_windows(_articles(), TITLES, 13, WINDOW, seed=0)
    with pytest.raises(ValueError, match="holds 0 windows of 100 tokens"):
        sample_windows(_articles(), TITLES, 1, 100, seed=0)


@pytest.mark.parametrize(
    ("count", "window", "titles", "match"),
    [
        (0, WINDOW, TITLES, "count must be at least 1, got 0"),
        (1, 0, TITLES, "window must be at least 1, got 0"),
        (1, WINDOW, TITLES[:-1], "8 token sequences for 7 titles"),
    ],
)
def test_sample_windows_rejects_bad_arguments(count, window, titles, match):
    with pytest.raises(ValueError, match=match):
        sample_windows(_articles(), titles, count, window, seed=0)


def _chars(text: str) -> list[int]:
    """A tokenizer with one token per character, so that a window's ids spell its text."""
    return [ord(char) for char in text]


def test_draw_windows_cuts_each_window_from_its_article(tmp_path, fake_dump):
    # "Cat\n\nCats purr.\n\nThey sleep." is 28 characters, "Dog\n\nDogs bark." 15, "Émeu\n\nÉmeus run." 16.
    ids, windows = draw_windows(_chars, count=4, window=7, seed=3, cache=tmp_path)
    assert ids.dtype == np.int64 and ids.shape == (4, 7) and len(windows) == 4
    assert sorted(w.title for w in windows[:3]) == ["Cat", "Dog", "Émeu"]
    for row, w in zip(ids, windows, strict=True):
        title, body = FAKE_ARTICLES[w.article]
        assert w.title == title
        assert "".join(map(chr, row)) == f"{title}\n\n{body}"[w.offset : w.offset + 7]
    assert draw_windows(_chars, count=4, window=7, seed=3, cache=tmp_path)[1] == windows


def test_the_corpus_files_hold_the_text_and_the_articles_windows_are_drawn_from(tmp_path, fake_dump):
    text_path, articles_path = tmp_path / "out" / "corpus.txt", tmp_path / "out" / "articles.json"
    text = write_corpus_files(text_path, articles_path, cache=tmp_path)
    assert text == corpus_text(tmp_path) == text_path.read_text(encoding="utf-8")
    assert read_corpus_file(articles_path) == FAKE_ARTICLES
    from_file = draw_windows(_chars, count=4, window=7, seed=3, corpus_file=articles_path)
    from_cache = draw_windows(_chars, count=4, window=7, seed=3, cache=tmp_path)
    assert from_file[1] == from_cache[1] and np.array_equal(from_file[0], from_cache[0])
    data = read_checked_json(articles_path)
    write_checked_json(articles_path, {**{k: v for k, v in data.items() if k != "sha256"}, "text": "Dog\n"})
    with pytest.raises(CorpusError, match="not the join"):
        read_corpus_file(articles_path)


def test_draw_windows_takes_the_ids_as_encode_gives_them(tmp_path, fake_dump):
    # An encoder that puts a BOS (id 1) first: it is the first token of each article.
    def with_bos(text):
        return [1, *_chars(text)]

    # Cat: 29 ids, Dog: 16 (15 characters and the BOS), Émeu: 17; one window of 16 from each.
    ids, windows = draw_windows(with_bos, count=3, window=16, seed=0, cache=tmp_path)
    assert {w.title for w in windows} == {"Cat", "Dog", "Émeu"}
    for row, w in zip(ids, windows, strict=True):
        title, body = FAKE_ARTICLES[w.article]
        np.testing.assert_array_equal(row, with_bos(f"{title}\n\n{body}")[w.offset : w.offset + 16])
        if w.title == "Dog":
            assert w.offset == 0 and row[0] == 1
    with pytest.raises(ValueError, match="holds 3 windows of 16 tokens"):
        draw_windows(with_bos, count=4, window=16, seed=0, cache=tmp_path)


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
    assert corpus_articles(tmp_path) == articles
    assert [tuple(article) for article in read_checked_json(cached)["articles"]] == articles
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


def test_real_corpus_windows_come_from_many_articles():
    try:
        articles = corpus_articles(PERSISTENT_CACHE)
    except WheelDownloadError as error:
        pytest.skip(f"the gensim wheel cannot be downloaded (is PyPI reachable?): {error}")
    ids, windows = draw_windows(_chars, count=64, window=2048, seed=0, cache=PERSISTENT_CACHE)
    assert ids.shape == (64, 2048)
    assert len({w.article for w in windows}) == 64  # 64 articles, not 64 slices of "Anarchism"
    for row, w in zip(ids[:8], windows[:8], strict=True):
        title, body = articles[w.article]
        assert "".join(map(chr, row)) == f"{title}\n\n{body}"[w.offset : w.offset + 2048]
