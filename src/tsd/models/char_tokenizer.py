"""The bundled tiny policy's character-level tokenizer.

One token per character of a small alphabet, plus special tokens for the tags, so that a
reasoning step ends on exactly one token (``</step>``). It is a plain
``PreTrainedTokenizerFast``: load it with :func:`load_char_tokenizer`, never ``AutoTokenizer``
(which, next to a Qwen2 ``config.json``, picks Qwen's tokenizer class and drops spaces).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TAGS = ("<step>", "</step>", "<answer>", "</answer>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *TAGS)
#: written into ``tokenizer_config.json`` by ``save_pretrained`` so that a saved policy directory
#: (the bundled one, an export) is loaded with :func:`load_char_tokenizer` again
CHAR_TOKENIZER_MARKER = "tsd_char_tokenizer"
#: every character the prompts and completions of the tiny policy use
ALPHABET = "0123456789+-*/()=,[]:<> \n" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.?!'"


def build_char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """The special tokens, then one token per character of :data:`ALPHABET`. ``vocab_size`` pads
    the vocabulary with ``<t{i}>`` filler tokens up to that size, so that every id a model of that
    vocabulary samples decodes (a random model of a real LM's shape: ``scripts/gpu_check.py``);
    text encodes to the same ids either way."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size: {vocab_size} < the {len(vocab)} tokens of the char tokenizer")
        vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own pre-token ([\s\S] so that "\n" is one too); tags are added tokens
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(TAGS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    out.init_kwargs[CHAR_TOKENIZER_MARKER] = True
    return out


def load_char_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    path = Path(path)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(TAGS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.init_kwargs[CHAR_TOKENIZER_MARKER] = True
    return tok
