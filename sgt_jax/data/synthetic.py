"""The embedded default corpus: a deterministic, procedurally generated Alpaca-format instruction set.

Tasks are small enough for a tiny model to learn: arithmetic, string manipulation, look-ups in a
fact table of fictional cities generated from the seed, and list formatting. Every example is unique
(by instruction + input), so any index split of the corpus gives disjoint train/validation sets.
"""

from __future__ import annotations

import random
from typing import Dict, List

# Bump when the generator changes: it is part of the tokenized-data cache key.
GENERATOR_VERSION = 1

_SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ven", "sor", "bel", "dra", "qui", "zan", "pe", "nor", "fi", "gal"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "teal"]
_WORDS = [
    "apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "candle", "bridge",
    "mirror", "planet", "tiger", "violin", "harbor", "lantern", "meadow", "rocket", "saddle", "thunder",
    "orange", "pencil", "island", "jacket", "kettle", "ladder", "marble", "needle", "object", "puzzle",
]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def _fact_table(seed: int, num_cities: int = 40) -> List[Dict[str, str]]:
    rng = random.Random(f"facts-{seed}")
    countries = sorted({_name(rng, 3) for _ in range(12)})
    cities: Dict[str, Dict[str, str]] = {}
    while len(cities) < num_cities:
        name = _name(rng, 2)
        if name not in cities and name not in countries:
            cities[name] = {"city": name, "country": rng.choice(countries), "colour": rng.choice(_COLOURS)}
    return list(cities.values())


def _arithmetic(rng: random.Random, facts) -> Dict[str, str]:
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(0, 99), rng.randint(0, 99)) if op != "*" else (rng.randint(0, 12), rng.randint(0, 12))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    verb = {"+": "Add", "-": "Subtract", "*": "Multiply"}[op]
    instruction = rng.choice([f"Compute {a} {op} {b}.", f"{verb} the numbers.", "What is the result?"])
    given = "" if instruction.startswith("Compute") else f"{a} {op} {b}"
    return {"instruction": instruction, "input": given, "output": str(value)}


def _strings(rng: random.Random, facts) -> Dict[str, str]:
    word = rng.choice(_WORDS) + rng.choice(["", "s", "ed", "er"])
    task = rng.choice(["reverse", "upper", "count", "first"])
    if task == "reverse":
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    if task == "upper":
        return {"instruction": "Write the word in uppercase.", "input": word, "output": word.upper()}
    if task == "count":
        letter = rng.choice(sorted(set(word)))
        return {
            "instruction": f"How many times does the letter '{letter}' appear in the word?",
            "input": word,
            "output": str(word.count(letter)),
        }
    return {"instruction": "What is the first letter of the word?", "input": word, "output": word[0]}


def _lookup(rng: random.Random, facts) -> Dict[str, str]:
    fact = rng.choice(facts)
    if rng.random() < 0.5:
        return {"instruction": f"In which country is the city of {fact['city']}?", "input": "",
                "output": f"{fact['city']} is in {fact['country']}."}
    return {"instruction": "What is the colour of the city's flag?", "input": fact["city"],
            "output": f"The flag of {fact['city']} is {fact['colour']}."}


def _formatting(rng: random.Random, facts) -> Dict[str, str]:
    items = rng.sample(_WORDS, rng.randint(2, 5))
    given = ", ".join(items) if rng.random() < 0.5 else "\n".join(f"- {w}" for w in items)
    if given.startswith("-"):
        return {"instruction": "Write the list items separated by commas.", "input": given,
                "output": ", ".join(items)}
    return {"instruction": "Write the items as a bulleted list.", "input": given,
            "output": "\n".join(f"- {w}" for w in items)}


_TASKS = [_arithmetic, _strings, _lookup, _formatting]


def generate_corpus(num_examples: int, seed: int = 1234) -> List[Dict[str, str]]:
    """`num_examples` unique Alpaca examples ({instruction, input, output}), the same for the same seed."""
    rng = random.Random(seed)
    facts = _fact_table(seed)
    examples: List[Dict[str, str]] = []
    seen = set()
    attempts = 0
    while len(examples) < num_examples:
        attempts += 1
        if attempts > 50 * num_examples + 1000:
            raise ValueError(f"the synthetic generator cannot make {num_examples} unique examples")
        example = rng.choice(_TASKS)(rng, facts)
        key = (example["instruction"], example["input"])
        if key in seen:
            continue
        seen.add(key)
        examples.append(example)
    return examples

