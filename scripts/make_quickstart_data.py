"""Writes data/quickstart/{train,validation}.csv: short product reviews in our own words, labelled
positive or negative. Deterministic; rerun to regenerate the committed files."""

import csv
import random
from pathlib import Path

SUBJECTS = ["the kettle", "this laptop", "the delivery", "the hotel room", "our new sofa", "the headphones",
            "the support team", "the pasta", "this phone case", "the train ride", "the museum tour", "the app",
            "the bike lock", "the winter coat", "the printer", "the garden hose", "the coffee grinder", "the tent",
            "the language course", "the hair dryer", "the desk lamp", "the running shoes", "the blender", "the rental car"]
GOOD = ["works perfectly", "exceeded every expectation", "was a delight from start to finish", "is sturdy and well made",
        "arrived early and in great shape", "made my week", "is worth every penny", "feels premium",
        "was friendly and quick", "keeps getting better", "does exactly what it promises", "is simply wonderful"]
BAD = ["broke after two days", "was a complete waste of money", "arrived late and damaged", "stopped working at once",
       "feels cheap and flimsy", "was rude and unhelpful", "is a total disappointment", "smells awful",
       "crashes all the time", "leaks everywhere", "never did what it promised", "is the worst purchase I have made"]
GOOD_TAILS = ["", " I would buy it again.", " Highly recommended.", " Five stars.", " Thank you!", " Love it."]
BAD_TAILS = ["", " I want a refund.", " Avoid it.", " One star.", " Never again.", " So annoyed."]
OPENERS = ["", "Honestly, ", "Well, ", "To be fair, ", "After a month, ", "So far "]


def rows(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        positive = rng.random() < 0.5
        verb = rng.choice(GOOD if positive else BAD)
        tail = rng.choice(GOOD_TAILS if positive else BAD_TAILS)
        subject = rng.choice(SUBJECTS)
        opener = rng.choice(OPENERS)
        text = f"{opener}{subject} {verb}.{tail}"
        out.append((text[0].upper() + text[1:], "positive" if positive else "negative"))
    return out


def main() -> None:
    rng = random.Random(1234)
    folder = Path(__file__).resolve().parent.parent / "data" / "quickstart"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 320), ("validation", 80)):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(rows(rng, n))


if __name__ == "__main__":
    main()
