"""Character-level tokenizer shared by every model of the toy family.

One token per character keeps digit and letter positions explicit, which the skills
(addition, reversal, recall) need, and makes prompt/answer boundaries exact.
"""

import re

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
#: newline plus printable ASCII; text data is reduced to this alphabet before use
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE model without merges: every character is its own token, BOS is prepended."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def to_alphabet(text: str) -> str:
    """Map text onto the tokenizer's alphabet: tabs become spaces, other characters go."""
    return _OUTSIDE.sub("", text.replace("\t", "    "))


_OUTSIDE = re.compile(r"[^\n\x20-\x7e]")
