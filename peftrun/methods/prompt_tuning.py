r"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

A table of n virtual tokens P ∈ R^{n×d} is the only thing that trains; the frozen model reads

    h = f([P ; E(x)]),

P initialised at random (RANDOM, N(0, 1) as torch's embedding), from the embeddings of n random vocabulary
tokens (SAMPLE_VOCAB), or from the embeddings of a text's tokens repeated or cut to n (TEXT, e.g.
"Classify if the tweet is a complaint or not:"). Encoder-decoder models get a table of 2n rows when
num_transformer_submodules is 2 (peft's default for SEQ_2_SEQ_LM), of which the encoder reads the first n.
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.methods.configs import PromptTuningConfig
from peftrun.methods.prompting import (
    PromptEncoder,
    attach,
    embed_ids,
    fill_geometry,
    load_tokenizer_named,
    soft_prompt_method,
    text_init_ids,
    word_embeddings,
)


def init_prompt_table(table: nn.Embedding, config: PromptTuningConfig, words: nn.Module) -> None:
    """RANDOM leaves torch's N(0, 1); the others copy rows of the frozen word embeddings (in fp32).

    Nothing to copy on the meta device (parameter counts) or when the table comes from a saved adapter.
    """
    if config.inference_mode or words.weight.is_meta or config.prompt_tuning_init == "RANDOM":
        return
    total = table.num_embeddings
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, words.num_embeddings, (total,))
    else:
        tokenizer = load_tokenizer_named(config.tokenizer_name_or_path, config.tokenizer_kwargs)
        ids = text_init_ids(config.prompt_tuning_init_text, tokenizer, total)
    with torch.no_grad():
        table.weight.copy_(embed_ids(words, ids))


def apply(peft_model, config: PromptTuningConfig, adapter_name: str) -> None:
    fill_geometry(config, peft_model.model, peft_model.task_type)
    words = word_embeddings(peft_model.model)
    encoder = PromptEncoder(config, device=words.weight.device)
    init_prompt_table(encoder.embedding, config, words)
    attach(peft_model, config, adapter_name, encoder)


METHOD = soft_prompt_method("prompt_tuning", apply=apply)
