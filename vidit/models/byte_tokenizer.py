"""Byte-level caption tokenizer of the byte text encoder (text_encoder.py).

Captions are UTF-8 bytes shifted by two so that 0 and 1 stay free for padding
and the beginning-of-sequence marker. A byte vocabulary needs no training and
no files, which suits the small embedded datasets; the text encoder learns the
rest. It imports only numpy: the data pipeline's worker processes use it too.

Token layout (always `length` long):  [BOS, byte+2, byte+2, ..., PAD, PAD]
"""
import numpy as np

PAD = 0
BOS = 1
_BYTE_OFFSET = 2  # token = byte value + 2, leaving 0 (PAD) and 1 (BOS) free
VOCAB_SIZE = 256 + _BYTE_OFFSET  # 258


def encode(text: str, length: int) -> np.ndarray:
    """Tokenizes `text` into int32 [length]: BOS, then UTF-8 bytes + 2, then PAD.

    Text longer than `length - 1` bytes is truncated (possibly mid-character;
    `decode` tolerates that).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1 to hold BOS, got {length}")
    tokens = np.full((length,), PAD, dtype=np.int32)
    tokens[0] = BOS
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: length - 1]
    tokens[1:1 + len(data)] = data.astype(np.int32) + _BYTE_OFFSET
    return tokens


def tokens_and_mask(text: str, length: int):
    """(ids int32 [length], mask bool [length]): `encode` and its non-padding positions."""
    ids = encode(text, length)
    return ids, ids > PAD


def decode(tokens) -> str:
    """Inverse of `encode`: drops PAD and BOS, maps the rest back to text."""
    tokens = np.asarray(tokens)
    data = tokens[tokens >= _BYTE_OFFSET] - _BYTE_OFFSET
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")


def null_tokens(length: int) -> np.ndarray:
    """The classifier-free-guidance null condition: BOS followed by padding."""
    return encode("", length)


# The empty caption; encodes to BOS only (see `null_tokens`).
NULL = ""
