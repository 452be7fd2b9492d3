"""A small plain-text corpus of simple facts, for pretraining runs on a CPU (tests, smoke runs).

    python -m nexus_retrofit.demo.facts --out nexus_retrofit/assets/data

Deterministic (seeded): a made-up world of countries, towns, rivers, animals and crops, described in
varied sentences, plus small arithmetic and counting facts. Every fact is consistent across the
corpus (Lorvik always lies on the same river), so a language model's loss can fall on it by learning
the facts, not only the sentence shapes. One paragraph per line, no blank lines: read as a `.txt`
dataset (one row per line) it gives one row per paragraph.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

FILE_NAME = "facts.txt"
SEED = 0
PARAGRAPHS = 1200

_SYLLABLES = "ka lo vi sen mar tu rel an dor pe li sa no bre ta vin ol gar mi est".split()
_ANIMALS = "goats sheep horses geese cattle bees ducks pigs".split()
_CROPS = "barley wheat rye apples beans oats flax grapes".split()
_COLOURS = "red blue green white yellow grey".split()
_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_WORDS = [  # 13..20, for sums up to twenty
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]  # fmt: skip


def _number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else _WORDS[n - len(_NUMBERS)]


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        if name not in used:
            used.add(name)
            return name


def _world(rng: random.Random) -> list[dict]:
    """Countries, each with a capital, towns, and each town's river, animal, crop and bridges."""
    used: set[str] = set()
    countries = []
    for _ in range(24):
        country = {"name": _name(rng, used), "colour": rng.choice(_COLOURS), "towns": []}
        rivers = [_name(rng, used) for _ in range(2)]
        for _ in range(4):
            country["towns"].append(
                {
                    "name": _name(rng, used),
                    "river": rng.choice(rivers),
                    "animal": rng.choice(_ANIMALS),
                    "crop": rng.choice(_CROPS),
                    "bridges": rng.randint(1, 9),
                }
            )
        country["capital"] = country["towns"][0]["name"]
        countries.append(country)
    return countries


def _town_paragraph(rng: random.Random, country: dict, town: dict) -> str:
    t, c = town["name"], country["name"]
    sentences = [
        rng.choice([f"{t} is a town in {c}.", f"The town of {t} lies in {c}.", f"{t} belongs to {c}."]),
        rng.choice(
            [f"It lies on the river {town['river']}.", f"The river {town['river']} runs through {t}."]
        ),
        rng.choice(
            [
                f"The people of {t} keep {town['animal']} and grow {town['crop']}.",
                f"Farmers near {t} grow {town['crop']}, and many keep {town['animal']}.",
            ]
        ),
        f"{t} has {_number(town['bridges'])} bridge{'s' if town['bridges'] > 1 else ''}.",
    ]
    if t == country["capital"]:
        sentences.append(rng.choice([f"{t} is the capital of {c}.", f"The capital of {c} is {t}."]))
    rest = sentences[1:]
    rng.shuffle(rest)  # the facts in varying order after the first sentence
    return " ".join([sentences[0], *rest])


def _country_paragraph(rng: random.Random, country: dict) -> str:
    towns = [town["name"] for town in country["towns"]]
    rng.shuffle(towns)
    return (
        f"{country['name']} is a country with {_number(len(towns))} towns: {', '.join(towns[:-1])} and "
        f"{towns[-1]}. Its capital is {country['capital']}. The flag of {country['name']} is "
        f"{country['colour']}."
    )


def _arithmetic_paragraph(rng: random.Random) -> str:
    facts = []
    for _ in range(4):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        facts.append(f"{_number(a).capitalize()} plus {_number(b)} is {_number(a + b)}.")
    start = rng.randint(0, 8)
    facts.append("Counting on: " + " ".join(_number(n) for n in range(start, start + 5)) + ".")
    return " ".join(facts)


def facts_corpus(paragraphs: int = PARAGRAPHS, seed: int = SEED) -> str:
    """The corpus as text: `paragraphs` lines, one paragraph each, newline-terminated."""
    rng = random.Random(seed)
    world = _world(rng)
    lines = []
    for _ in range(paragraphs):
        kind = rng.random()
        country = rng.choice(world)
        if kind < 0.6:
            lines.append(_town_paragraph(rng, country, rng.choice(country["towns"])))
        elif kind < 0.8:
            lines.append(_country_paragraph(rng, country))
        else:
            lines.append(_arithmetic_paragraph(rng))
    return "".join(line + "\n" for line in lines)


def main(argv: list[str] | None = None) -> None:
    from ..safe_output import atomic_write_text

    parser = argparse.ArgumentParser(description="Write the facts corpus (FILE_NAME) into a folder.")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write facts.txt to.")
    args = parser.parse_args(argv)
    path = atomic_write_text(args.out / FILE_NAME, facts_corpus())
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
