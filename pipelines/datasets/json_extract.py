"""The shipped ``json_extract`` task: pull name, age, city and job out of one sentence as JSON.

Deterministic (stdlib ``random.Random(seed)`` only). Every record carries all three
formats understood by :mod:`pipelines.data.records`::

    {"messages": [{"role": "user", "content": "<INSTRUCTION>\\nText: <sentence>"},
                  {"role": "assistant", "content": "<json>"}],
     "instruction": "<INSTRUCTION>", "input": "<sentence>", "output": "<json>",
     "text": "<INSTRUCTION>\\nText: <sentence>\\nJSON: <json>"}

where ``<json>`` is ``{"name": ..., "age": ..., "city": ..., "job": ...}`` in that key
order, serialized with :func:`dump_target`.

``score`` / ``exact_match`` are the task metric (``data.task: json_extract``).

Regenerate the shipped files with ``python -m pipelines.datasets.json_extract``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

KEYS = ("name", "age", "city", "job")
INSTRUCTION = "Extract name, age, city and job from the text as JSON with keys name, age, city, job."
AGE_MIN, AGE_MAX = 18, 80
DEFAULT_SEED = 1234
DEFAULT_N_TRAIN = 2000
DEFAULT_N_EVAL = 200
SHIPPED_DIR = Path(__file__).parent / "json_extract"

FIRST_NAMES = (
    "Maria",
    "James",
    "Aisha",
    "Liam",
    "Sofia",
    "Noah",
    "Yuki",
    "Omar",
    "Elena",
    "Lucas",
    "Priya",
    "Mateo",
    "Chloe",
    "Ivan",
    "Fatima",
    "Daniel",
    "Mei",
    "Samuel",
    "Hannah",
    "Diego",
    "Amara",
    "Jonas",
    "Lea",
    "Kenji",
    "Nadia",
    "Oscar",
    "Zara",
    "Felix",
    "Grace",
    "Ravi",
    "Ingrid",
    "Pablo",
    "Leila",
    "Tomas",
    "Emma",
    "Hugo",
    "Anya",
    "Marcus",
    "Julia",
    "Kwame",
)
LAST_NAMES = (
    "Lopez",
    "Smith",
    "Khan",
    "Muller",
    "Rossi",
    "Tanaka",
    "Dubois",
    "Silva",
    "Novak",
    "Cohen",
    "Garcia",
    "Brown",
    "Patel",
    "Kim",
    "Jensen",
    "Costa",
    "Ivanova",
    "Nakamura",
    "Okafor",
    "Berg",
    "Martin",
    "Wilson",
    "Haddad",
    "Schmidt",
    "Moreau",
    "Santos",
    "Kowalski",
    "Chen",
    "Larsen",
    "Reyes",
    "Fischer",
    "Taylor",
    "Ahmed",
    "Romano",
    "Lindqvist",
    "Mensah",
    "Park",
    "Weber",
    "Russo",
    "Clarke",
)
CITIES = (
    "Lyon",
    "Berlin",
    "Madrid",
    "Tokyo",
    "Toronto",
    "Nairobi",
    "Lisbon",
    "Oslo",
    "Prague",
    "Dublin",
    "Seoul",
    "Chicago",
    "Denver",
    "Milan",
    "Vienna",
    "Warsaw",
    "Cairo",
    "Lima",
    "Sydney",
    "Boston",
    "Austin",
    "Hamburg",
    "Porto",
    "Athens",
    "Helsinki",
    "New York",
    "San Diego",
    "Cape Town",
    "Buenos Aires",
    "Hong Kong",
)
JOBS = (
    "nurse",
    "teacher",
    "software engineer",
    "chef",
    "pilot",
    "architect",
    "plumber",
    "accountant",
    "journalist",
    "pharmacist",
    "electrician",
    "lawyer",
    "baker",
    "dentist",
    "librarian",
    "mechanic",
    "photographer",
    "data analyst",
    "firefighter",
    "graphic designer",
    "veterinarian",
    "bus driver",
    "carpenter",
    "translator",
    "economist",
)
# Every template mentions all four fields; {a_job} is the job with its article ("a nurse",
# "an architect"), {an_age} the age with its article ("a 34-year-old" / "an 18-year-old").
TEMPLATES = (
    "{name}, {age}, moved to {city} last spring and now works as {a_job}.",
    "{name} is {an_age}-year-old {job} living in {city}.",
    "At {age}, {name} works as {a_job} in {city}.",
    "{name} ({age}) has been {a_job} in {city} for several years.",
    "Our new {job} in {city} is {name}, aged {age}.",
    "Meet {name}: {age} years old, based in {city}, working as {a_job}.",
    "{name}, {a_job} from {city}, just turned {age}.",
    "In {city}, {age}-year-old {name} started a new job as {a_job}.",
    "{name} is {age} and works as {a_job} in {city}.",
    "Registration: {name}, age {age}, {job}, {city}.",
    "The {job} {name}, who is {age}, lives in {city}.",
)


def _article(word: str) -> str:
    """'a' or 'an' for ``word`` (a lowercase noun or a number written in digits)."""
    if word[:1].isdigit():
        return "an" if word.startswith(("8", "11", "18")) else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


def dump_target(obj: dict[str, Any]) -> str:
    """The one serialization used for every target."""
    return json.dumps(obj, separators=(", ", ": "), ensure_ascii=False)


def user_content(sentence: str) -> str:
    return f"{INSTRUCTION}\nText: {sentence}"


def make_record(sentence: str, target: dict[str, Any]) -> dict[str, Any]:
    output = dump_target({k: target[k] for k in KEYS})
    prompt = user_content(sentence)
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
        "instruction": INSTRUCTION,
        "input": sentence,
        "output": output,
        "text": f"{prompt}\nJSON: {output}",
    }


def _stream(rng: random.Random) -> Iterator[dict[str, Any]]:
    """Endless stream of records drawn from ``rng`` (fixed draw order: do not reorder)."""
    while True:
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        age = rng.randint(AGE_MIN, AGE_MAX)
        city = rng.choice(CITIES)
        job = rng.choice(JOBS)
        template = rng.choice(TEMPLATES)
        name = f"{first} {last}"
        sentence = template.format(
            name=name,
            age=age,
            city=city,
            job=job,
            a_job=f"{_article(job)} {job}",
            an_age=f"{_article(str(age))} {age}",
        )
        yield make_record(sentence, {"name": name, "age": age, "city": city, "job": job})


def generate(n: int, seed: int, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``n`` records with distinct sentences (``input``), none of them in ``exclude``."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    seen = set(exclude)
    out: list[dict[str, Any]] = []
    stream = _stream(random.Random(seed))
    while len(out) < n:
        rec = next(stream)
        if rec["input"] in seen:
            continue
        seen.add(rec["input"])
        out.append(rec)
    return out


def eval_seed(seed: int) -> int:
    """The seed of the eval stream, derived from (and different from) the train seed."""
    return seed + 1_000_003


def splits(
    n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL, seed: int = DEFAULT_SEED
) -> tuple[list[dict], list[dict]]:
    """(train, eval); no eval sentence appears in train."""
    train = generate(n_train, seed)
    eval_ = generate(n_eval, eval_seed(seed), exclude=(r["input"] for r in train))
    return train, eval_


def dumps_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write(
    out_dir: str | Path, n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL, seed: int = DEFAULT_SEED
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = splits(n_train, n_eval, seed)
    paths = (out / "train.jsonl", out / "eval.jsonl")
    for path, records in zip(paths, (train, eval_)):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(dumps_jsonl(records))
    return paths


# ---------------------------------------------------------------- metric


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object found in ``text`` (prose and ```json fences around it are fine), else None."""
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def score(prediction: str, reference: str) -> float:
    """1.0 if the first JSON object in ``prediction`` equals ``json.loads(reference)``, else 0.0. Never raises."""
    try:
        ref = json.loads(reference)
        if not isinstance(ref, dict):
            return 0.0
        pred = first_json_object(prediction)
        return 1.0 if pred is not None and pred == ref else 0.0
    except Exception:  # noqa: BLE001 - a metric must never crash evaluation
        return 0.0


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Mean of :func:`score` over paired predictions and references (0.0 when empty)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(score(p, r) for p, r in zip(predictions, references)) / len(references)


if __name__ == "__main__":
    for p in write(SHIPPED_DIR):
        print(f"wrote {p} ({sum(1 for _ in open(p, encoding='utf-8'))} records)")
