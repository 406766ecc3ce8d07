"""`peftrun preview`: the first training examples of a causal-LM recipe as the model will see them, the trained
tokens highlighted, and counts over the train and eval splits. Only the tokenizer and the data are loaded, never
the model's weights: a wrong template or mask shows before a long run, not after it."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftrun.errors import PeftrunError
from peftrun.tasks import CAUSAL_LM, IGNORE_INDEX

# how trained text is marked where the output has no colour (a pipe, a file, NO_COLOR)
OPEN, CLOSE = "[[", "]]"


@dataclass
class Counts:
    """One split's totals: rows, tokens, trained tokens, rows cut to data.max_length."""

    examples: int = 0
    tokens: int = 0
    trained: int = 0
    truncated: int = 0
    first: list = field(default_factory=list)  # the first examples, for printing

    def add(self, example) -> None:
        self.examples += 1
        self.tokens += len(example.input_ids)
        self.trained += sum(1 for label in example.labels if label != IGNORE_INDEX)
        self.truncated += int(example.truncated)


def count(pieces, tokenizer, split: str, keep: int = 0) -> Counts:
    """Every row of a split through causal_example (as training tokenises it), keeping the first `keep`.
    `pieces`: (rows, data section) of each dataset (Splits.pieces), each read with its own keys."""
    from peftrun.data import causal_example

    counts = Counts()
    for index, (ds, data_cfg) in enumerate(pieces):
        which = f"{split} row" if len(pieces) == 1 else f"data.datasets[{index}] {split} row"
        for i, row in enumerate(ds):
            try:
                example = causal_example(row, data_cfg, tokenizer)
            except PeftrunError as exc:
                raise PeftrunError(f"{which} {i}: {exc.message}", where=exc.where, hint=exc.hint) from None
            counts.add(example)
            if counts.examples <= keep:
                counts.first.append(example)
    return counts


def styled(example, tokenizer, marks: bool):
    """The example's text as a rich Text: trained runs bold green (and between OPEN/CLOSE when `marks`), the
    rest dim. Special tokens are shown as written; each run is the difference of two decoded prefixes, so the
    spacing is the tokenizer's own."""
    from rich.text import Text

    labels = example.labels
    bounds = [0] + [i for i in range(1, len(labels)) if (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    text, shown = Text(), ""
    for start, stop in zip(bounds, [*bounds[1:], len(labels)]):
        upto = tokenizer.decode(example.input_ids[:stop], skip_special_tokens=False)
        piece, shown = upto[len(shown) :], upto
        if labels[start] != IGNORE_INDEX:
            body = piece.lstrip(" ")  # a word-piece decoder's joining space is not the answer's
            text.append(piece[: len(piece) - len(body)])
            text.append(f"{OPEN}{body}{CLOSE}" if marks else body, style="bold green")
        else:
            text.append(piece, style="dim")
    return text


def preview(recipe, n: int, console) -> dict[str, Counts]:
    """Print the first `n` train examples and the counts of each split; return the counts."""
    from rich.table import Table

    from peftrun.data import load_splits
    from peftrun.models import load_tokenizer

    if recipe.model.task_type != CAUSAL_LM or recipe.training.objective != "supervised":
        raise PeftrunError(
            "preview shows supervised causal-LM examples (what is trained of each row)",
            where="model.task_type" if recipe.model.task_type != CAUSAL_LM else "training.objective",
            hint=f"task_type: {CAUSAL_LM} with training.objective: supervised",
        )
    data_cfg = recipe.data
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(data_cfg, recipe.training.seed)
    counts = {
        "train": count(splits.pieces("train", data_cfg), tokenizer, "train", keep=n),
        "eval": count(splits.pieces("eval", data_cfg), tokenizer, "eval"),
    }
    marks = console.color_system is None
    for i, example in enumerate(counts["train"].first):
        trained = sum(1 for label in example.labels if label != IGNORE_INDEX)
        cut = f", cut to {data_cfg.max_length}" if example.truncated else ""
        console.rule(f"train example {i + 1}: {len(example.input_ids)} tokens, {trained} trained{cut}")
        console.print(styled(example, tokenizer, marks), highlight=False, markup=False)
    console.rule()
    settings = f"format {data_cfg.format}"
    if data_cfg.format == "chat":
        template = data_cfg.chat_template or "the tokenizer's own"
        settings += f", template {template}, train_on {data_cfg.train_on}"
    console.print(f"trained tokens are {'between ' + OPEN + ' ' + CLOSE if marks else 'bold green'}; {settings}",
                  highlight=False, markup=False)
    table = Table("split", "examples", "tokens", "trained tokens", f"truncated to {data_cfg.max_length}")
    for name, c in counts.items():
        share = f" ({c.trained / c.tokens:.1%})" if c.tokens else ""
        table.add_row(name, f"{c.examples:,}", f"{c.tokens:,}", f"{c.trained:,}{share}", f"{c.truncated:,}")
    console.print(table)
    return counts
