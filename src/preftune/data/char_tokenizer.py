"""A character-level tokenizer saved as a real Hugging Face tokenizer folder.

Used by the built-in arithmetic task and by the tests: it is built locally (no download) and loads
back through `AutoTokenizer.from_pretrained`, the same path a user's tokenizer takes.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# A minimal chat template in the usual Jinja form: role headers, then content, then EOS after
# assistant turns; `add_generation_prompt` opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n\t"


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, *, chat_template: str | None = None, model_max_length: int = 4096
) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer with one token per character of `alphabet` plus 4 special tokens.

    Ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then the characters in the order given (duplicates
    dropped). Characters outside the alphabet map to <unk>. Save it with `save_pretrained(dir)`.
    """
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." would miss "\n"
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **SPECIAL_TOKENS)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
