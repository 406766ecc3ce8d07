"""Build this folder's two-task review data from data/quickstart (run from the repo root; deterministic).

Each review becomes two rows: task `sentiment` (answer positive/negative, the quickstart label) and task
`subject` (answer: what the review is about, found from a fixed list of the subjects that occur).
"""

import csv
from pathlib import Path

SUBJECTS = [
    "app", "bike lock", "blender", "coffee grinder", "delivery", "desk lamp", "garden hose", "hair dryer",
    "headphones", "hotel room", "kettle", "language course", "laptop", "museum tour", "pasta", "phone case",
    "printer", "rental car", "running shoes", "sofa", "support team", "tent", "train ride", "winter coat",
]
QUESTIONS = {"sentiment": "Is this review positive or negative?", "subject": "What is this review about?"}


def subject_of(text: str) -> str:
    found = [s for s in SUBJECTS if f" {s} " in f" {text.lower().replace('.', ' ')} "]
    if len(found) != 1:
        raise ValueError(f"no single subject in {text!r}: {found}")
    return found[0]


def main() -> None:
    here = Path(__file__).parent
    for split in ("train", "validation"):
        with open(Path("data/quickstart") / f"{split}.csv", newline="") as fh:
            reviews = list(csv.DictReader(fh))
        with open(here / f"{split}.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["task", "question", "text", "answer"])
            for row in reviews:
                out.writerow(["sentiment", QUESTIONS["sentiment"], row["text"], row["label"]])
                out.writerow(["subject", QUESTIONS["subject"], row["text"], subject_of(row["text"])])


if __name__ == "__main__":
    main()
