"""A real tokenizer for causal-LM tests, trained here: byte-level BPE on a small corpus, saved as a
PreTrainedTokenizerFast folder (optionally with a chat template) that AutoTokenizer loads offline."""
from __future__ import annotations

from pathlib import Path

# a chat template in the usual shape: role markers, an end marker per turn, a generation prompt; unknown roles
# are refused by the template itself (what a real template's raise_exception does)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                 "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                 "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CHAT_SPECIALS = ["<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_bpe(folder: Path, corpus: list[str], vocab_size: int, specials: list[str], eos: str,
              unk: str | None = None, chat_template: str | None = None):
    """Train, save into `folder` and return the PreTrainedTokenizerFast (pad = eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = {"unk_token": unk} if unk else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=eos, **extra)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return tok
