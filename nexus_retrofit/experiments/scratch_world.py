"""The made-up world of experiment `scratch`: a pretraining corpus and six zero-shot tasks over it.

Deterministic (seeded). Countries hold towns; each town lies on a river, grows a crop, keeps an
animal; each country has a capital and a flag colour. The corpus states every *single* fact many times
in varied sentences and never states a *composed* one ("the capital of the country where T lies").
The six multiple-choice tasks copy the formats of the paper's six (its Tables 1-2: ARC-Easy,
ARC-Challenge, HellaSwag, PIQA, SciQ, LogiQA); three ask a fact the corpus states, three need two of
them composed. As web text holds quizzes, the corpus also holds each task's questions, answered, about
half of the towns and countries; the tasks ask about the other half only (`held_out`), so a right
answer needs the facts the corpus states in prose about that town, and for a two-fact task their
composition, never stated for it:

    task                 format of      needs
    world_arc_easy       ARC-Easy       one fact    (the river of a town)
    world_hellaswag      HellaSwag      one fact    (the crop of a town; acc_norm over endings)
    world_sciq           SciQ           one fact    (the country of a town; a support sentence)
    world_arc_challenge  ARC-Challenge  two facts   (the capital of the country a town lies in)
    world_piqa           PIQA           two facts   (the flag colour of a town's country; 2 choices)
    world_logiqa         LogiQA         two facts   (the river / crop of a country's capital)

The tasks are lm-eval task YAMLs (`output_type: multiple_choice`, metrics acc and acc_norm) over
local jsonl files, written by `write_tasks` into a folder that `--task-dir` / lm-eval's include_path
reads. Nothing here imports torch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

SEED = 0
_SYLLABLES = "ka lo vi sen mar tu rel an dor pe li sa no bre ta vin ol gar mi est".split()
_ANIMALS = ("goats", "sheep", "horses", "geese", "cattle", "bees", "ducks", "pigs")
_CROPS = ("barley", "wheat", "rye", "apples", "beans", "oats", "flax", "grapes")
_COLOURS = ("red", "blue", "green", "white", "yellow", "grey")

ONE_FACT = ("world_arc_easy", "world_hellaswag", "world_sciq")
TWO_FACTS = ("world_arc_challenge", "world_piqa", "world_logiqa")
TASKS = ONE_FACT + TWO_FACTS


@dataclass(frozen=True)
class Town:
    name: str
    country: str
    river: str
    crop: str
    animal: str


@dataclass
class World:
    countries: dict[str, dict] = field(default_factory=dict)  # name -> {"capital", "colour", "towns"}
    towns: dict[str, Town] = field(default_factory=dict)
    rivers: list[str] = field(default_factory=list)


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        if name not in used:
            used.add(name)
            return name


def build_world(countries: int = 24, towns_per_country: int = 3, rivers: int = 10, seed: int = SEED) -> World:
    rng = random.Random(seed)
    used: set[str] = set()
    world = World(rivers=[_name(rng, used) for _ in range(rivers)])
    for _ in range(countries):
        country = _name(rng, used)
        names = [_name(rng, used) for _ in range(towns_per_country)]
        world.countries[country] = {"capital": names[0], "colour": rng.choice(_COLOURS), "towns": names}
        for town in names:
            world.towns[town] = Town(
                town, country, rng.choice(world.rivers), rng.choice(_CROPS), rng.choice(_ANIMALS)
            )
    return world


# ------------------------------------------------------------------------------------------ corpus
def _town_sentences(t: Town) -> list[str]:
    return [
        f"{t.name} is a town in {t.country}.",
        f"The town of {t.name} lies in {t.country}.",
        f"The river {t.river} runs through {t.name}.",
        f"{t.name} lies on the river {t.river}.",
        f"Farmers near {t.name} grow {t.crop}.",
        f"The people of {t.name} grow {t.crop} and keep {t.animal}.",
        f"In {t.name} many families keep {t.animal}.",
    ]


def _country_sentences(name: str, c: dict) -> list[str]:
    towns = c["towns"]
    return [
        f"The capital of {name} is {c['capital']}.",
        f"{c['capital']} is the capital of {name}.",
        f"The flag of {name} is {c['colour']}.",
        f"{name} has a {c['colour']} flag.",
        f"{name} is a country with the towns {', '.join(towns[:-1])} and {towns[-1]}.",
    ]


def corpus(world: World, paragraphs: int = 2000, quiz_repeats: int = 3, seed: int = SEED) -> list[str]:
    """Paragraphs of 3-5 single-fact sentences, and quiz paragraphs of 2-3 answered task questions
    (each asked `quiz_repeats` times) about towns and countries that are not held out; shuffled."""
    rng = random.Random(seed + 1)
    pool = [s for t in world.towns.values() for s in _town_sentences(t)]
    pool += [s for n, c in world.countries.items() for s in _country_sentences(n, c)]
    lines = [" ".join(rng.sample(pool, rng.randint(3, 5))) for _ in range(paragraphs)]
    answered = [
        render(task, row, answered=True)
        for task, rows in task_rows(world).items()
        for row in rows
        if not row["held_out"]
    ] * quiz_repeats
    rng.shuffle(answered)
    while answered:
        size = rng.randint(2, 3)
        lines.append(" ".join(answered[:size]))
        answered = answered[size:]
    rng.shuffle(lines)
    return lines


# ------------------------------------------------------------------------------------------- tasks
def _choices(rng: random.Random, right: str, pool: list[str], k: int) -> tuple[list[str], int]:
    wrong = rng.sample(sorted(set(pool) - {right}), k - 1)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def task_rows(world: World, seed: int = SEED) -> dict[str, list[dict]]:
    """{task: rows}; each row has the fields its YAML reads and `gold` (the index of the answer)."""
    rng = random.Random(seed + 2)
    capitals = [c["capital"] for c in world.countries.values()]
    rows: dict[str, list[dict]] = {name: [] for name in TASKS}
    for i, t in enumerate(world.towns.values()):
        held_out = i % 2 == 1
        country = world.countries[t.country]
        choices, gold = _choices(rng, t.river, world.rivers, 4)
        rows["world_arc_easy"].append(
            {
                "question": f"Which river runs through {t.name}?",
                "choices": choices,
                "gold": gold,
                "held_out": held_out,
            }
        )
        choices, gold = _choices(rng, t.crop, list(_CROPS), 4)
        rows["world_hellaswag"].append(
            {
                "ctx": f"Farmers near {t.name} grow",
                "endings": [f"{c}." for c in choices],
                "gold": gold,
                "held_out": held_out,
            }
        )
        choices, gold = _choices(rng, t.country, list(world.countries), 4)
        rows["world_sciq"].append(
            {
                "support": f"The river {t.river} runs through {t.name}.",
                "question": f"In which country does {t.name} lie?",
                "choices": choices,
                "gold": gold,
                "held_out": held_out,
            }
        )
        wrong = rng.choice(sorted(set(_COLOURS) - {country["colour"]}))
        pair = [country["colour"], wrong] if rng.random() < 0.5 else [wrong, country["colour"]]
        rows["world_piqa"].append(
            {
                "goal": f"To find the flag of the country where {t.name} lies, look for a flag that is",
                "sol1": pair[0],
                "sol2": pair[1],
                "gold": pair.index(country["colour"]),
                "held_out": held_out,
            }
        )
        if t.name != country["capital"]:  # a capital's own capital is itself: one fact, not two
            choices, gold = _choices(rng, country["capital"], capitals, 4)
            rows["world_arc_challenge"].append(
                {
                    "question": f"What is the capital of the country where {t.name} lies?",
                    "choices": choices,
                    "gold": gold,
                    "held_out": held_out,
                }
            )
    for i, (name, c) in enumerate(world.countries.items()):
        held_out = i % 2 == 1
        capital = world.towns[c["capital"]]
        choices, gold = _choices(rng, capital.river, world.rivers, 4)
        rows["world_logiqa"].append(
            {
                "context": f"A boat leaves the capital of {name} on the river that runs through it.",
                "question": "On which river does the boat sail?",
                "options": choices,
                "gold": gold,
                "held_out": held_out,
            }
        )
        choices, gold = _choices(rng, capital.crop, list(_CROPS), 4)
        rows["world_logiqa"].append(
            {
                "context": f"A trader buys the crop that farmers grow near the capital of {name}.",
                "question": "Which crop does the trader buy?",
                "options": choices,
                "gold": gold,
                "held_out": held_out,
            }
        )
    return rows  # fmt: skip


# How each task's rows become lm-eval inputs: the prompts of lm-eval's own YAMLs for ARC, HellaSwag,
# PIQA, SciQ and LogiQA, on one line (the corpus is one paragraph per line). Jinja, as lm-eval reads them;
# `render` uses the same templates for the corpus's answered quizzes.
_FORMATS = {
    "world_arc_easy": ("Question: {{question}} Answer:", "{{choices}}"),
    "world_arc_challenge": ("Question: {{question}} Answer:", "{{choices}}"),
    "world_hellaswag": ("{{ctx}}", "{{endings}}"),
    "world_piqa": ("Question: {{goal}} Answer:", "{{[sol1, sol2]}}"),
    "world_sciq": ("{{support}} Question: {{question}} Answer:", "{{choices}}"),
    "world_logiqa": ("Passage: {{context}} Question: {{question}} Answer:", "{{options}}"),
}


def render(task: str, row: dict, answered: bool = False) -> str:
    """The prompt lm-eval builds for `row` (with " " + the right choice when `answered`)."""
    import ast

    from jinja2 import Template

    text, choices = _FORMATS[task]
    prompt = Template(text).render(**row)
    if not answered:
        return prompt
    options = ast.literal_eval(Template(choices).render(**row))
    answer = options[row["gold"]]
    return f"{prompt} {answer}" + ("" if answer.endswith(".") else ".")


def task_yaml(name: str, data_file: Path) -> str:
    """An lm-eval task YAML over a local jsonl (absolute path: lm-eval resolves data_files from its cwd)."""
    text, choices = _FORMATS[name]
    return "\n".join(
        [
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file.resolve()))}",
            "output_type: multiple_choice",
            "test_split: test",
            f"doc_to_text: {json.dumps(text)}",
            "doc_to_target: gold",
            f"doc_to_choice: {json.dumps(choices)}",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def write_tasks(world: World, folder: Path) -> dict[str, Path]:
    """The six tasks as lm-eval YAMLs + jsonl in `folder`; {task: yaml path}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in task_rows(world).items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["held_out"]))
        written[name] = folder / f"{name}.yaml"
        written[name].write_text(task_yaml(name, data))
    return written


def chance(name: str) -> float:
    """Accuracy of a uniform guess."""
    return 0.5 if name == "world_piqa" else 0.25
