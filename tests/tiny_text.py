"""Tiny models saved together with a tokenizer that fits their vocabulary, for end-to-end tests.

A WordPiece vocabulary (the test's own words, and their letters for anything else) is built with the
`tokenizers` library; T5 uses the byte-level ByT5 tokenizer, which needs no files. Special-token ids match tests/tiny.py's
configs (llama/gpt2: pad 0, bos 1, eos 2; bert: pad 0; t5: pad 0, eos 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import ARCH_CONFIGS, save_tiny

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
SPECIALS = {
    "llama": ["<pad>", "<s>", "</s>", "<unk>"],
    "gpt2": ["<pad>", "<s>", "</s>", "<unk>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}


def word_tokenizer(arch: str, corpus: list[str]):
    """A lower-casing WordPiece tokenizer whose vocabulary fits the tiny `arch` model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[arch]
    unk = next(s for s in specials if "unk" in s.lower())
    # the vocabulary is built here, in a fixed order, so token ids are the same in every process
    limit = ARCH_CONFIGS[arch]["vocab_size"]
    chars = sorted({c for line in corpus for c in line.lower() if not c.isspace()})
    words = sorted({w for line in corpus for w in line.lower().split()} - set(chars))
    vocab = list(specials) + chars + [f"##{c}" for c in chars]
    vocab += words[: max(limit - len(vocab), 0)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab[:limit])}, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    if arch == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif arch == "roberta":
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
        names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        names = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    if arch in ("llama", "gpt2"):
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_with_tokenizer(path: Path, arch: str, task_type: str, corpus: list[str], **overrides):
    """Save a tiny model of `arch` for `task_type` with a matching tokenizer in `path`; return the tokenizer."""
    if arch == "t5":
        from transformers import ByT5Tokenizer

        tokenizer = ByT5Tokenizer()
    else:
        tokenizer = word_tokenizer(arch, corpus + ["assistant user system :"])
    save_tiny(path, arch, task_type, **overrides)
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine two threads wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
