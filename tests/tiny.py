"""Tiny models of each architecture family, built from configs, for fast offline tests."""

from __future__ import annotations

import torch

ARCH_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    "t5": dict(model_type="t5", vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
               num_decoder_layers=2, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "bert": dict(model_type="bert", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=128, pad_token_id=0),
    "roberta": dict(model_type="roberta", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "bloom": dict(model_type="bloom", vocab_size=128, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3),
}
# more decoder-only families (the chunked causal-LM loss is checked on each: tests/test_lm_loss.py)
_DECODER = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, pad_token_id=0)
ARCH_CONFIGS.update(
    mistral=dict(_DECODER, model_type="mistral", intermediate_size=64, num_key_value_heads=2),
    qwen2=dict(_DECODER, model_type="qwen2", intermediate_size=64, num_key_value_heads=2),
    opt=dict(_DECODER, model_type="opt", ffn_dim=64, word_embed_proj_dim=16, pad_token_id=1),
    gpt_neox=dict(_DECODER, model_type="gpt_neox", intermediate_size=64),
    phi=dict(_DECODER, model_type="phi", intermediate_size=64),
)
# more seq2seq families (the chunked seq2seq loss is checked on each: tests/test_lm_loss.py)
_T5ISH = dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
              decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=8)
_BARTISH = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
ARCH_CONFIGS.update(
    mt5=dict(_T5ISH, model_type="mt5", tie_word_embeddings=False),
    umt5=dict(_T5ISH, model_type="umt5", tie_word_embeddings=False),
    bart=dict(_BARTISH, model_type="bart"),
    mbart=dict(_BARTISH, model_type="mbart"),
)
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}


def tiny_config(arch: str, **overrides):
    from transformers import AutoConfig

    data = {**ARCH_CONFIGS[arch], **overrides}
    return AutoConfig.for_model(**data)


def tiny_model(arch: str, task_type: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        config.num_labels = overrides.get("num_labels", 3)
    model = getattr(transformers, TASK_CLASSES[task_type]).from_config(config)
    return model.eval()


def tiny_batch(model, task_type: str, batch: int = 2, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task_type == "SEQ_2_SEQ_LM":
        out["decoder_input_ids"] = torch.randint(4, vocab, (batch, 4), generator=g)
    return out


def train_losses(model, batch: dict, lr: float, steps: int, train: bool = True) -> list[float]:
    """`steps` AdamW steps on one batch over every trainable parameter: each step's loss. In train mode,
    or with `train=False` in eval mode (no dropout: a clean loss curve)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train(train)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def save_tiny(path, arch: str, task_type: str, seed: int = 0, **overrides):
    model = tiny_model(arch, task_type, seed=seed, **overrides)
    model.save_pretrained(path)
    return model
