r"""Caption cleaning shared by validation, feature extraction, fine-tuning and the served model.

    from crossmodal.data.text import clean_text
    clean_text("  Hello\u200b  world\n")               # "Hello world"

Training and serving call the same function, so a caption becomes model input identically in both places.
"""

from __future__ import annotations

import re
import unicodedata

# Zero-width space, word joiner, BOM: invisible, yet they split tokens apart.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u2060\ufeff"))
# Zero-width (non-)joiners carry meaning between two non-ASCII characters (emoji sequences such as a family, and
# Persian, Arabic or Indic words); anywhere else (ASCII text, ends of words) they are noise and go.
_STRAY_JOINER = re.compile(r"(?<![^\x00-\x7f\s])[\u200c\u200d]|[\u200c\u200d](?![^\x00-\x7f\s])")
_WS = re.compile(r"\s+")
# Category Cc (U+0000-001F, U+007F-009F) minus the ones str.isspace() counts as whitespace (\t\n\v\f\r,
# U+001C-001F, U+0085): those are collapsed into one space below instead. One regex pass, not a loop per character.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def clean_text(s: str | None) -> str:
    """Unicode NFC; NUL, other control and zero-width characters removed; whitespace collapsed; stripped.

    Zero-width joiners between two non-ASCII characters stay (they build emoji like a family and join Persian or
    Indic letters); right-to-left text is kept as written (its direction is a property of the characters).

    None gives "" (so an absent caption reads as empty rather than crashing a batch).
    """
    if s is None:
        return ""
    if not isinstance(s, str):
        s = str(s)
    if s.isascii() and s.isprintable():  # fast path for the common case: nothing to normalise or remove
        return " ".join(s.split())
    s = _STRAY_JOINER.sub("", unicodedata.normalize("NFC", s).translate(_ZERO_WIDTH))
    # Control characters (category Cc) other than whitespace carry no meaning in a caption; NUL among them.
    s = _CONTROL.sub("", s)
    return _WS.sub(" ", s).strip()
