"""Tests for data.tokenizer: exact round trips, whole special tokens, training and adapting."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from data.format import EOT, SPECIAL_TOKENS, THINKING_MARKERS, render_dialogue
from data.tokenizer import MIN_VOCAB_SIZE, Tokenizer, adapt_tokenizer, train_tokenizer

FRAGMENTS = (
    *SPECIAL_TOKENS,
    "the", " quick", " brown fox", "  ", "    ", "\n", "\n\n", "\t", "\r\n", " ", "Answer: ",
    "4821", " + 937", "0", "-17", "3.14", "strawberry", '"r"', "é", "日本語", "🙂", "naïve",
    "<|", "|>", "<|thoughts", "{}", "[x]", "a_b", "~`^",
)  # fmt: skip


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Random mixes of words, digits, whitespace runs, special tokens and non-ASCII text."""
    rng = np.random.default_rng(seed)
    picks = [rng.integers(len(FRAGMENTS), size=rng.integers(0, 25)) for _ in range(n)]
    return ["".join(FRAGMENTS[i] for i in pick) for pick in picks]


def plain_sentencepiece_model(tmp_path, **options) -> str:
    """A model trained by plain sentencepiece (default: dummy prefix, nmt_nfkc), without markers."""
    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over a lazy dog what is how many times letter".split()
    corpus = [" ".join(rng.choice(words, size=12)) + f" {rng.integers(10**4)}." for _ in range(300)]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=writer,
        vocab_size=120,
        minloglevel=2,
        **options,
    )
    path = tmp_path / "plain.model"
    path.write_bytes(writer.getvalue())
    return str(path)


def test_saved_model_keeps_markers_whole_in_plain_sentencepiece(
    tiny_tokenizer, tiny_dialogues, tmp_path
):
    path = tmp_path / "tokenizer.model"
    tiny_tokenizer.save(str(path))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for token in SPECIAL_TOKENS:
        assert sp.encode(token, out_type=str) == [token]
        assert sp.encode(f"ab{token}cd", out_type=str).count(token) == 1
    assert len(THINKING_MARKERS) == 5
    for text in map(render_dialogue, tiny_dialogues[:6]):
        assert sp.encode(text) == tiny_tokenizer.encode(text)
        assert sp.decode(sp.encode(text)) == text


def test_digits_are_single_pieces(tiny_tokenizer):
    for digit in "0123456789":
        assert tiny_tokenizer.pieces(digit) == [digit]
    assert tiny_tokenizer.pieces("4821") == ["4", "8", "2", "1"]
    assert [p for p in tiny_tokenizer.pieces("x 937") if p.strip("▁").isdigit()] == ["9", "3", "7"]


def test_round_trips_varied_texts_exactly(tiny_tokenizer):
    texts = varied_texts(300)
    assert len(set(texts)) > 250
    for text in texts:
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text, tiny_tokenizer.pieces(text)
    assert tiny_tokenizer.encode("") == []


def test_separately_encoded_pieces_concatenate(tiny_tokenizer):
    texts = varied_texts(100, seed=1)
    for a, b in zip(texts[::2], texts[1::2], strict=True):
        ids = tiny_tokenizer.encode(a) + tiny_tokenizer.encode(b)
        assert tiny_tokenizer.decode(ids) == a + b
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(" leading")) == " leading"


def test_decode_skips_out_of_range_ids_and_never_raises(tiny_tokenizer):
    size = tiny_tokenizer.vocab_size
    ids = tiny_tokenizer.encode("What is 12?")
    assert tiny_tokenizer.decode([-5, *ids, size, 10**9]) == "What is 12?"
    assert tiny_tokenizer.decode(np.asarray(ids, np.int32)) == "What is 12?"
    assert tiny_tokenizer.decode([]) == ""
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert isinstance(tiny_tokenizer.decode(rng.integers(-3, size + 3, size=20)), str)


def test_special_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.eot_id == tok.token_id(EOT) == tok.encode(EOT)[0]
    assert len({tok.token_id(t) for t in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)
    assert tok.encode("hi") == tok.encode("hi")  # no BOS/EOS added
    assert tok.bos_id not in tok.encode("hi") and tok.eos_id not in tok.encode("hi")
    with pytest.raises(KeyError, match="adapt_tokenizer"):
        tok.token_id("<|not_a_token|>")


def test_save_load_and_pickle_keep_the_model(tiny_tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.model"
    tiny_tokenizer.save(str(path))
    for copy in (Tokenizer.load(str(path)), pickle.loads(pickle.dumps(tiny_tokenizer))):
        assert copy.proto_bytes == tiny_tokenizer.proto_bytes
        assert copy.encode("Answer: 42\n") == tiny_tokenizer.encode("Answer: 42\n")


def test_training_is_deterministic_and_bpe_works(tiny_dialogues):
    texts = [render_dialogue(d) for d in tiny_dialogues[:12]]
    assert train_tokenizer(texts, 400).proto_bytes == train_tokenizer(texts, 400).proto_bytes
    bpe = train_tokenizer(texts, 400, model_type="bpe")
    assert bpe.vocab_size <= 400
    for token in SPECIAL_TOKENS:
        assert bpe.pieces(token) == [token]
    assert all(bpe.decode(bpe.encode(t)) == t for t in texts + varied_texts(20))


def test_unigram_learns_words_from_templated_text(tiny_tokenizer):
    # Fed whole dialogues, sentencepiece's unigram trainer would learn single characters only.
    assert tiny_tokenizer.pieces("assistant") == ["assistant"]
    assert len(tiny_tokenizer.pieces("How many times does the letter")) <= 8


def test_spell_words_keeps_space_led_words_and_spells_the_rest(tiny_dialogues):
    texts = [render_dialogue(d) for d in tiny_dialogues]
    joined = train_tokenizer(texts, 400)
    spelled = train_tokenizer(texts, 400, spell_words=True)
    prompt = 'How many times does the letter "r" appear in "strawberry"?'
    assert any(len(p) > 1 and p[0].isalpha() for p in joined.pieces(prompt + " assistant"))
    # Only space-led pieces still join letters; a word in quotes is one letter per token.
    assert spelled.pieces('"strawberry"') == ['"', *"strawberry", '"']
    assert all(len(p) == 1 or not p[0].isalpha() for p in spelled.pieces(prompt))
    assert "▁many" in spelled.pieces(prompt)
    assert spelled.vocab_size < joined.vocab_size
    for token in SPECIAL_TOKENS:
        assert spelled.pieces(token) == [token]
    assert all(spelled.decode(spelled.encode(t)) == t for t in texts + varied_texts(50))


def test_bad_training_arguments_are_explained():
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["a b c"], 400, model_type="char")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["a b c"], MIN_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], 400)
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.from_proto(b"definitely not a model")


def test_adapt_adds_markers_and_keeps_old_ids(tmp_path):
    path = plain_sentencepiece_model(tmp_path)
    old = spm.SentencePieceProcessor(model_file=path)
    tok, added = adapt_tokenizer(path)
    # Nine special tokens, plus "\n": this model has no byte fallback and maps it to a space.
    assert added == 10 and tok.vocab_size == old.get_piece_size() + added
    new = spm.SentencePieceProcessor(model_proto=tok.proto_bytes)
    assert [new.id_to_piece(i) for i in range(old.get_piece_size())] == [
        old.id_to_piece(i) for i in range(old.get_piece_size())
    ]
    for token in SPECIAL_TOKENS:
        assert new.encode(token, out_type=str) == [token]
    # The dummy prefix is off, so pieces encoded one by one concatenate exactly.
    parts = ["<|start_header_id|>", "what", "<|end_header_id|>", "\n\n", "the  dog 42", EOT]
    ids = [i for part in parts for i in tok.encode(part)]
    assert tok.decode(ids) == "".join(parts) == tok.decode(tok.encode("".join(parts)))
    tok.save(str(tmp_path / "adapted.model"))
    assert adapt_tokenizer(str(tmp_path / "adapted.model"))[1] == 0


def test_adapt_turns_existing_control_token_into_a_whole_visible_piece(tmp_path):
    path = plain_sentencepiece_model(tmp_path, control_symbols=[EOT])
    old = spm.SentencePieceProcessor(model_file=path)
    tok, added = adapt_tokenizer(path)
    assert added == 9  # EOT was already there; eight markers and "\n" are new
    assert tok.eot_id == old.piece_to_id(EOT)
    assert tok.decode(tok.encode(f"the dog{EOT}")) == f"the dog{EOT}"
