"""Profile strings made safe to show: every view prints names through ``display``.

The decoder keeps a producer's bytes as they were: invalid UTF-8 becomes
lone surrogates (``surrogateescape``), so a re-encode gives the same bytes
back. Those cannot be written as UTF-8, and control characters in a name
(a perf map belongs to whoever runs the target) would reach the terminal as
escape sequences, or make an SVG that is not XML. So each distinct string is
escaped once, when the stacks are loaded, and every view (table, tree,
folded, SVG) sees only printable, encodable text:

* an undecodable byte (surrogate U+DC80..U+DCFF) becomes ``\\xNN``, the byte;
* C0 and C1 controls and DEL become ``\\xNN`` (tab and newline included:
  they would break the table's columns and the folded format's lines);
* other surrogates and the non-characters U+FFFE/U+FFFF (not XML
  characters) become ``\\uNNNN``.

Backslashes themselves are left alone: names are for reading, and Windows
paths or C++ string literals in names stay readable.
"""

from __future__ import annotations

import re

# Everything that is not a printable, encodable XML 1.0 character.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_ESCAPED_BYTES_START = 0xDC80  # surrogateescape maps byte 0x80+n to U+DC80+n
_ESCAPED_BYTES_END = 0xDCFF


def _escape(match: "re.Match") -> str:
    code = ord(match.group())
    if _ESCAPED_BYTES_START <= code <= _ESCAPED_BYTES_END:
        return "\\x%02x" % (code - 0xDC00)
    if code < 0x100:
        return "\\x%02x" % code
    return "\\u%04x" % code


def display(text: str) -> str:
    """``text`` with undecodable bytes and control characters escaped (see above)."""
    # Once per distinct string, not per frame: the regex scan is C speed and
    # clean text comes back as the same object.
    return _UNSAFE.sub(_escape, text)

