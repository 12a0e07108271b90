r"""Tokens shown as text: the one rule every view uses (app tables, feature cards, the dashboard, reports).

    >>> from transformers import AutoTokenizer
    >>> from qscope_plugin.models import DEMO_MODEL_DIR
    >>> tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)        # the demo's byte-level BPE: 鑫 is 3 byte tokens
    >>> token_texts(tok, tok("鑫 ok").input_ids)
    ['\\xe9', '\\x91', '鑫', ' o', 'k']
    >>> lone_token_texts(tok, tok("鑫").input_ids)                  # each token alone, without neighbours
    ['\\xe9', '\\x91', '\\xab']

Qwen's byte-level BPE splits a character it has no token for into tokens of its UTF-8 bytes, and decoding such a
token alone gives "�". Here a character is shown on the token that completes it (the last of its bytes), whole; a
token that completes no character (it holds only the first bytes of one) shows its bytes as ``\xNN`` escapes, so
no token is ever "�" or empty. Bytes that never complete a character (a window cut mid-character, invalid UTF-8)
show as escapes on the token that holds them. Special tokens (``<|endoftext|>``) show as their name. Joined, the
tokens of a sequence read as its decoded text wherever characters are whole.

Tokenizers that are not byte-level fall back to decoding each token alone (``tokenizer.decode([id])``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

Piece = bytes | str
"""A token's content: the bytes of a byte-level token, or text shown as it is (a special token, or a token of a
tokenizer that is not byte-level)."""


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable-character table (GPT-2's, which Qwen's tokenizer uses)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    from tokenizers.decoders import ByteLevel

    return isinstance(getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None), ByteLevel)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[Piece]:
    """Each token's content (``Piece``): what ``pieces_text`` shows; one tokenizer call for all ``ids``."""
    ids = [int(i) for i in ids]
    if not _is_byte_level(tokenizer):
        return [tokenizer.decode([i]) for i in ids]
    table, added = _byte_of_char(), tokenizer.added_tokens_decoder
    pieces: list[Piece] = []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if i in added or token is None or any(c not in table for c in token):
            pieces.append(tokenizer.decode([i]))
        else:
            pieces.append(bytes(table[c] for c in token))
    return pieces


def _escaped(data: bytes) -> str:
    """``b"\\xe9\\x91"`` -> the 8 characters ``\\xe9\\x91``."""
    return "".join(f"\\x{b:02x}" for b in data)


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with byte ``lead`` (0: not a lead byte)."""
    return 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else \
        4 if 0xF0 <= lead < 0xF5 else 0


def pieces_text(pieces: Sequence[Piece]) -> list[str]:
    """The text of each token of a sequence given its pieces (the rule is the module docstring's)."""
    shown: list[list[str]] = [[] for _ in pieces]
    owner: list[int] = []  # per byte of the current run of byte pieces: the token it came from
    run = bytearray()

    def flush() -> None:
        """Cut the run into characters, each shown on the token of its last byte; stray bytes on their own."""
        at = 0
        while at < len(run):
            size = _utf8_length(run[at])
            char = None
            if size and at + size <= len(run):
                try:
                    char = bytes(run[at:at + size]).decode("utf-8")
                except UnicodeDecodeError:  # a bad continuation byte, an overlong or a surrogate form
                    char = None
            if char is None:
                shown[owner[at]].append(_escaped(run[at:at + 1]))
                at += 1
            else:
                shown[owner[at + size - 1]].append(char)
                at += size
        run.clear()
        owner.clear()

    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            flush()
            shown[i].append(piece)
        else:
            run.extend(piece)
            owner.extend([i] * len(piece))
    flush()
    return ["".join(parts) if parts else _escaped(piece) if isinstance(piece, bytes) else ""
            for parts, piece in zip(shown, pieces, strict=True)]


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token of the sequence ``ids``, as every view shows it (see the module docstring)."""
    return pieces_text(token_pieces(tokenizer, ids))


def lone_token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each of ``ids`` shown alone, as a one-token sequence (a candidate or a promoted token: no neighbours)."""
    return [pieces_text([piece])[0] for piece in token_pieces(tokenizer, ids)]
