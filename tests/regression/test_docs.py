"""The docs stay true to the code: docs/architecture.md's layer table is tests/regression/test_imports.py's, every
link between the pages lands on a file and a heading, and flat batches and trial packs keep their own names."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tests.regression.test_imports import ALLOWED, SRC

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"`([^`]+)`")
PACKAGES = ("runs", "sweeps", "packs", "engine")
# Words that blur the two ideas: flat batches (one run's rows end to end) and trial packs (trials on one base).
BLURRED = re.compile(r"packed rows?|packed trials?|packed (?:sft|classifier|path)|row packing", re.I)


def layer_table(text: str) -> dict[str, dict[str, set[str]]]:
    """The rows of the table headed ``| layer | modules | may import | ...``: each layer's named modules and the
    layers it may import, as written in code spans (a module's own note in parentheses is left out)."""
    lines = text[text.index("| layer | modules | may import |") :].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        layer, modules, imports = (cell.strip() for cell in line.strip("|").split("|")[:3])
        modules = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", modules)  # notes may hold code spans of their own
        rows[CODE.fullmatch(layer)[1]] = {"modules": set(CODE.findall(modules)), "imports": set(CODE.findall(imports))}
    return rows


def test_the_architecture_table_is_test_imports_allowed():
    table = layer_table((ROOT / "docs" / "architecture.md").read_text())
    assert set(table) == set(ALLOWED)
    for layer, row in table.items():
        assert row["imports"] | {layer} == ALLOWED[layer] | {layer}, layer


def test_the_architecture_table_names_every_module_of_each_package():
    table = layer_table((ROOT / "docs" / "architecture.md").read_text())
    for package in PACKAGES:
        present = {p.stem for p in (SRC / package).glob("*.py")} - {"__init__"}
        assert table[package]["modules"] == present, package
    assert table["fit"]["modules"] == {"src/fit.py"} and (SRC / "fit.py").is_file()


def test_the_table_parser_reads_names_not_notes():
    text = "| layer | modules | may import | what |\n|---|---|---|---|\n| `a` | `x` (see `y`), `z` | `b` | ok |\n\n"
    assert layer_table(text) == {"a": {"modules": {"x", "z"}, "imports": {"b"}}}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_land():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and file.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                if fragment not in {anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target}")
    assert not broken, broken
    assert anchor("Config groups (`conf/`)") == "config-groups-conf"


def test_flat_batches_and_trial_packs_keep_their_names():
    """Padding-free rows laid end to end are flat batches; trials sharing one base are trial packs: in the docs, and
    in the code's docstrings, comments, help and config comments."""
    code = [*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "conf").rglob("*.yaml")]
    found = {f"{path.relative_to(ROOT)}: {m}" for path in [*PAGES, *code] for m in BLURRED.findall(path.read_text())}
    assert not found, sorted(found)
    assert all("flat batches" in (ROOT / "docs" / name).read_text() for name in ("fast-path.md", "trial-packs.md"))


def test_no_page_points_into_a_folder_beside_the_clone():
    for path in [*PAGES, *(ROOT / "conf").rglob("*.yaml")]:
        assert "../shared" not in path.read_text(), path
