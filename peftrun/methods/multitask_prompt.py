r"""Multitask prompt tuning (Wang et al., 2023, "Multitask Prompt Tuning Enables Parameter-Efficient
Transfer Learning").

One prompt P* ∈ R^{n×d} is shared by all tasks; task k rescales it with a rank-r product

    P_k = P* ⊙ (u_k v_k^T),    u_k ∈ R^{n×r} (prefix_task_cols[k]),  v_k ∈ R^{r×d} (prefix_task_rows[k]),

u, v ~ N(0, 0.02²). Each batch row carries its task id k (`task_ids`; the recipe's data.task_column).
Training runs in two stages: a source run over several tasks learns P* and the u_k v_k; a target run starts
from that checkpoint (prompt_tuning_init_state_dict_path):
  AVERAGE_SOURCE_TASKS  P* from the source, every target task's u, v = the mean of the source tasks' u, v;
  EXACT_SOURCE_TASK     P* from the source, u, v = those of source task prompt_tuning_init_task;
  ONLY_SOURCE_SHARED    P* from the source, u, v fresh.
RANDOM and TEXT initialise P* as prompt tuning does. On encoder-decoder models with
num_transformer_submodules 2 the second n rows lead the decoder's input (peft's behaviour in training; its
generation uses the encoder prompt only, so a seq2seq recipe is clearer with num_transformer_submodules 1).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from peftrun.errors import PeftrunError
from peftrun.methods.configs import SOURCE_INITS, MultitaskPromptTuningConfig
from peftrun.methods.prompt_tuning import init_prompt_table
from peftrun.methods.prompting import (
    PromptEncoder,
    adapter_weights_file,
    attach,
    fill_geometry,
    soft_prompt_method,
    take,
    word_embeddings,
)


class MultitaskPromptEncoder(PromptEncoder):
    leads_decoder = True

    def __init__(self, config: MultitaskPromptTuningConfig, device=None):
        super().__init__(config, device=device)
        self.num_tasks = config.num_tasks
        total, r, d = self.total_virtual_tokens, config.num_ranks, config.token_dim
        self.prefix_task_cols = nn.Parameter(torch.empty(config.num_tasks, total, r, device=device))
        self.prefix_task_rows = nn.Parameter(torch.empty(config.num_tasks, r, d, device=device))
        nn.init.normal_(self.prefix_task_cols, std=0.02)
        nn.init.normal_(self.prefix_task_rows, std=0.02)

    def prompt(self, task_ids: torch.Tensor | None) -> torch.Tensor:
        if task_ids is None:
            if self.num_tasks != 1:
                raise PeftrunError(
                    f"multitask prompt tuning with {self.num_tasks} tasks needs each row's task id (task_ids)",
                    hint="name the column that holds it with data.task_column",
                )
            task_ids = torch.zeros(1, dtype=torch.long, device=self.embedding.weight.device)
        task_ids = torch.as_tensor(task_ids, device=self.embedding.weight.device).long().view(-1)
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise PeftrunError(f"task ids run from 0 to {self.num_tasks - 1}; got {task_ids.tolist()[:8]}")
        scale = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]  # (B, total, d), rank r
        return self.embedding.weight.unsqueeze(0) * scale

    def saved_state(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.embedding.weight,
            "prefix_task_cols": self.prefix_task_cols,
            "prefix_task_rows": self.prefix_task_rows,
        }

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saved(state)
        self.prefix_task_cols.data.copy_(take(state, "prefix_task_cols", self.prefix_task_cols.shape))
        self.prefix_task_rows.data.copy_(take(state, "prefix_task_rows", self.prefix_task_rows.shape))

    @torch.no_grad()
    def init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        where = "method.prompt_tuning_init_state_dict_path"
        source = load_file(str(adapter_weights_file(config.prompt_tuning_init_state_dict_path, where)))
        device = self.embedding.weight.device
        shared = take(dict(source), "prompt_embeddings", self.embedding.weight.shape)
        self.embedding.weight.copy_(shared.to(device))
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source.get("prefix_task_cols"), source.get("prefix_task_rows")
        if cols is None or rows is None:
            raise PeftrunError(
                "the source adapter has no prefix_task_cols/rows: not a multitask prompt", where=where
            )
        if (
            cols.shape[1:] != self.prefix_task_cols.shape[1:]
            or rows.shape[1:] != self.prefix_task_rows.shape[1:]
        ):
            raise PeftrunError(
                f"source task factors {tuple(cols.shape)}/{tuple(rows.shape)} do not fit "
                f"{tuple(self.prefix_task_cols.shape)}/{tuple(self.prefix_task_rows.shape)} (tasks, tokens, ranks, d)",
                where=where,
                hint="use the source run's num_virtual_tokens and num_ranks",
            )
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
        else:
            k = config.prompt_tuning_init_task or 0
            if k >= cols.shape[0]:
                raise PeftrunError(
                    f"prompt_tuning_init_task {k}: the source has tasks 0..{cols.shape[0] - 1}",
                    where="method.prompt_tuning_init_task",
                )
            cols, rows = cols[k : k + 1], rows[k : k + 1]
        # every target task starts from the same source factors
        self.prefix_task_cols.copy_(cols.expand_as(self.prefix_task_cols).to(device))
        self.prefix_task_rows.copy_(rows.expand_as(self.prefix_task_rows).to(device))


def apply(peft_model, config: MultitaskPromptTuningConfig, adapter_name: str) -> None:
    fill_geometry(config, peft_model.model, peft_model.task_type)
    words = word_embeddings(peft_model.model)
    encoder = MultitaskPromptEncoder(config, device=words.weight.device)
    if config.prompt_tuning_init in SOURCE_INITS:
        if not (config.inference_mode or words.weight.is_meta):
            encoder.init_from_source(config)
    else:
        init_prompt_table(encoder.embedding, config, words)
    attach(peft_model, config, adapter_name, encoder)


METHOD = soft_prompt_method("multitask_prompt_tuning", apply=apply)
