"""Writes data/ner_small/{train,validation}.jsonl: short sentences in our own words with people (PER),
places (LOC) and organisations (ORG) tagged in BIO form, one {"tokens": [...], "tags": [...]} per line.

Deterministic; rerun to regenerate the committed files. A third of the names of each kind appear only
in validation, so the entity F1 there measures tagging from context, not recall of names seen in training.
"""

import json
import random
from pathlib import Path

FIRST = ["Anna", "Marek", "Lucia", "Tomas", "Ingrid", "Rafael", "Mei", "Kofi", "Sofia", "Jonas", "Priya", "Emil",
         "Nadia", "Oscar", "Leila", "Hugo", "Yuki", "Dmitri", "Clara", "Samuel", "Amara", "Felix", "Greta", "Tariq",
         "Elena", "Viktor", "Noor", "Pablo", "Hanna", "Idris", "Maya", "Lars", "Zofia", "Kenji", "Olga", "Bruno"]
LAST = ["Novak", "Lindqvist", "Okafor", "Moreau", "Tanaka", "Rossi", "Kowalski", "Haddad", "Fischer", "Alvarez",
        "Brennan", "Petrov", "Mensah", "Dubois", "Sato", "Jensen", "Costa", "Weber", "Nakamura", "Ferreira",
        "Horvat", "Quinn", "Bauer", "Osei", "Larsen", "Castillo", "Ivanova", "Keller", "Mwangi", "Varga"]
PLACES = ["Lisbon", "Nairobi", "Oslo", "Kyoto", "Porto Alegre", "Valencia", "Krakow", "Accra", "Tallinn",
          "Montreal", "Glasgow", "Lyon", "San Diego", "Hamburg", "Cape Town", "Bergen", "Seville", "Osaka",
          "New Delhi", "Ljubljana", "Rotterdam", "Quito", "Adelaide", "Tbilisi", "Bologna", "Hanoi", "Dublin",
          "Salzburg", "Marrakesh", "Vancouver", "Buenos Aires", "Helsinki", "Gdansk", "Lagos", "Perth", "Bilbao"]
ORG_HEADS = ["Northwind", "Bluefern", "Silverline", "Redmoor", "Ironbridge", "Clearwater", "Greenhill", "Brightpath",
             "Stonegate", "Westbrook", "Goldcrest", "Oakridge", "Riverside", "Sunfield", "Highmark", "Lakeshore",
             "Copperleaf", "Fairhaven", "Eastgate", "Maplewood", "Blackstone", "Whitecliff", "Starling", "Harborview"]
ORG_TAILS = ["Bank", "Labs", "Airlines", "Foundation", "Motors", "University", "Insurance", "Systems", "Press",
             "Hospital", "Energy", "Group", "Council", "Museum", "Pharmaceuticals", "Robotics"]
TEMPLATES = [
    "{PER} moved to {LOC} last spring .",
    "{PER} works for {ORG} in {LOC} .",
    "Yesterday {PER} met {PER} at the {ORG} office .",
    "{ORG} opened a new branch in {LOC} this week .",
    "The mayor of {LOC} thanked {PER} for the donation .",
    "{PER} said that {ORG} will hire two hundred people .",
    "According to {PER} , the train from {LOC} to {LOC} was late again .",
    "{ORG} and {ORG} signed a contract on Monday .",
    "After ten years at {ORG} , {PER} retired to {LOC} .",
    "We flew from {LOC} to {LOC} with {ORG} .",
    "{PER} is the new director of {ORG} .",
    "The conference in {LOC} was organised by {ORG} .",
    "My sister visited {LOC} with {PER} .",
    "Shares of {ORG} rose sharply after {PER} spoke .",
    "{PER} grew up in {LOC} and studied at {ORG} .",
    "A storm closed the port of {LOC} for two days .",
    "Nobody at {ORG} expected {PER} to resign .",
    "{PER} and {PER} wrote the report together .",
    "The festival in {LOC} drew thousands of visitors .",
    "{ORG} fined the contractor for the delay in {LOC} .",
    "Did {PER} really leave {ORG} ?",
    "I bought the tickets from {ORG} before leaving {LOC} .",
    "Officials in {LOC} praised {ORG} for the new bridge .",
    "{PER} painted the mural near the station in {LOC} .",
    "Last night {PER} called me from {LOC} .",
    "The report by {ORG} blames the weather .",
    "Our team lost to the club from {LOC} on Sunday .",
    "{PER} , a nurse at {ORG} , won the award .",
    "Rain is expected in {LOC} and {LOC} tomorrow .",
    "The new phone from {ORG} sold out in a day .",
    "She asked {PER} about the budget .",
    "The museum will lend two paintings to {ORG} .",
]
# sentences with no entity at all, so the model also learns when to say O
PLAIN = [
    "The weather was lovely all week .",
    "Please close the window before you leave .",
    "We cooked soup and baked bread on Saturday .",
    "Prices went up again this month .",
    "The meeting was moved to next Tuesday .",
    "He forgot his umbrella on the bus .",
    "Most of the guests arrived late .",
    "The children planted tomatoes in the garden .",
]


def split_names(rng: random.Random, names: list[str]) -> tuple[list[str], list[str]]:
    names = names[:]
    rng.shuffle(names)
    cut = len(names) // 3
    return names[cut:], names[:cut]


def entity(kind: str, pools: dict[str, list[str]], rng: random.Random) -> list[str]:
    if kind == "PER":
        first = rng.choice(pools["FIRST"])
        return [first, rng.choice(pools["LAST"])] if rng.random() < 0.7 else [first]
    if kind == "LOC":
        return rng.choice(pools["LOC"]).split()
    head = rng.choice(pools["ORG"])
    return [head, rng.choice(ORG_TAILS)] if rng.random() < 0.8 else [head]


def sentence(template: str, pools: dict[str, list[str]], rng: random.Random) -> dict:
    tokens, tags = [], []
    for word in template.split():
        if word in ("{PER}", "{LOC}", "{ORG}"):
            kind = word[1:-1]
            words = entity(kind, pools, rng)
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def main() -> None:
    rng = random.Random(2024)
    first_tr, first_va = split_names(rng, FIRST)
    last_tr, last_va = split_names(rng, LAST)
    loc_tr, loc_va = split_names(rng, PLACES)
    org_tr, org_va = split_names(rng, ORG_HEADS)
    pools = {
        "train": {"FIRST": first_tr, "LAST": last_tr, "LOC": loc_tr, "ORG": org_tr},
        "validation": {"FIRST": first_va, "LAST": last_va, "LOC": loc_va, "ORG": org_va},
    }
    folder = Path(__file__).resolve().parent.parent / "data" / "ner_small"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 600), ("validation", 150)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                template = rng.choice(PLAIN) if i % 12 == 0 else rng.choice(TEMPLATES)
                fh.write(json.dumps(sentence(template, pools[split], rng)) + "\n")


if __name__ == "__main__":
    main()
