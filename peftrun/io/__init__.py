"""Files on disk: atomic writes (atomic), credential scrubbing (scrub), rows as csv/tsv/jsonl (rows), the
peft adapter format (peft_format) and loading a saved adapter onto its base model (loading).

Import the submodule you need; this package imports nothing so that `peftrun.io.atomic` stays light.
"""
