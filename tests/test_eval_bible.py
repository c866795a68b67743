"""Bible data builder: parsing and cleaning of real diatheke output (fixtures), alignment, paragraphs."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_adaptive.evaluation.bible import (
    align_verses,
    clean_verse_text,
    osis_book,
    parse_books_arg,
    parse_diatheke,
    verses_to_paragraphs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "diatheke"
MODULES = {"es": "spaRV1909eb", "en_web": "engWEB2015eb", "en_kjv": "engKJV2006eb"}


def _read(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def test_parse_keeps_osis_ids_and_order():
    """Guards against losing verses or mis-mapping the book name to its OSIS id (ids must align)."""
    verses = parse_diatheke(_read("spaRV1909eb.Matt.txt"))
    assert list(verses) == ["Matt.1.1", "Matt.1.2", "Matt.1.3", "Matt.2.6"]
    assert verses["Matt.1.1"] == "LIBRO de la generación de Jesucristo, hijo de David, hijo de Abraham."


def test_markup_and_strongs_are_removed():
    """Guards against Strong's numbers, tags or the module line leaking into the text BLEU scores."""
    for module in MODULES.values():
        for vid, text in parse_diatheke(_read(f"{module}.Matt.txt")).items():
            assert "<" not in text and ">" not in text and "strong" not in text, (module, vid, text)
            assert module not in text


def test_glued_words_are_split():
    """Guards against the source's missing spaces: '<w>God</w><w>created</w>', 'Christ,<w>the', 'world.</q><q>The'."""
    quirks = parse_diatheke(_read("quirks.txt"))
    assert quirks["Gen.1.1"] == "In the beginning, God created the heavens and the earth."
    assert quirks["Matt.13.49"].startswith("So it will be in the end of the world. The angels will come")
    web = parse_diatheke(_read("engWEB2015eb.Matt.txt"))
    assert web["Matt.1.1"].startswith("The book of the genealogy of Jesus Christ, the son of David")


def test_psalm_title_before_key_is_dropped():
    """Guards against pre-verse material (psalm titles, <lg>/<l> milestones) being taken as verse text."""
    quirks = parse_diatheke(_read("quirks.txt"))
    assert quirks["Ps.23.1"] == "The LORD is my shepherd; I shall not want."
    assert quirks["Ps.23.2"].startswith("He maketh me to lie down in green pastures:")


def test_poetry_lines_are_joined_with_spaces():
    """Guards against poetry line milestones (<l .../>) gluing the last word of a line to the next line."""
    web = parse_diatheke(_read("engWEB2015eb.Matt.txt"))
    assert "land of Judah, are in no way least" in web["Matt.2.6"]
    assert "a governor who shall shepherd" in web["Matt.2.6"]


def test_continuation_lines_join_their_verse():
    """Guards against multi-line verses (plain poetry output) being cut after the first line."""
    out = "Matthew 2:6: first line,\nsecond line.\nMatthew 2:7: next verse.\n(engWEB2015eb)\n"
    assert parse_diatheke(out) == {"Matt.2.6": "first line, second line.", "Matt.2.7": "next verse."}


def test_text_before_first_key_is_rejected():
    """Guards against silently parsing something that is not diatheke output (e.g. an error message)."""
    with pytest.raises(ValueError, match="before the first verse key"):
        parse_diatheke("Error: module not found\nMatthew 1:1: x\n")


def test_align_three_modules_and_drop_missing():
    """Guards against misaligned records: every record must hold the same verse in all three texts."""
    source = parse_diatheke(_read("spaRV1909eb.Matt.txt"))
    refs = {f: parse_diatheke(_read(f"{m}.Matt.txt")) for f, m in MODULES.items() if f != "es"}
    refs["en_kjv"].pop("Matt.1.2")  # a verse missing in one reference is dropped, not misaligned
    records = align_verses(source, refs)
    assert [r["id"] for r in records] == ["Matt.1.1", "Matt.1.3", "Matt.2.6"]
    assert records[1]["en_kjv"].startswith("And Judas begat Phares")
    assert records[1]["en_web"].startswith("Judah became the father of Perez")
    assert records[1]["es"].startswith("Y Judas engendró de Thamar")


def test_clean_verse_text_spacing():
    """Guards against stray spaces before punctuation and paragraph marks after tag removal."""
    assert clean_verse_text('¶ <w s="G1">Hello</w> ,<w>world</w> .') == "Hello, world."


def test_books_arg_and_paragraphs():
    """Guards against book names/ids not resolving (the --books option) and chapters merging in the ppl text."""
    assert parse_books_arg("Matt, Mark,Matthew") == ["Matt", "Mark"]
    assert osis_book("I John") == "1John"
    with pytest.raises(ValueError, match="not a known Bible book"):
        osis_book("Matthieu")
    text = verses_to_paragraphs({"Gen.1.1": "a.", "Gen.1.2": "b.", "Gen.2.1": "c."})
    assert text == "a. b.\n\nc.\n"
