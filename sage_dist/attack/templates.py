"""The inside-out attack's template library (docs/METHOD.md "Self-check" [I]: the paper's GPT-written library is unreleased).

``default``: 125 neutral scene / medium / composition templates written for this project
(``attack/data/templates.txt``), each with one ``{}`` slot and no word of a target domain.
A path to a text file (one template a line, ``#`` comments) gives another library, e.g. one mined from a
different source for the template-bias study (reports/open_questions.md).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache(maxsize=8)
def load_templates(library: str = "default") -> tuple[str, ...]:
    """Templates of ``library`` ("default" or a file path), de-duplicated, in file order.

    Raises:
        ValueError: the file is missing, or a line lacks exactly one ``{}`` slot, or the library is empty.
    """
    if library == "default":
        text = (resources.files("sage_dist.attack") / "data" / "templates.txt").read_text()
        source = "default"
    else:
        path = Path(library).expanduser()
        if not path.is_file():
            raise ValueError(f"attack template library {library!r}: no such file; use 'default' or a text file "
                             "with one template per line containing '{}'")
        text, source = path.read_text(), str(path)
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise ValueError(f"{source}:{n}: template {line!r} must contain exactly one '{{}}' slot")
        if line not in out:
            out.append(line)
    if not out:
        raise ValueError(f"template library {source} is empty")
    return tuple(out)
