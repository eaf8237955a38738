"""Stand-in data for the seed experiments (conf/experiment/seed*.yaml): files with each seed dataset's own columns.

The seeds' data come from Kaggle or the hub, neither reachable here. Each stand-in is a small file with the columns
and label values the experiment reads (seed 000's TITLE/ABSTRACT and six 0/1 label columns, seed 004's body and
J-P, ...), made from the bundled sentences, so a run exercises the experiment's own data settings; seed 001 needs
none (its stand-in, data=driver_intents, is bundled).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from src.bundled import DATA_DIR, write_csv, write_jsonl

EXPERIMENTS = {
    "000": "seed000_mistral7b_multilabel",
    "001": "seed001_bert_large_intents",
    "002": "seed002_openllama3b_red_dot",
    "003": "seed003_mistral7b_finance",
    "004": "seed004_phi3mini_mbti",
}
RESEARCH_LABELS = [
    "Computer Science",
    "Physics",
    "Mathematics",
    "Statistics",
    "Quantitative Biology",
    "Quantitative Finance",
]


def _sentences() -> list[dict]:
    with (DATA_DIR / "topics_multilabel_train.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_standin(seed: str, directory: Path, rows: int = 120, words: int = 0) -> list[str]:
    """Write seed ``seed``'s stand-in file under ``directory``; return the overrides that point the run at it.

    ``words``: repeat each text to at least this many words, so that every row fills ``model.max_length`` and a
    run's peak memory can be set against the planner's (which assumes full-length batches).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(int(seed))
    source = [{**row, "text": _long(row["text"], words)} for row in _sentences()[:rows]]
    if seed == "000":  # Kaggle train.csv: ID, TITLE, ABSTRACT, one 0/1 column per label
        table = []
        for i, row in enumerate(source):
            tags = [int(row[t]) for t in ("sports", "food", "tech", "music")]
            labels = [*tags, int(tags[0] and tags[2]), int(not any(tags[:2]))]  # six columns, each seen
            title, abstract = row["text"].split(" ", 3)[:3], row["text"]
            table.append(
                {"ID": i + 1, "TITLE": " ".join(title), "ABSTRACT": abstract, **dict(zip(RESEARCH_LABELS, labels))}
            )
        path = directory / "train.csv"
        write_csv(path, table)
        return [f"data.path={path}"]
    if seed == "001":
        if not words:
            return []
        path = directory / "intents.csv"
        with (DATA_DIR / "intents_train.csv").open(encoding="utf-8") as f:
            write_csv(path, [{**r, "text": _long(r["text"], words)} for r in csv.DictReader(f)][:rows])
        return [f"data.path={path}", "data.eval_path=null"]
    if seed == "002":  # xiyuez/red-dot-design-award-product-description: product, category, description
        table = [
            {
                "product": " ".join(r["text"].split()[:2]),
                "category": rng.choice(["Lamps", "Chairs", "Phones"]),
                "description": r["text"],
            }
            for r in source
        ]
        suffix, write = "jsonl", write_jsonl
    elif seed == "003":  # gbharti/finance-alpaca: instruction, input (mostly empty), output
        table = [{"instruction": f"What is meant by {r['text']}?", "input": "", "output": r["text"]} for r in source]
        suffix, write = "jsonl", write_jsonl
    elif seed == "004":  # minhaozhang/mbti: body, mbti, and one column per axis, J-P among them
        table = []
        for r in source:
            judging = r["sports"] == "1" or r["tech"] == "1"
            table.append(
                {
                    "author": "u",
                    "body": r["text"],
                    "mbti": "INTJ" if judging else "ENFP",
                    "J-P": "J" if judging else "P",
                }
            )
        suffix, write = "csv", write_csv
    else:
        raise ValueError(f"unknown seed {seed!r}")
    path = directory / f"seed{seed}.{suffix}"
    write(path, table)
    return [f"data.path={path}", "data.hub_id=null"]


def _long(text: str, words: int) -> str:
    repeated = text.split()
    while len(repeated) < words:
        repeated += text.split()
    return " ".join(repeated)
