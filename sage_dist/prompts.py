"""Prompt sets for evaluation and retention: one loader for every CSV/TXT the literature uses.

Every file is normalised once into :class:`PromptRecord` (id, prompt, seed, guidance, category, extra).
The known files name their columns differently (``case_number`` / ``case_num`` / ``image_id``;
``evaluation_seed``; ``evaluation_guidance``; ``categories`` / ``artist`` / ``class``), some carry a stray
pandas index column (``""`` or ``Unnamed: 0``), prompts can be empty, duplicated, multi-line or longer
than CLIP's 77 tokens, and I2P's guidance goes up to 255. The loader copes with all of them:

* truly unusable rows (empty or blank prompt, control characters, a seed that is not an integer in
  ``[0, 2**64)``, a guidance that is not a finite number >= 0, an id that cannot name an image file, more
  fields than the header) are left out and *reported* in :class:`LoadReport` (count, ids and lines), never
  silently dropped;
* everything else is kept, with one warning per kind: duplicated prompts, duplicated ids (made unique
  with a ``~N`` suffix so per-id image files cannot collide), prompts over 77 CLIP tokens (the pipeline
  truncates them, as every published evaluation did; diffusers' own per-prompt truncation message, which
  prints prompt text, is filtered out, see :func:`install_truncation_filter`), guidance outside ``[1, 30]``,
  multi-line prompts (newlines become spaces: CLIP's tokenizer collapses whitespace, so the tokens are
  unchanged);
* a file that cannot be read as intended is a ``ValueError`` that names the file (and line) and the fix,
  raised before any model loads: missing, a folder, an unknown suffix, empty, a header without rows, no
  usable row, not UTF-8 (Latin-1 / Windows-1252 bytes, UTF-16 without a byte-order mark), NUL bytes,
  malformed quoting, a repeated header column, a TXT that is really a CSV, no prompt column (the message
  lists the columns found and the ones accepted). Byte-order marks (UTF-8, UTF-16, UTF-32) are honoured;
  a CSV whose header is separated by ``;``, tabs or ``|`` is read with that delimiter, with a warning.

Shipped sets (``sage_dist/data/prompts``, see ATTRIBUTION.md there) are loaded by short name::

    >>> from sage_dist.prompts import load_prompts
    >>> ps = load_prompts("i2p_sexual")          # 931 I2P prompts whose categories include "sexual"
    >>> ps.records[0].seed, ps.report.num_loaded
    >>> load_prompts("my_prompts.txt")            # one prompt per line; seeds 0, 1, 2, ... by row

Sources and licences of the shipped sets: ``sage_dist/data/prompts/ATTRIBUTION.md``; their use: docs/METHOD.md
"Retain prompts" and "Evaluation".
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import logging
import math
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from sage_dist.models.tokenizer import build_clip_tokenizer

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77
"""CLIP's context length, start and end tokens included."""
USUAL_GUIDANCE_RANGE = (1.0, 30.0)
"""Guidance values >= 0 outside this closed range are kept but reported (I2P has values up to 255; below 1,
diffusers turns classifier-free guidance off). Negative values are unusable rows."""
DEFAULT_GUIDANCE = 7.5
"""Guidance for files without a guidance column (SD's default; the spec's COCO and object protocols)."""
MAX_SEED = 2**64 - 1

PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption", "sensitive prompt", "adv_prompt")
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed", "random_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance", "guidance_scale", "sd_guidance_scale", "cfg_scale", "cfg")
ID_COLUMNS = ("case_number", "case_num", "id", "prompt_id", "image_id", "idx")
CATEGORY_COLUMNS = ("categories", "category", "concept", "artist", "class", "label", "source")
_INDEX_COLUMN = re.compile(r"^(Unnamed: \d+)?$")
_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")
_DELIMITERS = (",", "\t", ";", "|")
"""Tried in this order on a CSV's header: the first whose split names a prompt column is used."""
PROMPT_FILE_SUFFIXES = (".csv", ".tsv", ".txt")
"""File types :func:`load_prompts` reads (case-insensitive)."""

# name -> (path inside sage_dist/data/prompts, category filter or None)
SHIPPED_SETS: dict[str, tuple[str, str | None]] = {
    "i2p": ("i2p/unsafe-prompts4703.csv", None),
    "i2p_sexual": ("i2p/unsafe-prompts4703.csv", "sexual"),
    "unlearndiffatk_nudity": ("unlearndiffatk/nudity.csv", None),
    "unlearndiffatk_vangogh": ("unlearndiffatk/vangogh.csv", None),
    "unlearndiffatk_church": ("unlearndiffatk/church.csv", None),
    "unlearndiffatk_garbage_truck": ("unlearndiffatk/garbage_truck.csv", None),
    "unlearndiffatk_parachute": ("unlearndiffatk/parachute.csv", None),
    "unlearndiffatk_tench": ("unlearndiffatk/tench.csv", None),
    "big_artists": ("artists/big_artist_prompts.csv", None),
    "niche_artists": ("artists/short_niche_art_prompts.csv", None),
    "coco_30k_val": ("coco/coco_30k_val.csv", None),
    "coco_object_retain": ("retain/coco_object_retain.csv", None),
    "imagenet243_retain": ("retain/imagenet243_retain.csv", None),
    "ring_a_bell_nudity": ("ring_a_bell_pairs/nudity-ring-a-bell.csv", None),
    "ring_a_bell_vangogh": ("ring_a_bell_pairs/vangogh-ring-a-bell.csv", None),
}
RETAIN_SETS = {"coco_object": "coco_object_retain", "imagenet243": "imagenet243_retain"}


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One generation request: an image per record, reproducible from (prompt, seed, guidance)."""
    id: str
    """Unique within its set; image files are named after it."""
    prompt: str
    """Text given to the pipeline (single line; may exceed 77 tokens, the pipeline truncates)."""
    seed: int
    """Seed of the ``torch.Generator`` that draws the initial latents, in ``[0, 2**64)``."""
    guidance: float
    """Classifier-free guidance scale."""
    category: str | None = None
    """Concept / class / artist / I2P categories, as written in the file; ``None`` when absent."""
    extra: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)
    """The file's other columns, verbatim (e.g. I2P's ``nudity_percentage``, Ring-A-Bell's ``normal prompt``)."""
    def has_category(self, name: str) -> bool:
        """Whether ``name`` is one of the comma-separated categories (case-insensitive, exact item)."""
        if self.category is None:
            return False
        return name.strip().lower() in {c.strip().lower() for c in self.category.split(",")}


@dataclass(frozen=True, kw_only=True)
class LoadReport:
    """What the loader did to a file. Ids are the record ids (after de-duplication)."""
    source: str
    """Path or shipped-set name that was read."""
    num_rows: int
    """Data rows in the file (TXT: non-final lines)."""
    num_loaded: int
    """Records returned (after the optional category filter and limit)."""
    column_map: Mapping[str, str | None]
    """Field -> column of the file used for it (``None``: defaulted)."""
    unusable: tuple[tuple[str, str], ...] = ()
    """(id, reason) for every row that was left out."""
    unusable_lines: tuple[int, ...] = ()
    """Line of the file (1-based) where each row of ``unusable`` starts, in the same order."""
    dropped_columns: tuple[str, ...] = ()
    """Stray pandas index columns that were ignored."""
    duplicated_prompt_ids: tuple[str, ...] = ()
    """Ids of rows whose prompt text already appeared earlier (kept; usually with another seed)."""
    identical_request_ids: tuple[str, ...] = ()
    """Ids of rows repeating an earlier (prompt, seed, guidance): the same image twice (kept)."""
    renamed_ids: tuple[tuple[str, str], ...] = ()
    """(id in the file, id given) for duplicated ids (kept, renamed)."""
    over_token_limit_ids: tuple[str, ...] = ()
    """Ids of prompts longer than 77 CLIP tokens (kept; truncated by the pipeline)."""
    guidance_out_of_range_ids: tuple[str, ...] = ()
    """Ids whose guidance lies outside :data:`USUAL_GUIDANCE_RANGE` (kept)."""
    multiline_ids: tuple[str, ...] = ()
    """Ids whose prompt had line breaks (joined with spaces)."""
    defaulted_seed_ids: tuple[str, ...] = ()
    """Ids whose seed cell was blank (seed = row number + ``default_seed``)."""
    token_check: str = "done"
    """"done", or why the 77-token check was skipped."""
    encoding: str = "utf-8"
    """Codec the file was read with ("utf-8-sig", "utf-16", ... when it had a byte-order mark)."""
    delimiter: str | None = ","
    """CSV delimiter used (``None`` for a TXT)."""
    @property
    def num_unusable(self) -> int:
        return len(self.unusable)

    def summary(self) -> dict[str, object]:
        """A JSON-friendly summary (counts, and ids of unusable rows) for metrics files."""
        return {
            "source": self.source, "num_rows": self.num_rows, "num_loaded": self.num_loaded,
            "num_unusable": self.num_unusable, "unusable": [list(u) for u in self.unusable],
            "unusable_lines": list(self.unusable_lines),
            "num_duplicated_prompts": len(self.duplicated_prompt_ids),
            "num_identical_requests": len(self.identical_request_ids), "num_renamed_ids": len(self.renamed_ids),
            "num_over_77_tokens": len(self.over_token_limit_ids),
            "num_guidance_out_of_range": len(self.guidance_out_of_range_ids),
            "num_multiline": len(self.multiline_ids), "num_defaulted_seeds": len(self.defaulted_seed_ids),
            "dropped_columns": list(self.dropped_columns), "column_map": dict(self.column_map),
            "token_check": self.token_check, "encoding": self.encoding, "delimiter": self.delimiter,
        }


@dataclass(frozen=True)
class PromptSet:
    """Records of one file plus the :class:`LoadReport` that says what happened to the others."""
    name: str
    records: tuple[PromptRecord, ...]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]


# ---- diffusers' per-prompt truncation message ------------------------------------------------------------
TRUNCATION_MESSAGE = "The following part of your input was truncated because"
"""Start of the warning diffusers' pipelines log once per call with the truncated prompt text."""
PIPELINE_LOGGERS = (
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
)
"""Loggers of the pipelines sage_dist runs (SD 1.x/2.x and SDXL, the bundled world's included)."""


class TruncationFilter(logging.Filter):
    """Drops diffusers' "part of your input was truncated" records and counts them.

    The project logs prompt ids, never prompt text (some sets are explicit); the summary of long prompts is
    :func:`load_prompts`' one warning (count and ids) and, for retain prompts,
    :func:`sage_dist.train.validate.warn_long_prompts`. Every other record passes.
    """

    def __init__(self) -> None:
        super().__init__("sage_dist.truncation")
        self.num_dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(TRUNCATION_MESSAGE):
            self.num_dropped += 1
            return False
        return True


TRUNCATION_FILTER = TruncationFilter()
"""The one filter instance :func:`install_truncation_filter` attaches."""


def install_truncation_filter() -> list[str]:
    """Attach :data:`TRUNCATION_FILTER` to the diffusers pipeline loggers; idempotent, imports nothing.

    Covers :data:`PIPELINE_LOGGERS` (created now if their modules are not imported yet: diffusers' modules
    get the same logger objects later) and every ``diffusers.pipelines.*`` logger that already exists. Runs
    once when :mod:`sage_dist.prompts` is imported. Returns the names of the loggers it covers.
    """
    existing = [name for name in list(logging.Logger.manager.loggerDict) if name.startswith("diffusers.pipelines.")]
    names = sorted({*PIPELINE_LOGGERS, *existing})
    for name in names:
        logger = logging.getLogger(name)
        if TRUNCATION_FILTER not in logger.filters:
            logger.addFilter(TRUNCATION_FILTER)
    return names


install_truncation_filter()


def shipped_prompts_dir() -> Path:
    """Folder of the prompt files shipped inside the package (``sage_dist/data/prompts``)."""
    return Path(str(resources.files("sage_dist") / "data" / "prompts"))


def resolve_prompt_source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """Map a shipped-set name (:data:`SHIPPED_SETS`) or a path to (file, category filter).

    Raises:
        ValueError: neither a shipped name nor an existing file (the message says which: a missing file, a
            folder, or an unknown name with the closest shipped names and the full list).
    """
    key = str(name_or_path)
    if key in SHIPPED_SETS:
        rel, category = SHIPPED_SETS[key]
        return shipped_prompts_dir() / rel, category
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        raise ValueError(f"prompt file {key!r} is a folder; give a CSV (header row with a 'prompt' column) or a "
                         "TXT (one prompt a line) inside it")
    if isinstance(name_or_path, Path) or path.suffix.lower() in PROMPT_FILE_SUFFIXES or os.sep in key:
        raise ValueError(f"prompt file {key!r} does not exist (relative paths start at {Path.cwd()}); check the "
                         f"path, or use a shipped set: {', '.join(sorted(SHIPPED_SETS))}")
    close = difflib.get_close_matches(key, list(SHIPPED_SETS), n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(
        f"prompt set {key!r} is neither a file nor a shipped set; {hint}shipped sets: "
        f"{', '.join(sorted(SHIPPED_SETS))}; or pass the path of a CSV (with a 'prompt' column) or a TXT "
        "(one prompt per line)")


def _pick(columns: Sequence[str], candidates: Sequence[str], override: str | None, what: str) -> str | None:
    if override is not None:
        if override not in columns:
            raise ValueError(f"{what} column {override!r} not in the file; columns found: {list(columns)}")
        return override
    lower = {c.strip().lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _parse_seed(text: str) -> int:
    if re.fullmatch(r"[+-]?\d+\.0*", text):  # "123.0" as written by pandas for a float column
        text = text.split(".")[0]
    seed = int(text)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} outside [0, 2**64)")
    return seed


def _guidance_problem(text: str) -> tuple[float | None, str | None]:
    """(guidance, None) for a usable cell, (None, reason) otherwise."""
    try:
        guidance = float(text)
    except ValueError:
        hint = " (a decimal comma? write 7.5, not 7,5)" if re.fullmatch(r"[+-]?\d+,\d+", text) else ""
        return None, f"guidance {text!r} is not a number{hint}"
    if not math.isfinite(guidance):
        return None, f"guidance {text!r} is not a finite number"
    if guidance < 0:
        return None, (f"guidance {text!r} is negative; classifier-free guidance must be >= 0 "
                      "(1 = the conditional prediction alone, 7.5 = SD's default)")
    return guidance, None


def _id_problem(record_id: str) -> str | None:
    """Why ``record_id`` cannot name an image file, or None."""
    if record_id in (".", "..") or _UNSAFE_ID.search(record_id):
        return (f"id {record_id!r} cannot name an image file (ids may not contain '/', '\\' or control "
                "characters, nor be '.' or '..'); rename it in the file")
    return None


def _prompt_problem(text: str) -> str | None:
    if not text:
        return "empty prompt"
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        return f"prompt contains the control character U+{ord(bad):04X}; remove it"
    return None


# ---- reading a file -------------------------------------------------------------------------------------
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8 with a byte-order mark"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of byte ``offset``."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _convert_hint(path: Path, source: str) -> str:
    return (f"save it as UTF-8 (e.g. `iconv -f {source} -t UTF-8 '{path}' > '{path.with_suffix('')}.utf8"
            f"{path.suffix}'`)")


def _read_text(path: Path, encoding: str | None) -> tuple[str, str]:
    """The file's text and the encoding it was read with.

    UTF-8 is the default; a byte-order mark (UTF-8, UTF-16, UTF-32) is honoured and removed. Anything else
    (Latin-1 / Windows-1252 bytes, UTF-16 without a byte-order mark, binary data) is an error that says how to
    convert the file, unless ``encoding`` names the file's encoding explicitly.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read prompt file {path}: {err.strerror or err}; check its permissions") from err
    if not data.strip(b" \t\r\n" + codecs.BOM_UTF8):
        raise ValueError(f"{path} is empty ({len(data)} bytes): a CSV needs a header row with a 'prompt' column "
                         "and one row per prompt; a TXT needs one prompt per line")
    if encoding is not None:
        try:
            text = data.decode(encoding)
        except LookupError:
            raise ValueError(f"{path}: unknown encoding {encoding!r}; use a Python codec name such as "
                             "'utf-8', 'cp1252' or 'latin-1'") from None
        except UnicodeDecodeError as err:
            line, col = _position(data, err.start)
            raise ValueError(f"{path}: not valid {encoding} (byte 0x{data[err.start]:02x} at line {line}, column "
                             f"{col}); give the file's real encoding or {_convert_hint(path, encoding)}") from None
        return text.removeprefix("\ufeff"), encoding
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} starts with a {name} byte-order mark but is not valid {name} at byte "
                                 f"{err.start}; re-save it as UTF-8") from None
            if codec != "utf-8-sig":
                log.warning("%s: read as %s (it has a %s byte-order mark); UTF-8 is preferred", path, name, name)
            return text.removeprefix("\ufeff"), codec
    if data.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")):
        raise ValueError(f"{path} is a spreadsheet or archive (an Excel workbook?), not a text file; export it as "
                         "'CSV UTF-8' (one row per prompt, a 'prompt' column)")
    if b"\x00" in data:
        even, odd = data[0::2].count(0), data[1::2].count(0)
        if max(even, odd) > len(data) // 4:
            raise ValueError(f"{path} looks like UTF-16 without a byte-order mark; "
                             f"{_convert_hint(path, 'UTF-16LE' if odd > even else 'UTF-16BE')}")
        line, col = _position(data, data.index(b"\x00"))
        raise ValueError(f"{path} holds a NUL byte at line {line}, column {col}: it is not a text file; give a "
                         "CSV or TXT saved as UTF-8")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as err:
        line, col = _position(data, err.start)
        try:
            data.decode("cp1252")
            guess, codec = "probably Windows-1252 / Latin-1", "cp1252"
        except UnicodeDecodeError:
            guess, codec = "its encoding is unknown", "<its encoding>"
        raise ValueError(
            f"{path} is not UTF-8: byte 0x{data[err.start]:02x} at line {line}, column {col} ({guess}); "
            f"{_convert_hint(path, 'WINDOWS-1252' if codec == 'cp1252' else 'ENCODING')}, or pass "
            f"encoding={codec!r} to load_prompts") from None


def _split_lines(text: str) -> list[str]:
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def _header_fields(line: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error:
        return [line]


def _looks_like_a_header(line: str) -> list[str] | None:
    """The column names if ``line`` is a CSV header: it names a prompt column and either another known column
    (seed, guidance, id, category, a pandas index) or nothing else ("prompt")."""
    known = (*PROMPT_COLUMNS, *SEED_COLUMNS, *GUIDANCE_COLUMNS, *ID_COLUMNS, *CATEGORY_COLUMNS)
    for delimiter in _DELIMITERS:
        fields = [f.strip().lower() for f in _header_fields(line, delimiter)]
        prompt_fields = [f for f in fields if f in PROMPT_COLUMNS]
        others = [f for f in fields if f not in prompt_fields]
        if prompt_fields and (fields in (["prompt"], ["prompts"])
                              or others and all(f in known or _INDEX_COLUMN.match(f) for f in others)):
            return fields
    return None


def _choose_delimiter(path: Path, header: str, prompt_column: str | None) -> str:
    """The delimiter whose split of the header names a prompt column (comma first); else the one that splits."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    for delimiter in _DELIMITERS:
        columns = _header_fields(header, delimiter)
        if _pick([c for c in columns if not _INDEX_COLUMN.match(c.strip())], PROMPT_COLUMNS, None, "prompt") \
                or (prompt_column is not None and prompt_column in columns):
            return delimiter
    for delimiter in _DELIMITERS:
        if len(_header_fields(header, delimiter)) > 1:
            return delimiter
    return ","


@dataclass(frozen=True)
class _Row:
    line: int
    """1-based line of the file where the row starts."""
    cells: dict[str, str]
    problem: str | None = None


def _read_txt(path: Path, text: str) -> tuple[list[str], list[_Row]]:
    lines = _split_lines(text)
    first = next((line for line in lines if line.strip()), "")
    header = _looks_like_a_header(first)
    if header is not None:
        raise ValueError(
            f"{path}: its first line {first.strip()[:80]!r} is a CSV header (columns {header}), but a .txt is read "
            "as one prompt per line; rename the file to .csv, or delete the header line if every line is a prompt")
    return ["prompt"], [_Row(line=i + 1, cells={"prompt": line}) for i, line in enumerate(lines)]


def _read_csv(path: Path, text: str, prompt_column: str | None) -> tuple[list[str], list[_Row], str]:
    lines = _split_lines(text)
    offset = 0
    declared = re.fullmatch(r"\s*sep=(.)\s*", lines[0]) if lines else None
    if declared:  # Excel's "sep=;" first line
        offset = 1
        text = re.sub(r"^[^\r\n]*(\r\n|\r|\n)?", "", text, count=1)
        lines = lines[1:]
    header = next((line for line in lines if line.strip()), None)
    if header is None:
        raise ValueError(f"{path} is empty: a CSV needs a header row with a 'prompt' column and one row per prompt")
    delimiter = declared.group(1) if declared else _choose_delimiter(path, header, prompt_column)
    if delimiter != "," and path.suffix.lower() == ".csv":
        log.warning("%s: read as %r-separated (its header has no usable comma-separated columns)", path, delimiter)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[_Row] = []
    columns: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            line = start + offset
            start = reader.line_num + 1
            if columns is None:
                if not any(f.strip() for f in fields):
                    continue  # blank lines before the header
                columns = fields
                repeated = sorted({c for c in columns if columns.count(c) > 1 and c.strip()})
                if repeated:
                    raise ValueError(f"{path}: the header repeats column(s) {repeated} (line {line}); give every "
                                     "column its own name")
                continue
            if not fields:
                continue  # a blank line between rows
            cells = {c: (fields[i] if i < len(fields) else "") for i, c in enumerate(columns)}
            problem = None
            if len(fields) > len(columns) and any(f.strip() for f in fields[len(columns):]):
                problem = (f"has {len(fields)} fields but the header has {len(columns)} (a {delimiter!r} inside an "
                           "unquoted prompt? quote the cell: \"a, b\")")
            rows.append(_Row(line=line, cells=cells, problem=problem))
    except csv.Error as err:
        raise ValueError(f"{path}, line {start + offset}: malformed CSV in the row starting there ({err}); a quote "
                         "that opens a cell must close it, and a quote inside a quoted cell is written twice "
                         "(\"\")") from None
    assert columns is not None  # a non-blank header line exists
    return columns, rows, delimiter


def _count_over_token_limit(prompts: Sequence[str], ids: Sequence[str]) -> tuple[tuple[str, ...], str]:
    try:

        tokenizer = build_clip_tokenizer()
    except (ImportError, FileNotFoundError) as err:
        return (), f"skipped: CLIP tokenizer unavailable ({err})"
    over = []
    for start in range(0, len(prompts), 4096):
        chunk = list(prompts[start:start + 4096])
        lengths = [len(ids_) for ids_ in tokenizer(chunk, truncation=False, verbose=False)["input_ids"]]
        over.extend(ids[start + i] for i, n in enumerate(lengths) if n > CLIP_MAX_TOKENS)
    return tuple(over), "done"


def load_prompts(
    source: str | Path,
    *,
    category: str | None = None,
    prompt_column: str | None = None,
    default_seed: int = 0,
    default_guidance: float = DEFAULT_GUIDANCE,
    check_tokens: bool = True,
    limit: int | None = None,
    encoding: str | None = None,
) -> PromptSet:
    """Load a shipped set by name, or a user's CSV / TSV / TXT, into typed records.

    Reads only the file (no model), so every problem is found before a pipeline loads.

    Args:
        source: a name from :data:`SHIPPED_SETS` (e.g. ``"i2p_sexual"``, ``"coco_object_retain"``) or a path.
            CSV: header row; the prompt column is the first of :data:`PROMPT_COLUMNS` present (Ring-A-Bell
            pairs: ``"sensitive prompt"``; ``"normal prompt"`` lands in ``extra``); a header without commas
            but with ``;``, tabs or ``|`` is read with that delimiter (with a warning), and Excel's ``sep=;``
            first line is honoured. TSV: tab-separated. TXT: one prompt a line.
        category: keep only records whose category list contains this item (I2P: ``"sexual"``); overrides
            the shipped set's own filter.
        prompt_column: use this column for the prompt instead of the automatic choice.
        default_seed: files without a seed column (or blank cells) get ``default_seed + row number``.
        default_guidance: guidance for files without a guidance column (finite, >= 0).
        check_tokens: count prompts over 77 CLIP tokens with the real tokenizer (needs open-clip-torch).
        limit: keep the first ``limit`` usable records (after the category filter); >= 1.
        encoding: the file's text encoding when it is not UTF-8 (a Python codec name, e.g. ``"cp1252"``).
            By default UTF-8 is required; a UTF-8, UTF-16 or UTF-32 byte-order mark is honoured.

    Returns:
        :class:`PromptSet` with records in file order and a :class:`LoadReport`. Unusable rows (empty or
        blank prompt, control characters, a seed that is not an integer in ``[0, 2**64)``, a guidance that is
        not a finite number >= 0, an id that cannot name a file, more fields than the header) are left out
        and listed in the report, with one warning.

    Raises:
        ValueError: naming the file (and line) and the fix, for: an unknown name, a missing file or a folder,
            an unknown suffix, an empty file, a file that is not UTF-8 (and no ``encoding``), NUL bytes,
            malformed CSV quoting, a repeated header column, a TXT whose first line is a CSV header, no prompt
            column (lists the columns found and the names accepted), ``prompt_column`` not in the file, a
            header without data rows, no usable row at all, a category filter that matches nothing, and bad
            ``default_seed`` / ``default_guidance`` / ``limit`` arguments.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: must be >= 1 (or None for every record)")
    if isinstance(default_seed, bool) or not isinstance(default_seed, int) or not 0 <= default_seed <= MAX_SEED:
        raise ValueError(f"default_seed={default_seed!r}: must be an integer in [0, 2**64)")
    if isinstance(default_guidance, bool) or not isinstance(default_guidance, (int, float)) \
            or not math.isfinite(default_guidance) or default_guidance < 0:
        raise ValueError(f"default_guidance={default_guidance!r}: must be a finite number >= 0 (SD's default: 7.5)")
    path, shipped_category = resolve_prompt_source(source)
    category = category if category is not None else shipped_category
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise ValueError(f"{path}: unknown prompt file type {path.suffix or '(no suffix)'!r}; give a .csv (header "
                         "row with a 'prompt' column), a .tsv (the same, tab-separated) or a .txt (one prompt a "
                         "line), renaming the file if its content is one of these")
    text, used_encoding = _read_text(path, encoding)
    if suffix == ".txt":
        columns, rows, delimiter = *_read_txt(path, text), None
    else:
        columns, rows, delimiter = _read_csv(path, text, prompt_column)

    dropped = tuple(c for c in columns if _INDEX_COLUMN.match(c.strip()))
    usable_columns = [c for c in columns if c not in dropped]
    prompt_col = _pick(usable_columns, PROMPT_COLUMNS, prompt_column, "prompt")
    if prompt_col is None:
        near = [c for c in usable_columns if any(k in c.strip().lower() for k in ("prompt", "caption", "text"))
                or difflib.get_close_matches(c.strip().lower(), PROMPT_COLUMNS, n=1, cutoff=0.7)]
        hint = f" Column {near[0]!r} looks like the prompt column: rename it to 'prompt'." if near else (
            " If the first line is already a prompt, the file has no header: add a first line such as "
            "'prompt,seed', or save one prompt per line as .txt.")
        raise ValueError(
            f"{path}: no prompt column. Columns found: {columns}; needed: one of {list(PROMPT_COLUMNS)} "
            f"(rename the column, or pass prompt_column=...).{hint} Optional: a seed column "
            f"{list(SEED_COLUMNS)}, a guidance column {list(GUIDANCE_COLUMNS)}, an id column {list(ID_COLUMNS)}.")
    if not rows:
        raise ValueError(f"{path} has a header row (columns {columns}) but no data rows: add one row per prompt")
    seed_col = _pick(usable_columns, SEED_COLUMNS, None, "seed")
    guidance_col = _pick(usable_columns, GUIDANCE_COLUMNS, None, "guidance")
    id_col = _pick(usable_columns, ID_COLUMNS, None, "id")
    category_col = _pick([c for c in usable_columns if c != prompt_col], CATEGORY_COLUMNS, None, "category")
    used = {prompt_col, seed_col, guidance_col, id_col, category_col}

    raw_ids = [(row.cells.get(id_col, "") if id_col else "").strip() or str(n) for n, row in enumerate(rows)]
    taken = set(raw_ids)
    records: list[PromptRecord] = []
    unusable: list[tuple[str, str]] = []
    unusable_lines: list[int] = []
    multiline, defaulted_seed, guidance_far = [], [], []
    seen_ids: set[str] = set()
    renamed: list[tuple[str, str]] = []
    for row_number, (row, raw_id) in enumerate(zip(rows, raw_ids)):
        record_id = raw_id
        if raw_id in seen_ids:  # a unique new id that no row of the file uses
            k = 1
            while f"{raw_id}~{k}" in taken:
                k += 1
            record_id = f"{raw_id}~{k}"
            taken.add(record_id)
            renamed.append((raw_id, record_id))
        seen_ids.add(raw_id)

        def reject(reason: str, _id: str = record_id, _line: int = row.line) -> None:
            unusable.append((_id, reason))
            unusable_lines.append(_line)

        if row.problem is not None:
            reject(row.problem)
            continue
        id_problem = _id_problem(record_id)
        if id_problem is not None:
            reject(id_problem)
            continue
        text = row.cells.get(prompt_col, "")
        if "\n" in text or "\r" in text:
            multiline.append(record_id)
            text = " ".join(text.split())
        text = text.strip()
        problem = _prompt_problem(text)
        if problem is not None:
            reject(problem)
            continue
        seed_text = (row.cells.get(seed_col, "") if seed_col else "").strip()
        if seed_text:
            try:
                seed = _parse_seed(seed_text)
            except ValueError:
                reject(f"seed {seed_text!r} is not an integer in [0, 2**64)")
                continue
        else:
            seed = default_seed + row_number
            if seed > MAX_SEED:
                reject(f"default seed {seed} (default_seed + row number) is >= 2**64; lower default_seed")
                continue
            if seed_col:
                defaulted_seed.append(record_id)
        guidance_text = (row.cells.get(guidance_col, "") if guidance_col else "").strip()
        if guidance_text:
            guidance, problem = _guidance_problem(guidance_text)
            if problem is not None:
                reject(problem)
                continue
        else:
            guidance = float(default_guidance)
        if not USUAL_GUIDANCE_RANGE[0] <= guidance <= USUAL_GUIDANCE_RANGE[1]:
            guidance_far.append(record_id)
        cat = (row.cells.get(category_col, "") if category_col else "").strip() or None
        extra = {k: v for k, v in row.cells.items() if k not in used and k not in dropped}
        records.append(PromptRecord(id=record_id, prompt=text, seed=seed, guidance=guidance, category=cat,
                                    extra=extra))

    if not records:
        reasons = Counter(why for _, why in unusable).most_common(3)
        listed = "; ".join(f"{why!r} ({n} row(s), first at line "
                           f"{unusable_lines[[w for _, w in unusable].index(why)]})" for why, n in reasons)
        raise ValueError(f"{path}: none of its {len(rows)} data row(s) is usable: {listed}. Fix these rows (the "
                         f"prompt column is {prompt_col!r}, seed {seed_col!r}, guidance {guidance_col!r}).")
    if category is not None:
        kept = [r for r in records if r.has_category(category)]
        if not kept:
            raise ValueError(f"{path}: no record has category {category!r} (category column: {category_col!r}); "
                             "pass category=None to keep every row")
        records = kept
    if limit is not None:
        records = records[:limit]
    kept_ids = {r.id for r in records}
    multiline = [i for i in multiline if i in kept_ids]
    guidance_far = [i for i in guidance_far if i in kept_ids]
    defaulted_seed = [i for i in defaulted_seed if i in kept_ids]
    seen_prompts: set[str] = set()
    seen_requests: set[tuple[str, int, float]] = set()
    duplicated, identical = [], []
    for r in records:
        if r.prompt in seen_prompts:
            duplicated.append(r.id)
        if (r.prompt, r.seed, r.guidance) in seen_requests:
            identical.append(r.id)
        seen_prompts.add(r.prompt)
        seen_requests.add((r.prompt, r.seed, r.guidance))
    over, token_check = ((), "skipped: check_tokens=False")
    if check_tokens:
        over, token_check = _count_over_token_limit([r.prompt for r in records], [r.id for r in records])

    report = LoadReport(
        source=str(source), num_rows=len(rows), num_loaded=len(records),
        column_map={"prompt": prompt_col, "seed": seed_col, "guidance": guidance_col, "id": id_col,
                    "category": category_col},
        unusable=tuple(unusable), unusable_lines=tuple(unusable_lines), dropped_columns=dropped,
        duplicated_prompt_ids=tuple(duplicated), identical_request_ids=tuple(identical), renamed_ids=tuple(renamed),
        over_token_limit_ids=over, guidance_out_of_range_ids=tuple(guidance_far), multiline_ids=tuple(multiline),
        defaulted_seed_ids=tuple(defaulted_seed), token_check=token_check, encoding=used_encoding,
        delimiter=delimiter,
    )
    _log_report(report)
    name = str(source) if str(source) in SHIPPED_SETS else path.stem
    return PromptSet(name=name, records=tuple(records), report=report)


def _ids(ids: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def _log_report(report: LoadReport) -> None:
    """One warning per kind of problem; prompts are never logged (some sets are explicit), only ids."""
    src = report.source
    if report.unusable:
        lines = report.unusable_lines or (None,) * report.num_unusable
        log.warning("%s: %d unusable row(s) left out: %s", src, report.num_unusable,
                    _ids([f"{i} ({why}{f', line {n}' if n else ''})" for (i, why), n in zip(report.unusable, lines)]))
    if report.dropped_columns:
        log.info("%s: ignored stray index column(s) %s", src, list(report.dropped_columns))
    if report.duplicated_prompt_ids:
        log.info("%s: %d prompt text(s) repeat an earlier row (kept; ids %s)", src,
                 len(report.duplicated_prompt_ids), _ids(report.duplicated_prompt_ids))
    if report.identical_request_ids:
        log.warning("%s: %d row(s) repeat an earlier prompt with the same seed and guidance (the same image; "
                    "kept; ids %s)", src, len(report.identical_request_ids), _ids(report.identical_request_ids))
    if report.renamed_ids:
        log.warning("%s: %d duplicated id(s) renamed: %s", src, len(report.renamed_ids),
                    _ids([f"{a}->{b}" for a, b in report.renamed_ids]))
    if report.over_token_limit_ids:
        log.warning("%s: %d prompt(s) exceed CLIP's %d tokens and will be truncated by the pipeline (ids %s)",
                    src, len(report.over_token_limit_ids), CLIP_MAX_TOKENS, _ids(report.over_token_limit_ids))
    if report.guidance_out_of_range_ids:
        log.warning("%s: %d row(s) have guidance outside the usual range %s; kept as written (ids %s)", src,
                    len(report.guidance_out_of_range_ids), USUAL_GUIDANCE_RANGE,
                    _ids(report.guidance_out_of_range_ids))
    if report.multiline_ids:
        log.info("%s: %d multi-line prompt(s) joined with spaces (ids %s)", src, len(report.multiline_ids),
                 _ids(report.multiline_ids))
    if report.defaulted_seed_ids:
        log.warning("%s: %d blank seed cell(s) replaced by default_seed + row number (ids %s)", src,
                    len(report.defaulted_seed_ids), _ids(report.defaulted_seed_ids))
    if report.token_check.startswith("skipped: CLIP"):
        log.warning("%s: 77-token check %s", src, report.token_check)


def load_retain_prompts(name_or_path: str | Path) -> list[str]:
    """Retain prompts for training (docs/METHOD.md "Retain prompts"): ``"coco_object"`` | ``"imagenet243"`` | a CSV/TXT path.

    Returns the prompts in file order, duplicates included (AdvUnlearn's coco_object set has 6).

    Raises:
        ValueError: unknown name or unreadable file (see :func:`load_prompts`).
    """
    key = RETAIN_SETS.get(str(name_or_path), name_or_path)
    return load_prompts(key, check_tokens=False).prompts()
