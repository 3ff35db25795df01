"""Sentencepiece tokenizers that encode text exactly and keep the special tokens whole.

Every `Tokenizer` works in "exact mode": `decode(encode(s)) == s`, special tokens are one id
each, and encoding two strings separately and concatenating the ids decodes to the two strings
concatenated (`data.format.encode_dialogue` relies on it to align its masks). To get there,
`Tokenizer.from_proto` switches off the two normalizer options that break it, whatever model it
is given: `add_dummy_prefix` (it would put a space before every separately encoded piece) and
`remove_extra_whitespaces` (it would collapse runs of spaces). Llama-2 and Gemma models already
use the identity normalization; with the dummy prefix off, a word at the start of a text piece
tokenizes without its leading "▁", as it does after a Llama-3 chat header.

Limits of exactness: the character U+2581 ("▁") decodes as a space, and in a model without byte
fallback a character outside the vocabulary decodes as " ⁇ ". Models trained here use byte
fallback, so every other string round-trips.
"""

from __future__ import annotations

import collections
import io
import os
import random
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from data.format import SPECIAL_TOKENS

MODEL_TYPES = ("unigram", "bpe")
# Pieces always matched whole: the special tokens, and "\n" so newlines never become bytes.
USER_SYMBOLS = (*SPECIAL_TOKENS, "\n")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_NUM_BYTE_PIECES = 256
_DIGITS = "0123456789"
MIN_VOCAB_SIZE = 4 + len(USER_SYMBOLS) + _NUM_BYTE_PIECES + len(_DIGITS)

_USER_SYMBOL_RE = re.compile("|".join(re.escape(s) for s in USER_SYMBOLS))
# A run of letters, digits or other characters with its optional leading space; or spaces.
_WORD_RE = re.compile(r" ?(?:[^\W\d_]+|\d+|[^\w ]+|_+)| +(?= )| +$")
_USER_DEFINED = sp_pb.ModelProto.SentencePiece.USER_DEFINED
_NORMAL = sp_pb.ModelProto.SentencePiece.NORMAL


class Tokenizer:
    """A sentencepiece model in exact mode (see the module docstring)."""

    def __init__(self, proto_bytes: bytes):
        model = _parse_proto(proto_bytes)
        _make_exact(model)
        self._proto_bytes = model.SerializeToString()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto_bytes)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"sentencepiece rejected the model: {e}") from e

    @classmethod
    def from_proto(cls, proto_bytes: bytes) -> Tokenizer:
        """Builds a tokenizer from serialized ModelProto bytes, switched to exact mode."""
        return cls(proto_bytes)

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a sentencepiece `.model` file (adapt_tokenizer adds our markers to others)."""
        with open(path, "rb") as f:
            return cls.from_proto(f.read())

    def save(self, path: str) -> None:
        """Writes the model; plain sentencepiece reads it and tokenizes the same way."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self._proto_bytes)

    @property
    def proto_bytes(self) -> bytes:
        """The serialized ModelProto, as written by `save`."""
        return self._proto_bytes

    @property
    def vocab_size(self) -> int:
        """Number of ids (pieces)."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Padding id; models without a pad piece (Llama-2) pad with unk, which is always masked."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        """Sentencepiece's BOS id (-1 if the model has none); the chat format uses BEGIN_OF_TEXT."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Sentencepiece's EOS id (-1 if the model has none); turns end with `eot_id`."""
        return self._sp.eos_id()

    @property
    def eot_id(self) -> int:
        """Id of `<|eot_id|>`, which ends every turn and stops sampling."""
        return self.token_id(SPECIAL_TOKENS[3])

    def token_id(self, piece: str) -> int:
        """Id of a piece, e.g. a special token; KeyError if the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(i) != piece:
            raise KeyError(
                f"{piece!r} is not a piece of this tokenizer (vocab size {self.vocab_size}); "
                "train one with data.tokenizer.train_tokenizer or add the special tokens with "
                "data.tokenizer.adapt_tokenizer"
            )
        return i

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: no BOS/EOS, no dummy prefix, special tokens as one id each."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`, the exact inverse of `encode`; ids outside the vocabulary are skipped."""
        size = self.vocab_size
        valid = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < size]
        return self._sp.decode(valid)

    def pieces(self, text: str) -> list[str]:
        """The pieces `encode` splits `text` into, for inspection."""
        return [self._sp.id_to_piece(i) for i in self.encode(text)]

    def __reduce__(self):
        # Grain worker processes receive the tokenizer by pickling.
        return (Tokenizer, (self._proto_bytes,))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "unigram",
    *,
    max_words: int = 2_000_000,
    spell_words: bool = False,
) -> Tokenizer:
    """Trains an exact tokenizer in memory; deterministic for the same texts and arguments.

    `vocab_size` is an upper bound: a small corpus may yield fewer pieces. The corpus reaches
    sentencepiece as words in a fixed pseudo-random order (see `training_words`); at most
    `max_words` of them, frequencies scaled down proportionally beyond that.
    `spell_words` drops the pieces that join letters without a leading space (see
    `drop_word_internal_pieces`), so the vocabulary shrinks and words are spelled out.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: special tokens, 256 byte pieces and the "
            f"digits alone need {MIN_VOCAB_SIZE}; use at least {MIN_VOCAB_SIZE + 64}"
        )
    words = training_words(texts, max_words)
    if not words:
        raise ValueError("train_tokenizer got no text to train on")
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(words),
            model_writer=writer,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            user_defined_symbols=list(USER_SYMBOLS),
            required_chars=_DIGITS,
            split_digits=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,  # one thread keeps training bit-for-bit deterministic
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {model_type} model of {vocab_size} pieces "
            f"on {len(words)} words: {e}"
        ) from e
    if not spell_words:
        return Tokenizer.from_proto(writer.getvalue())
    model = _parse_proto(writer.getvalue())
    drop_word_internal_pieces(model)
    return Tokenizer.from_proto(model.SerializeToString())


def drop_word_internal_pieces(model: sp_pb.ModelProto) -> None:
    """Removes the learned pieces of two or more letters without a leading "▁" (in place).

    What is left joins letters only at the start of a word after a space (" many"), so a
    word in quotes or after a newline tokenizes one letter per token: "strawberry" is ten
    tokens, each one the letter a step of a letter-by-letter trace copies, instead of pieces
    like "straw" + "berry" whose spelling a model must first learn. Ids above a dropped piece
    move down; special, byte and single-character pieces all stay.
    """
    keep = [
        p
        for p in model.pieces
        if not (p.type == _NORMAL and len(p.piece) > 1 and p.piece[0].isalpha())
    ]
    del model.pieces[:]
    model.pieces.extend(keep)


def training_words(texts: Iterable[str], max_words: int = 2_000_000) -> list[str]:
    """Words of `texts` as sentencepiece may join them, in a fixed shuffle.

    Texts are cut at USER_SYMBOLS, then into words with their leading space, and words into
    runs of letters, digits or other characters (no piece crosses those boundaries anyway).
    Sentencepiece only seeds pieces from substrings seen in varied contexts; templated task
    text repeats whole phrases, so fed as lines it would learn little beyond characters.
    """
    counts = collections.Counter()
    for text in texts:
        for fragment in _USER_SYMBOL_RE.split(text):
            counts.update(_WORD_RE.findall(fragment))
    total = sum(counts.values())
    scale = min(1.0, max_words / max(total, 1))
    words = [w for w, n in sorted(counts.items()) for _ in range(max(1, round(n * scale)))]
    random.Random(0).shuffle(words)
    return words


def adapt_tokenizer(path: str) -> tuple[Tokenizer, int]:
    """Loads a sentencepiece model and appends the special tokens it lacks; returns (it, #added).

    Existing ids never move: missing SPECIAL_TOKENS are appended as USER_DEFINED pieces, and a
    special token already present under another type becomes USER_DEFINED in place (so it is
    matched whole and decodes to itself). "\\n" is appended too when the model cannot round-trip
    it (no byte fallback, or a normalizer that maps it to a space). The model is switched to
    exact mode like every Tokenizer.
    """
    with open(path, "rb") as f:
        model = _parse_proto(f.read())
    index = {p.piece: p for p in model.pieces}
    added = 0
    for symbol in SPECIAL_TOKENS:
        if symbol in index:
            index[symbol].type = _USER_DEFINED
        else:
            model.pieces.append(sp_pb.ModelProto.SentencePiece(piece=symbol, type=_USER_DEFINED))
            added += 1
    _make_exact(model)
    probe = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    if probe.decode(probe.encode("a\nb")) != "a\nb":
        if "\n" in index:
            index["\n"].type = _USER_DEFINED
        else:
            model.pieces.append(sp_pb.ModelProto.SentencePiece(piece="\n", type=_USER_DEFINED))
            added += 1
    return Tokenizer(model.SerializeToString()), added


def _parse_proto(proto_bytes: bytes) -> sp_pb.ModelProto:
    """Parses ModelProto bytes, with a clear error for anything that is not a model."""
    model = sp_pb.ModelProto()
    try:
        model.ParseFromString(proto_bytes)
    except DecodeError as e:
        raise ValueError(f"not a sentencepiece model ({len(proto_bytes)} bytes): {e}") from e
    if not model.pieces:
        raise ValueError(f"not a sentencepiece model ({len(proto_bytes)} bytes): it has no pieces")
    return model


def _make_exact(model: sp_pb.ModelProto) -> None:
    """Switches off the normalizer options that break exact, piecewise encoding (in place)."""
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
