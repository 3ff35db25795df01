"""Default data config: which tasks, how many problems, how to tokenize and batch them.

The trainer's config holds this as `config.data`. Fields that change the generated records
(tasks, sizes, seed, GSM8K file) are fingerprinted by `data.builder`, so a changed config
never reuses stale data; the rest (seq_len, pack, answer_only, ...) only shape the pipeline.
"""

from __future__ import annotations

import ml_collections

from data.tasks import TASKS


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the data config, sized for quick runs on a 2-core CPU."""
    c = ml_collections.ConfigDict()
    # Task name -> {"weight": relative share of problems, "knobs": difficulty settings}.
    c.tasks = ml_collections.ConfigDict(
        {name: {"weight": 1.0, "knobs": ml_collections.ConfigDict()} for name in TASKS}
    )
    # program_write draws from a fixed list of function specs: ~170 distinct prompts in all.
    c.tasks.program_write.weight = 0.4
    c.train_size = 2000
    c.validation_size = 100
    c.test_size = 100
    c.corrupted_size = 200  # corrupted traces for the reward models; 0 skips them
    c.seed = 0

    c.vocab_size = 1024
    c.tokenizer_model_type = "unigram"
    # Drop learned pieces that join letters inside a word, so words are spelled one letter per
    # token (data.tokenizer.drop_word_internal_pieces); 12-45% more tokens per problem by task.
    c.tokenizer_spell_words = False
    c.tokenizer_path = ""  # "" trains our own; else a sentencepiece model to adapt
    c.tokenizer_corpus_size = 2000  # train records rendered (with and without thinking)
    c.gsm8k_path = ""  # "" for none; else a GSM8K-format JSONL added to the train split

    c.seq_len = 512
    c.pack = True
    c.answer_only = False  # same problems, thinking blocks dropped (the no-thinking baseline)
    # Share of examples turned into redacted multi-turn follow-up dialogues (data.multiturn),
    # which teach the model to answer from a context whose earlier thoughts were redacted.
    c.multiturn_fraction = 0.0
    c.shuffle = True  # a global index shuffle, reshuffled each epoch; needs no buffer
    c.num_workers = 0  # grain worker processes; 0 runs the pipeline in-process
    c.prefetch = 2  # batches prefetched by a background thread; 0 for none
    return c


def get_config() -> ml_collections.ConfigDict:
    """The default data config under a `data` field, as a training config holds it."""
    return ml_collections.ConfigDict({"data": default_data_config()})
