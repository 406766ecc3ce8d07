"""Writes data/review_prompts/{train,validation}.jsonl: prompts asking for a short movie review, in our own
words, for GRPO (recipes/offline/smollm2_grpo_sentiment.yaml). Half ask for a review of a described film, half
ask to go on from the first words of one (trl's gpt2-sentiment continues IMDB review openings). The two splits
share no film and no opening. Deterministic; rerun to regenerate the committed files."""

import json
import random
from pathlib import Path

FILMS = [
    "a slow thriller about a lighthouse keeper", "a musical set in a rainy mining town", "a heist comedy with a "
    "talking parrot", "a three-hour war epic", "a sequel to a film about killer bees", "a documentary about "
    "competitive cheese rolling", "a space opera made on a tiny budget", "a romantic comedy set in an airport",
    "a silent film about two clockmakers", "a horror film that takes place in a library", "a biopic of a "
    "forgotten chess champion", "a teen drama about a school orchestra", "an animated film about a lost umbrella",
    "a remake of a classic western", "a courtroom drama that runs out of ideas", "a disaster movie about a "
    "melting glacier", "a low-budget zombie film shot in one night", "a family film about a very old dog",
    "a spy thriller with a confusing plot", "a period drama about a bakery in Vienna", "a superhero film "
    "with too many characters", "a road movie across an empty desert", "a ghost story set on a cruise ship",
    "a detective film with a predictable twist", "a cooking competition film", "an experimental film with no "
    "dialogue", "a comedy about two rival florists", "a martial arts film set in a supermarket",
    "a science fiction film about time-travelling plumbers", "a boxing drama about an ageing champion",
    "a mockumentary about a failing rock band", "a fantasy film with a dragon who hates flying",
]
OPENINGS = [
    "The acting in this film was", "I walked out of the cinema feeling", "Two hours of my life spent on",
    "The plot of this movie", "Honestly, the ending", "The director clearly wanted", "From the first scene,",
    "I expected a lot from this film, but", "The soundtrack", "My kids dragged me to this one and",
    "This is the kind of movie that", "The special effects were", "Halfway through, I realised",
    "The lead actor's performance", "Nobody warned me that", "The dialogue in this film",
    "After all the hype,", "The cinematography", "I have seen this film three times and", "The script",
    "Compared with the book,", "The last twenty minutes", "What surprised me most was", "The villain",
]


def main() -> None:
    rng = random.Random(2024)
    films, openings = FILMS[:], OPENINGS[:]
    rng.shuffle(films)
    rng.shuffle(openings)
    held_films, held_openings = films[:8], openings[:6]  # the validation split's own films and openings
    splits = {
        "train": [f"Write a one-sentence review of {f}." for f in films[8:]]
        + [f'Continue this movie review in one sentence: "{o}"' for o in openings[6:]],
        "validation": [f"Write a one-sentence review of {f}." for f in held_films]
        + [f'Continue this movie review in one sentence: "{o}"' for o in held_openings],
    }
    folder = Path(__file__).resolve().parent
    for split, prompts in splits.items():
        rng.shuffle(prompts)
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for prompt in prompts:
                fh.write(json.dumps({"prompt": prompt}) + "\n")
        print(f"{split}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
