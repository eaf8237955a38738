"""Small datasets the project makes itself, one per task, for the offline default and the tests.

The rows are generated from fixed word lists with a fixed seed, so the files under
``src/assets/data`` are reproducible: ``python -m src.bundled`` rewrites them byte for byte,
and a test checks that it does. Each set is learnable by a tiny random-weight model in a
few hundred steps, because the label is carried by topic words, not by world knowledge.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATA_DIR = ASSETS / "data"

TOPIC_WORDS = {
    "sports": ["football", "goal", "striker", "match", "referee", "league", "tennis", "coach", "stadium", "tournament"],
    "food": ["recipe", "oven", "garlic", "pasta", "bakery", "soup", "chef", "spices", "dessert", "kitchen"],
    "tech": [
        "laptop",
        "software",
        "compiler",
        "server",
        "battery",
        "keyboard",
        "network",
        "database",
        "chip",
        "update",
    ],
    "music": ["guitar", "concert", "melody", "drummer", "album", "chorus", "violin", "singer", "rhythm", "orchestra"],
}
FILLER = ["today", "really", "quite", "the", "a", "new", "old", "big", "small", "local", "my", "our", "every", "week"]
TEMPLATES = [
    "{f1} {w1} and the {w2} were {f2} on my mind",
    "I read about the {w1} and a {f1} {w2}",
    "{f1} news: the {w1} meets the {w2}",
    "we talked about {w1}, {w2} and {f2} plans",
    "the {f1} {w1} was better than the {w2}",
]

# Imbalanced on purpose: the majority-class baseline is 0.5 and class weighting matters.
CLASS_SHARES = {"sports": 0.5, "food": 0.3, "tech": 0.2}


def _sentence(rng: random.Random, topics: list[str]) -> str:
    words = [rng.choice(TOPIC_WORDS[t]) for t in topics]
    while len(words) < 2:
        words.append(rng.choice(TOPIC_WORDS[rng.choice(topics)]))
    rng.shuffle(words)
    text = rng.choice(TEMPLATES).format(w1=words[0], w2=words[1], f1=rng.choice(FILLER), f2=rng.choice(FILLER))
    extra = " ".join(words[2:])
    return f"{text} {extra}".strip()


def make_classification(n: int, seed: int) -> list[dict]:
    """Single-label topic classification over three imbalanced classes."""
    rng = random.Random(seed)
    labels = list(CLASS_SHARES)
    weights = list(CLASS_SHARES.values())
    rows = []
    for i in range(n):
        label = rng.choices(labels, weights)[0]
        rows.append({"id": i, "text": _sentence(rng, [label]), "label": label})
    return rows


def make_multilabel(n: int, seed: int) -> list[dict]:
    """Multi-label topic tagging: each text mentions one to three of four topics."""
    rng = random.Random(seed)
    topics = list(TOPIC_WORDS)
    rows = []
    for i in range(n):
        chosen = sorted(rng.sample(topics, rng.choice([1, 1, 2, 2, 3])), key=topics.index)
        row = {"id": i, "text": _sentence(rng, chosen)}
        row.update({t: int(t in chosen) for t in topics})
        rows.append(row)
    return rows


# Seed 001's stand-in: the tutorial trains on its author's own synthetic driver-intent set (5 balanced classes),
# which is not public. These are commands a driver might say, one intent each, made the same way as the sets above.
INTENT_PHRASES = {
    "driver_window_down": ["lower my window", "roll down the driver window", "open my side window"],
    "passenger_window_down": ["lower the passenger window", "roll down the window on the right", "open her window"],
    "ac_on": ["turn on the air conditioning", "switch the a/c on", "cool the car down"],
    "heat_on": ["turn up the heat", "switch the heater on", "warm the car up"],
    "radio_on": ["turn on the radio", "play some music", "put the stereo on"],
}
INTENT_OPENERS = ["", "please", "could you", "hey car,", "can you", "I want you to", "quickly"]
INTENT_CLOSERS = ["", "please", "now", "for me", "right away", "thanks", "a bit"]


def make_intents(n: int, seed: int) -> list[dict]:
    """Single-label driver intents over five balanced classes (seed 001's stand-in)."""
    rng = random.Random(seed)
    labels = list(INTENT_PHRASES)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = [rng.choice(INTENT_OPENERS), rng.choice(INTENT_PHRASES[label]), rng.choice(INTENT_CLOSERS)]
        rows.append({"id": i, "text": " ".join(w for w in words if w), "label": label})
    rng.shuffle(rows)
    return rows


SFT_TASKS = [
    ("Name the topic of this sentence.", lambda rng: _topic_pair(rng)),
    ("Repeat the words in reverse order.", lambda rng: _reverse_pair(rng)),
    ("Give the plural of the word.", lambda rng: _plural_pair(rng)),
]


def _topic_pair(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(list(TOPIC_WORDS))
    return _sentence(rng, [topic]), topic


def _reverse_pair(rng: random.Random) -> tuple[str, str]:
    words = rng.sample([w for ws in TOPIC_WORDS.values() for w in ws], 3)
    return " ".join(words), " ".join(reversed(words))


def _plural_pair(rng: random.Random) -> tuple[str, str]:
    word = rng.choice([w for ws in TOPIC_WORDS.values() for w in ws if not w.endswith("s")])
    plural = word + ("es" if word.endswith(("h", "x")) else "s")
    return word, plural


def make_sft(n: int, seed: int) -> list[dict]:
    """Alpaca-style instruction rows (instruction, input, output)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, make_pair = rng.choice(SFT_TASKS)
        source, target = make_pair(rng)
        rows.append({"id": i, "instruction": instruction, "input": source, "output": target})
    return rows


CHAT_SYSTEM = "You answer in as few words as you can."


def _user_turn(instruction: str, source: str) -> dict:
    return {"role": "user", "content": f"{instruction}\n{source}"}


def make_chat(n: int, seed: int) -> list[dict]:
    """Conversations (``messages``: role/content turns) over the SFT tasks: one exchange, or two (every fourth
    row), the first answered already; every fifth row opens with a system turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": CHAT_SYSTEM}] if i % 5 == 0 else []
        for _ in range(2 if i % 4 == 1 else 1):
            instruction, make_pair = rng.choice(SFT_TASKS)
            source, target = make_pair(rng)
            turns += [_user_turn(instruction, source), {"role": "assistant", "content": target}]
        rows.append({"id": i, "messages": turns})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(out_dir: Path = DATA_DIR) -> list[Path]:
    """Write every bundled dataset as train/validation files under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, n, seed in (("train", 600, 0), ("validation", 200, 1)):
        for name, rows, writer, ext in (
            ("topics", make_classification(n, seed), write_csv, "csv"),
            ("topics_multilabel", make_multilabel(n, seed + 10), write_csv, "csv"),
            ("instructions", make_sft(n, seed + 20), write_jsonl, "jsonl"),
        ):
            path = out_dir / f"{name}_{split}.{ext}"
            writer(path, rows)
            written.append(path)
    # 800 train and 200 test rows, as the tutorial's run shows (96 steps of 64 rows in 7.68 epochs; accuracy in 0.005s)
    for split, n, seed in (("train", 800, 30), ("validation", 200, 31)):
        path = out_dir / f"intents_{split}.csv"
        write_csv(path, make_intents(n, seed))
        written.append(path)
    for split, n, seed in (("train", 160, 40), ("validation", 40, 41)):
        path = out_dir / f"chat_{split}.jsonl"
        write_jsonl(path, make_chat(n, seed))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path)
