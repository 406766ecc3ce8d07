"""Peak resident memory of a few real training steps on CPU, run in a fresh process by tests/test_estimate.py.

python tests/memory_probe.py MODEL TASK METHOD BATCH SEQ STEPS [DTYPE]  ->  one JSON line:
{"baseline": RSS before the model exists, "peak": the process's peak RSS (getrusage), "loss": last loss}
MODEL is a bundled architecture name or a local folder; weights are random (the estimate needs none).
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peftrun.adapted import wrap  # noqa: E402
from peftrun.estimate import _batch, process_baseline  # noqa: E402
from peftrun.methods.lora import LoraConfig  # noqa: E402
from peftrun.models import DTYPES, build_from_config  # noqa: E402
from peftrun.training.build import adamw_kernel  # noqa: E402


def main() -> None:
    name, task, method, batch, seq, steps = sys.argv[1:7]
    dtype = DTYPES[sys.argv[7]] if len(sys.argv) > 7 else torch.float32
    batch, seq, steps = int(batch), int(seq), int(steps)
    torch.manual_seed(0)
    baseline = process_baseline()
    model = build_from_config(name, task, dtype=torch.float32 if method == "full" else dtype, num_labels=2)
    if method == "lora":
        model = wrap(model, task, "lora", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **adamw_kernel(params))
    vocab = model.get_input_embeddings().num_embeddings
    loss = None
    for _ in range(steps):
        inputs = {
            k: torch.randint(0, min(vocab, 2), v.shape)
            if k == "labels" and task == "SEQ_CLS"
            else torch.randint(0, vocab, v.shape)
            for k, v in _batch(model, task, batch, seq, 3).items()
        }
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "loss": float(loss.detach())}))


if __name__ == "__main__":
    main()
