r"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

The virtual tokens come out of a small prompt encoder applied to n learned input embeddings e_1..e_n:

    MLP:   P = W_3 ReLU(W_2 ReLU(W_1 e + b_1) + b_2) + b_3          (d -> h -> h -> d)
    LSTM:  P = W_2 ReLU(W_1 BiLSTM(e) + b_1) + b_2                  (BiLSTM d -> 2h, then 2h -> 2h -> d)

with h = encoder_hidden_size (default: the model's width). The reparameterisation smooths and couples the
virtual tokens during training; afterwards only its output P is needed, so the checkpoint holds
`prompt_embeddings` = P (as peft saves it) and a loaded adapter uses P as a fixed table. Resume
checkpoints keep the encoder itself as well (trainable.safetensors), so an interrupted run carries on exactly.
The MLP always has the three layers above (encoder_num_layers applies to the LSTM only, as in peft).
"""

from __future__ import annotations

import torch
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import PromptEncoderConfig
from peftrun.methods.prompting import (
    PromptEncoder,
    attach,
    fill_geometry,
    soft_prompt_method,
    take,
)


class PTuningEncoder(PromptEncoder):
    def __init__(self, config: PromptEncoderConfig, device=None):
        super().__init__(config, device=device)
        d, h = config.token_dim, config.encoder_hidden_size
        self.kind = config.encoder_reparameterization_type
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        self.head_dropped = False
        if config.inference_mode:
            return  # a saved adapter: the table already holds P
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                d,
                h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                device=device,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(), nn.Linear(2 * h, d, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(d, h, device=device),
                nn.ReLU(),
                nn.Linear(h, h, device=device),
                nn.ReLU(),
                nn.Linear(h, d, device=device),
            )

    def prompt(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        e = self.embedding.weight.unsqueeze(0)
        if self.mlp_head is None:
            return e
        if self.lstm_head is not None:
            e = self.lstm_head(e)[0]
        return self.mlp_head(e)

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint holds the encoder's output: use it as the table from now on (the head goes)."""
        self.embedding.weight.data.copy_(take(state, "prompt_embeddings", self.embedding.weight.shape))
        self.head_dropped = self.mlp_head is not None
        self.lstm_head = None
        self.mlp_head = None


def apply(peft_model, config: PromptEncoderConfig, adapter_name: str) -> None:
    fill_geometry(config, peft_model.model, peft_model.task_type)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    device = peft_model.model.get_input_embeddings().weight.device
    attach(peft_model, config, adapter_name, PTuningEncoder(config, device=device))


def after_step(peft_model, name: str, step: int, total_steps: int) -> None:
    """Refuse to train an adapter loaded from peft's format, which replaced the encoder by its output
    table: the optimizer would keep stepping a head that no longer computes anything."""
    if peft_model.prompt_encoders[name].head_dropped:
        raise PeftrunError(
            "this p_tuning adapter was loaded from peft's format, which holds the prompt encoder's output, not "
            "the encoder: it cannot train further",
            hint="continue an interrupted run with --resume (peftrun's checkpoints keep the encoder)",
        )



METHOD = soft_prompt_method("p_tuning", apply=apply, after_step=after_step)
