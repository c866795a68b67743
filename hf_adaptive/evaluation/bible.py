"""Parse and clean SWORD ``diatheke`` output into aligned, plain-text Bible verses.

Contract: pure string functions; knows nothing about processes, files or models. The input is what
``diatheke -b <module> -k <Book>`` prints in its default ("internal", OSIS-like) format, one verse per
key line (``Matthew 1:1: <w savlm="strong:G0976">The</w> ...``), continuation lines for poetry, and
a trailing ``(<module>)`` line. We parse that format rather than ``-f plain`` because the plain filter
drops the space between adjacent ``<w>`` elements ("Godcreated") and leaks Strong's lemmas (``<G5547>``).

Verse ids are OSIS references (``Matt.1.1``), so verses align across modules by id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# OSIS book id -> the English name diatheke prints (and accepts) for it, in canonical order.
OSIS_BOOKS: dict[str, str] = {
    "Gen": "Genesis", "Exod": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deut": "Deuteronomy",
    "Josh": "Joshua", "Judg": "Judges", "Ruth": "Ruth", "1Sam": "I Samuel", "2Sam": "II Samuel",
    "1Kgs": "I Kings", "2Kgs": "II Kings", "1Chr": "I Chronicles", "2Chr": "II Chronicles",
    "Ezra": "Ezra", "Neh": "Nehemiah", "Esth": "Esther", "Job": "Job", "Ps": "Psalms",
    "Prov": "Proverbs", "Eccl": "Ecclesiastes", "Song": "Song of Solomon", "Isa": "Isaiah",
    "Jer": "Jeremiah", "Lam": "Lamentations", "Ezek": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea",
    "Joel": "Joel", "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah",
    "Nah": "Nahum", "Hab": "Habakkuk", "Zeph": "Zephaniah", "Hag": "Haggai", "Zech": "Zechariah",
    "Mal": "Malachi", "Matt": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John",
    "Acts": "Acts", "Rom": "Romans", "1Cor": "I Corinthians", "2Cor": "II Corinthians",
    "Gal": "Galatians", "Eph": "Ephesians", "Phil": "Philippians", "Col": "Colossians",
    "1Thess": "I Thessalonians", "2Thess": "II Thessalonians", "1Tim": "I Timothy",
    "2Tim": "II Timothy", "Titus": "Titus", "Phlm": "Philemon", "Heb": "Hebrews", "Jas": "James",
    "1Pet": "I Peter", "2Pet": "II Peter", "1John": "I John", "2John": "II John", "3John": "III John",
    "Jude": "Jude", "Rev": "Revelation of John",
}
_NAME_TO_OSIS = {name: osis for osis, name in OSIS_BOOKS.items()}

# A verse key, possibly after pre-verse material (psalm titles, <lg>/<l> milestones) ending in a tag.
_BOOK_ALT = "|".join(re.escape(n) for n in sorted(_NAME_TO_OSIS, key=len, reverse=True))
_KEY_RE = re.compile(rf"^(?:.*?>\s*)?(?P<book>{_BOOK_ALT}) (?P<ch>\d+):(?P<v>\d+):(?: (?P<text>.*))?$")
_MODULE_LINE_RE = re.compile(r"^\([\w.-]+\)\s*$")
# Elements whose content is not verse text.
_DROP_ELEMENTS_RE = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.DOTALL)
# Adjacent words, possibly across closing tags: "<w>God</w><w>created</w>" has no space in the source.
_GLUED_W_RE = re.compile(r"(</w>(?:</[^>]+>)*)(<w\b)")
_TAG_RE = re.compile(r"<[^>]*>")
_STRONGS_RE = re.compile(r"<?\b[GH]\d{1,5}\b>?")
# Punctuation glued to the next word: "Christ,the", "world.The", "said.”Then".
_GLUED_PUNCT_RE = re.compile(r"(?<=[^\W\d_])([,;:.!?][”’\"]?)(?=[^\W\d_“‘])")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([,;:.!?])")
_WS_RE = re.compile(r"\s+")


def osis_book(name_or_id: str) -> str:
    """The OSIS id of a book given as an OSIS id (``Matt``) or diatheke name (``Matthew``, ``I John``).

    Raises:
        ValueError: for an unknown book, listing the accepted ids.
    """
    if name_or_id in OSIS_BOOKS:
        return name_or_id
    if name_or_id in _NAME_TO_OSIS:
        return _NAME_TO_OSIS[name_or_id]
    raise ValueError(f"book={name_or_id!r} is not a known Bible book; use an OSIS id, one of "
                     f"{', '.join(OSIS_BOOKS)} (or its English name, e.g. 'Matthew').")


def clean_verse_text(raw: str) -> str:
    """Plain text of one verse from diatheke's internal (OSIS-like) markup.

    Drops notes and titles, Strong's numbers, paragraph marks and every tag; restores the word
    spaces the source lacks between adjacent ``<w>`` elements and after glued punctuation.
    """
    text = _DROP_ELEMENTS_RE.sub(" ", raw)
    text = _GLUED_W_RE.sub(r"\1 \2", text)
    # Milestones (<l/>, <div/>, <chapter/>) separate lines of text; other tags are inline.
    text = re.sub(r"<[^>]*/>", " ", text)
    text = _TAG_RE.sub("", text)
    text = _STRONGS_RE.sub("", text).replace("¶", " ")
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", _WS_RE.sub(" ", text))
    return _GLUED_PUNCT_RE.sub(r"\1 ", text).strip()


def parse_diatheke(output: str) -> dict[str, str]:
    """Verses of one diatheke run, ``{"Matt.1.1": "The book of ...", ...}`` in output order.

    Continuation lines (poetry) join the verse before them; the trailing ``(module)`` line and
    verses left empty after cleaning (omitted in that module) are dropped.

    Raises:
        ValueError: when text appears before the first verse key (not diatheke output).
    """
    raw: dict[str, list[str]] = {}
    current: str | None = None
    for line in output.splitlines():
        if _MODULE_LINE_RE.match(line):
            continue
        match = _KEY_RE.match(line)
        if match:
            current = f"{_NAME_TO_OSIS[match['book']]}.{int(match['ch'])}.{int(match['v'])}"
            raw.setdefault(current, []).append(match["text"] or "")
        elif line.strip():
            if current is None:
                raise ValueError(f"output={line[:80]!r}: text before the first verse key; expected "
                                 "diatheke's default output ('Matthew 1:1: ...'); run without -f.")
            raw[current].append(line)
    cleaned = {vid: clean_verse_text(" ".join(parts)) for vid, parts in raw.items()}
    return {vid: text for vid, text in cleaned.items() if text}


def align_verses(source: Mapping[str, str], references: Mapping[str, Mapping[str, str]],
                 source_field: str = "es") -> list[dict[str, str]]:
    """Records ``{"id", source_field, <ref name>...}`` for ids present in the source and every reference.

    Args:
        source: verse id -> source-language text; its order is the output order.
        references: field name (e.g. ``"en_web"``) -> verse id -> reference text.
        source_field: the key under which the source text is stored.
    """
    records = []
    for vid, text in source.items():
        if all(vid in ref for ref in references.values()):
            record = {"id": vid, source_field: text}
            record.update({name: ref[vid] for name, ref in references.items()})
            records.append(record)
    return records


def verses_to_paragraphs(verses: Mapping[str, str]) -> str:
    """Running text: one paragraph per chapter (verses joined by spaces), blank line between chapters."""
    chapters: dict[str, list[str]] = {}
    for vid, text in verses.items():
        chapters.setdefault(vid.rsplit(".", 1)[0], []).append(text)
    return "\n\n".join(" ".join(texts) for texts in chapters.values()) + "\n"


def parse_books_arg(books: str | Iterable[str]) -> list[str]:
    """OSIS ids from ``"Matt,Mark"`` or an iterable of ids/names (order kept, duplicates dropped)."""
    items = books.split(",") if isinstance(books, str) else list(books)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item and osis_book(item) not in out:
            out.append(osis_book(item))
    return out
