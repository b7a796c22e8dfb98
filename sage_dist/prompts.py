"""Prompt sets for evaluation and retention: one loader for every CSV/TXT the literature uses.

Every file is normalised once into :class:`PromptRecord` (id, prompt, seed, guidance, category, extra).
The known files name their columns differently (``case_number`` / ``case_num`` / ``image_id``;
``evaluation_seed``; ``evaluation_guidance``; ``categories`` / ``artist`` / ``class``), some carry a stray
pandas index column (``""`` or ``Unnamed: 0``), prompts can be empty, duplicated, multi-line or longer
than CLIP's 77 tokens, and I2P's guidance goes up to 255. The loader copes with all of them:

* truly unusable rows (empty prompt, unparsable or out-of-range seed, non-numeric or non-finite
  guidance) are left out and *reported* in :class:`LoadReport` (count and ids), never silently dropped;
* everything else is kept, with one warning per kind: duplicated prompts, duplicated ids (made unique
  with a ``~N`` suffix so per-id image files cannot collide), prompts over 77 CLIP tokens (the pipeline
  truncates them, as every published evaluation did), guidance outside ``[1, 30]``, multi-line prompts
  (newlines become spaces: CLIP's tokenizer collapses whitespace, so the tokens are unchanged);
* a file without a prompt column raises ``ValueError`` naming the columns found and the ones accepted.

Shipped sets (``sage_dist/data/prompts``, see ATTRIBUTION.md there) are loaded by short name::

    >>> from sage_dist.prompts import load_prompts
    >>> ps = load_prompts("i2p_sexual")          # 931 I2P prompts whose categories include "sexual"
    >>> ps.records[0].seed, ps.report.num_loaded
    >>> load_prompts("my_prompts.txt")            # one prompt per line; seeds 0, 1, 2, ... by row

Sources and licences of the shipped sets: ``sage_dist/data/prompts/ATTRIBUTION.md``; their use: docs/METHOD.md
"Retain prompts" and "Evaluation".
"""

from __future__ import annotations

import csv
import logging
import math
import re
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
"""Guidance values outside this closed range are kept but reported (I2P has values up to 255)."""
DEFAULT_GUIDANCE = 7.5
"""Guidance for files without a guidance column (SD's default; the spec's COCO and object protocols)."""
MAX_SEED = 2**64 - 1

PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption", "sensitive prompt", "adv_prompt")
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed", "random_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance", "guidance_scale", "sd_guidance_scale", "cfg_scale", "cfg")
ID_COLUMNS = ("case_number", "case_num", "id", "prompt_id", "image_id", "idx")
CATEGORY_COLUMNS = ("categories", "category", "concept", "artist", "class", "label", "source")
_INDEX_COLUMN = re.compile(r"^(Unnamed: \d+)?$")

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
    @property
    def num_unusable(self) -> int:
        return len(self.unusable)

    def summary(self) -> dict[str, object]:
        """A JSON-friendly summary (counts, and ids of unusable rows) for metrics files."""
        return {
            "source": self.source, "num_rows": self.num_rows, "num_loaded": self.num_loaded,
            "num_unusable": self.num_unusable, "unusable": [list(u) for u in self.unusable],
            "num_duplicated_prompts": len(self.duplicated_prompt_ids),
            "num_identical_requests": len(self.identical_request_ids), "num_renamed_ids": len(self.renamed_ids),
            "num_over_77_tokens": len(self.over_token_limit_ids),
            "num_guidance_out_of_range": len(self.guidance_out_of_range_ids),
            "num_multiline": len(self.multiline_ids), "num_defaulted_seeds": len(self.defaulted_seed_ids),
            "dropped_columns": list(self.dropped_columns), "column_map": dict(self.column_map),
            "token_check": self.token_check,
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


def shipped_prompts_dir() -> Path:
    """Folder of the prompt files shipped inside the package (``sage_dist/data/prompts``)."""
    return Path(str(resources.files("sage_dist") / "data" / "prompts"))


def resolve_prompt_source(name_or_path: str | Path) -> tuple[Path, str | None]:
    """Map a shipped-set name (:data:`SHIPPED_SETS`) or a path to (file, category filter).

    Raises:
        ValueError: neither a shipped name nor an existing file; the message lists the names.
    """
    key = str(name_or_path)
    if key in SHIPPED_SETS:
        rel, category = SHIPPED_SETS[key]
        return shipped_prompts_dir() / rel, category
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    raise ValueError(
        f"prompt set {key!r} is neither a file nor a shipped set; shipped sets: {', '.join(sorted(SHIPPED_SETS))}; "
        "or pass the path of a CSV (with a 'prompt' column) or a TXT (one prompt per line)")


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


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return ["prompt"], [{"prompt": line} for line in lines]
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ValueError(f"{path} is empty: a CSV needs a header row with a 'prompt' column")
        rows = [{k: (v if v is not None else "") for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames), rows


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
) -> PromptSet:
    """Load a shipped set by name, or a user's CSV / TXT, into typed records.

    Args:
        source: a name from :data:`SHIPPED_SETS` (e.g. ``"i2p_sexual"``, ``"coco_object_retain"``) or a path.
            CSV: header row; the prompt column is the first of :data:`PROMPT_COLUMNS` present (Ring-A-Bell
            pairs: ``"sensitive prompt"``; ``"normal prompt"`` lands in ``extra``). TXT: one prompt a line.
        category: keep only records whose category list contains this item (I2P: ``"sexual"``); overrides
            the shipped set's own filter.
        prompt_column: use this column for the prompt instead of the automatic choice.
        default_seed: files without a seed column (or blank cells) get ``default_seed + row number``.
        default_guidance: guidance for files without a guidance column.
        check_tokens: count prompts over 77 CLIP tokens with the real tokenizer (needs open-clip-torch).
        limit: keep the first ``limit`` usable records (after the category filter).

    Returns:
        :class:`PromptSet` with records in file order and a :class:`LoadReport`.

    Raises:
        ValueError: unknown name / missing file, no prompt column (message lists the columns found and the
            names accepted), ``prompt_column`` not in the file, a filter that matches nothing.
    """
    path, shipped_category = resolve_prompt_source(source)
    category = category if category is not None else shipped_category
    columns, rows = _read_rows(path)

    dropped = tuple(c for c in columns if _INDEX_COLUMN.match(c.strip()))
    usable_columns = [c for c in columns if c not in dropped]
    prompt_col = _pick(usable_columns, PROMPT_COLUMNS, prompt_column, "prompt")
    if prompt_col is None:
        raise ValueError(
            f"{path}: no prompt column. Columns found: {columns}; needed: one of {list(PROMPT_COLUMNS)} "
            "(or pass prompt_column=...). Optional: a seed column "
            f"{list(SEED_COLUMNS)}, a guidance column {list(GUIDANCE_COLUMNS)}, an id column {list(ID_COLUMNS)}.")
    seed_col = _pick(usable_columns, SEED_COLUMNS, None, "seed")
    guidance_col = _pick(usable_columns, GUIDANCE_COLUMNS, None, "guidance")
    id_col = _pick(usable_columns, ID_COLUMNS, None, "id")
    category_col = _pick([c for c in usable_columns if c != prompt_col], CATEGORY_COLUMNS, None, "category")
    used = {prompt_col, seed_col, guidance_col, id_col, category_col}

    records: list[PromptRecord] = []
    unusable: list[tuple[str, str]] = []
    multiline, defaulted_seed, guidance_far = [], [], []
    seen_ids: Counter[str] = Counter()
    renamed: list[tuple[str, str]] = []
    for row_number, row in enumerate(rows):
        raw_id = (row.get(id_col, "") if id_col else "").strip() or str(row_number)
        seen_ids[raw_id] += 1
        record_id = raw_id if seen_ids[raw_id] == 1 else f"{raw_id}~{seen_ids[raw_id] - 1}"
        if record_id != raw_id:
            renamed.append((raw_id, record_id))
        text = row.get(prompt_col, "")
        if "\n" in text or "\r" in text:
            multiline.append(record_id)
            text = " ".join(text.split())
        text = text.strip()
        if not text:
            unusable.append((record_id, "empty prompt"))
            continue
        seed_text = (row.get(seed_col, "") if seed_col else "").strip()
        if seed_text:
            try:
                seed = _parse_seed(seed_text)
            except ValueError:
                unusable.append((record_id, f"seed {seed_text!r} is not an integer in [0, 2**64)"))
                continue
        else:
            seed = default_seed + row_number
            if seed_col:
                defaulted_seed.append(record_id)
        guidance_text = (row.get(guidance_col, "") if guidance_col else "").strip()
        if guidance_text:
            try:
                guidance = float(guidance_text)
            except ValueError:
                guidance = math.nan
            if not math.isfinite(guidance):
                unusable.append((record_id, f"guidance {guidance_text!r} is not a finite number"))
                continue
        else:
            guidance = float(default_guidance)
        if not USUAL_GUIDANCE_RANGE[0] <= guidance <= USUAL_GUIDANCE_RANGE[1]:
            guidance_far.append(record_id)
        cat = (row.get(category_col, "") if category_col else "").strip() or None
        extra = {k: v for k, v in row.items() if k not in used and k not in dropped}
        records.append(PromptRecord(id=record_id, prompt=text, seed=seed, guidance=guidance, category=cat,
                                    extra=extra))

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
        unusable=tuple(unusable), dropped_columns=dropped, duplicated_prompt_ids=tuple(duplicated),
        identical_request_ids=tuple(identical), renamed_ids=tuple(renamed), over_token_limit_ids=over, guidance_out_of_range_ids=tuple(guidance_far),
        multiline_ids=tuple(multiline), defaulted_seed_ids=tuple(defaulted_seed), token_check=token_check,
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
        log.warning("%s: %d unusable row(s) left out: %s", src, report.num_unusable,
                    _ids([f"{i} ({why})" for i, why in report.unusable]))
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
