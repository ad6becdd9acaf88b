"""Prompt sets: the text prompts a real text-to-video model is trained and evaluated on.

A prompt file (``prompts.path``) is read once, in full, before any model work; bad input raises one
``PromptError`` naming ``file:line``. Two formats, chosen by the suffix:

**Text** (any suffix but ``.jsonl`` / ``.ndjson``): one prompt per line, UTF-8. Leading and trailing
whitespace of a line is dropped. An empty line is an error (a blank line at the very end of the file is not).
A prompt's id is derived from its text: ``"p" + sha1(text)[:16]`` (``prompt_id``), so it stays the same
whatever lines are added, removed or reordered around it; a duplicate prompt is therefore a duplicate id,
reported with both line numbers.

**JSONL** (``.jsonl`` / ``.ndjson``): one object per line::

    {"id": "cat-01", "prompt": "a cat jumps onto a table", "negative_prompt": "blurry",
     "clip": "clips/cat.mp4", "split": "heldout"}

===============  ========  ==========================================================================
key              required  meaning
===============  ========  ==========================================================================
prompt           yes       the text the model's text encoder embeds (a non-empty string)
id               no        unique non-empty string (default: ``prompt_id(prompt)``, as in text files)
negative_prompt  no        this prompt's negative prompt (default: the recipe's ``prompts.negative_prompt``)
clip             no        a reference video; a relative path is resolved against the file's folder and
                           must exist
split            no        ``"train"`` or ``"heldout"``: overrides the split by id below
===============  ========  ==========================================================================

A key that looks like a misspelling of one of these (``negative_promt``) is an error; other keys are kept in
``Prompt.extra``. Blank lines in a JSONL file are skipped.

**The split** (``PromptSet.split(heldout_fraction)``) is decided per prompt by its id alone:
``heldout_score(id) = int(sha1("vidpo-heldout:" + id)[:13], 16) / 16**13``, uniform in ``[0, 1)``, and a
prompt is held out when its score is below ``heldout_fraction``. Adding or removing prompts never moves an
existing prompt across the split, and raising the fraction only moves prompts from train to held-out.

**Prompt embeddings** (written by ``vidpo.stages.prompts``, read here by ``PromptEmbeddings``)::

    settings.json              what the embeddings were made with (a rerun with other settings is refused)
    shard_00000.safetensors    emb (n, L, D) in the storage dtype, mask (n, L) bool: prompts k*S .. k*S+S-1
    shard_00000.json           its record, written last (its "done" mark): {"file", "rows", "ids", "negatives"}
    negatives.safetensors      emb (m, L, D), mask (m, L) of the distinct negative prompts, the default first
    negatives.json             their record: {"file", "texts"}
    index.json                 once all of the above are complete: {"format", "settings", "num_prompts",
                               "shape": [L, D], "dtype", "shards": [{"file", "ids", "negatives"}],
                               "negatives": {"file", "texts"}}

A shard record's ``negatives`` holds, per row, the index of that prompt's negative prompt in ``texts``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

JSONL_SUFFIXES = (".jsonl", ".ndjson")
KEYS = ("id", "prompt", "negative_prompt", "clip", "split")
SPLITS = ("train", "heldout")
_SCORE_DIGITS = 13  # 52 bits: exact in a float64

EMB_FORMAT = "vidpo-prompt-emb/1"
EMB_INDEX = "index.json"
EMB_SETTINGS = "settings.json"
EMB_NEGATIVES = "negatives"


class PromptError(ValueError):
    """A prompt file or prompt set that cannot be used; the message names ``file:line`` where there is one."""


def prompt_id(text: str) -> str:
    """The id of a prompt given without one: ``"p"`` + the first 16 hex digits of the sha1 of its UTF-8 text."""
    return "p" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def heldout_score(prompt_id: str) -> float:
    """A number in ``[0, 1)`` that depends on the id only; held out when below ``heldout_fraction``."""
    digest = hashlib.sha1(f"vidpo-heldout:{prompt_id}".encode("utf-8")).hexdigest()
    return int(digest[:_SCORE_DIGITS], 16) / 16 ** _SCORE_DIGITS


@dataclass(frozen=True)
class Prompt:
    """One prompt: its id, text, own negative prompt (None: the recipe's default) and reference clip."""

    id: str
    text: str
    negative_prompt: Optional[str] = None
    clip: Optional[Path] = None
    split: Optional[str] = None
    """'train' / 'heldout' to override the split by id (JSONL only); None: decided by ``heldout_score``."""
    where: str = field(default="", compare=False)
    """``file:line`` it was read from ('' when built in code)."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """Other keys of its JSONL line."""


Key = Union[int, str]


class PromptSet:
    """Prompts in file order, with unique ids: ``ids``, ``texts``, ``ps[id]`` / ``ps[i]``, ``split(...)``."""

    def __init__(self, prompts: Iterable[Prompt], source: Optional[Path] = None):
        self.prompts = list(prompts)
        self.source = source
        self._index: dict[str, int] = {}
        for i, p in enumerate(self.prompts):
            if not isinstance(p.id, str) or not p.id:
                raise PromptError(f"{p.where or 'prompt ' + str(i)}: the id must be a non-empty string, got {p.id!r}")
            if p.id in self._index:
                first = self.prompts[self._index[p.id]]
                raise PromptError(f"{p.where or 'prompt ' + str(i)}: duplicate id '{p.id}' "
                                  f"(first at {first.where or 'prompt ' + str(self._index[p.id])})")
            if p.split is not None and p.split not in SPLITS:
                raise PromptError(f"{p.where or p.id}: split must be one of {list(SPLITS)}, got {p.split!r}")
            self._index[p.id] = i

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, key: Key) -> Prompt:
        """The prompt with id ``key`` (a str) or at position ``key`` (an int)."""
        if isinstance(key, str):
            if key not in self._index:
                raise KeyError(f"no prompt with id '{key}'" + (f" in {self.source}" if self.source else ""))
            return self.prompts[self._index[key]]
        return self.prompts[key]

    def __repr__(self) -> str:
        return f"PromptSet({len(self)} prompts{', from ' + str(self.source) if self.source else ''})"

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def get(self, ids: Sequence[str]) -> list[Prompt]:
        """The prompts of ``ids``, in that order (KeyError naming the first unknown id)."""
        return [self[i] for i in ids]

    def subset(self, ids: Iterable[str]) -> "PromptSet":
        """The prompts of ``ids`` in this set's order."""
        wanted = set(ids)
        return PromptSet([p for p in self.prompts if p.id in wanted], self.source)

    def is_heldout(self, prompt: Prompt, heldout_fraction: float) -> bool:
        if prompt.split is not None:
            return prompt.split == "heldout"
        return heldout_score(prompt.id) < heldout_fraction

    def split(self, heldout_fraction: float) -> tuple["PromptSet", "PromptSet"]:
        """``(train, heldout)``, each in file order: a prompt's own ``split`` wins, else ``heldout_score(id) <
        heldout_fraction`` (module docstring)."""
        if not 0.0 <= heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        held = [self.is_heldout(p, heldout_fraction) for p in self.prompts]
        return (PromptSet([p for p, h in zip(self.prompts, held) if not h], self.source),
                PromptSet([p for p, h in zip(self.prompts, held) if h], self.source))

    def digest(self) -> str:
        """sha1 of what the text encoder sees: every prompt's id, text and own negative prompt, in order."""
        h = hashlib.sha1()
        for p in self.prompts:
            h.update(json.dumps([p.id, p.text, p.negative_prompt], ensure_ascii=False).encode("utf-8") + b"\n")
        return h.hexdigest()


# ----- reading ------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise PromptError(f"prompt file not found: {path}")
    if not path.is_file():
        raise PromptError(f"{path}: not a file (expected a .txt or .jsonl prompt file)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PromptError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None
    return text.splitlines()


def _read_text(path: Path) -> list[Prompt]:
    lines = _lines(path)
    while lines and not lines[-1].strip():
        lines.pop()  # blank lines at the end of the file are not prompts
    prompts, seen = [], {}
    for lineno, raw in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        text = raw.strip()
        if not text:
            raise PromptError(f"{where}: empty line (a text prompt file has one prompt per line)")
        pid = prompt_id(text)
        if pid in seen:
            raise PromptError(f"{where}: duplicate prompt, the same text as line {seen[pid]}")
        seen[pid] = lineno
        prompts.append(Prompt(pid, text, where=where))
    return prompts


def _misspelt(key: str) -> Optional[str]:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8)
    return close[0] if close else None


def _optional_str(row: dict, key: str, where: str) -> Optional[str]:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise PromptError(f"{where}: '{key}' must be a string, got {type(value).__name__} {value!r}")
    return value


def _parse_row(row: object, where: str, folder: Path) -> Prompt:
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in row:
        guess = _misspelt(key) if key not in KEYS else None
        if guess is not None:
            raise PromptError(f"{where}: unknown key '{key}' (did you mean '{guess}'?)")
    if "prompt" not in row:
        raise PromptError(f"{where}: missing key 'prompt'")
    text = row["prompt"]
    if not isinstance(text, str):
        raise PromptError(f"{where}: 'prompt' must be a string, got {type(text).__name__} {text!r}")
    if not text.strip():
        raise PromptError(f"{where}: 'prompt' is empty")
    pid = row["id"] if "id" in row else prompt_id(text)
    if not isinstance(pid, str) or not pid:
        raise PromptError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
    negative = _optional_str(row, "negative_prompt", where)
    clip = _optional_str(row, "clip", where)
    clip_path = None
    if clip is not None:
        clip_path = Path(clip) if Path(clip).is_absolute() else (folder / clip)
        if not clip_path.is_file():
            raise PromptError(f"{where}: clip '{clip}' does not exist ({clip_path})")
        clip_path = clip_path.resolve()
    split = _optional_str(row, "split", where)
    if split is not None and split not in SPLITS:
        raise PromptError(f"{where}: 'split' must be one of {list(SPLITS)}, got {split!r}")
    extra = {k: v for k, v in row.items() if k not in KEYS}
    return Prompt(pid, text, negative, clip_path, split, where, extra)


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts, seen = [], {}
    for lineno, text in enumerate(_lines(path), 1):
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        prompt = _parse_row(row, where, path.parent)
        if prompt.id in seen:
            raise PromptError(f"{where}: duplicate id '{prompt.id}' (first at line {seen[prompt.id]})")
        seen[prompt.id] = lineno
        prompts.append(prompt)
    return prompts


def read_prompt_file(path: str | os.PathLike) -> PromptSet:
    """Every prompt of a text or JSONL prompt file (module docstring), checked in full; ``PromptError`` naming
    ``file:line`` on the first bad line, or the file when it is missing or has no prompt."""
    path = Path(path)
    prompts = _read_jsonl(path) if path.suffix.lower() in JSONL_SUFFIXES else _read_text(path)
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return PromptSet(prompts, path)


# ----- prompt embeddings --------------------------------------------------------------------------------
def emb_shard_stem(index: int) -> str:
    return f"shard_{index:05d}"


class PromptEmbeddings:
    """The embeddings of a finished prompt-embedding directory (module docstring): ``get(ids)`` and
    ``negative(ids)`` -> ``(emb (n, L, D) in the stored dtype, mask (n, L) bool)``, rows in the order of ids."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / EMB_INDEX
        if not path.exists():
            raise PromptError(f"{self.root}: no {EMB_INDEX}: the prompt embeddings are not complete (rerun the stage "
                              "that writes them, it resumes)")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}: not valid JSON ({exc.msg})") from None
        if index.get("format") != EMB_FORMAT:
            raise PromptError(f"{path}: format {index.get('format')!r}, expected {EMB_FORMAT!r}")
        self.index = index
        self.settings: dict = index["settings"]
        self.shape: tuple = tuple(index["shape"])
        self.negative_texts: list[str] = list(index["negatives"]["texts"])
        self._where: dict[str, tuple[int, int]] = {}
        self._negative_of: dict[str, int] = {}
        for k, shard in enumerate(index["shards"]):
            for row, (pid, neg) in enumerate(zip(shard["ids"], shard["negatives"])):
                self._where[pid] = (k, row)
                self._negative_of[pid] = neg
        self._negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._where

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    @property
    def dtype(self) -> str:
        return self.index["dtype"]

    def _check(self, prompt_ids: Sequence[str]) -> None:
        missing = [i for i in prompt_ids if i not in self._where]
        if missing:
            raise KeyError(f"{self.root}: no embedding for prompt id(s) {missing[:5]}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    def _read(self, file: str, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.root / file
        try:
            with safe_open(str(path), "pt") as f:
                emb, mask = f.get_slice("emb"), f.get_slice("mask")
                return (torch.cat([emb[r:r + 1] for r in rows]), torch.cat([mask[r:r + 1] for r in rows]))
        except (OSError, SafetensorError) as exc:
            raise PromptError(f"{path}: unreadable ({exc})") from None

    def get(self, prompt_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings and masks of ``prompt_ids`` (KeyError naming unknown ids)."""
        prompt_ids = list(prompt_ids)
        self._check(prompt_ids)
        emb = torch.empty((len(prompt_ids), *self.shape), dtype=getattr(torch, self.dtype))
        mask = torch.empty((len(prompt_ids), self.shape[0]), dtype=torch.bool)
        by_shard: dict[int, list[int]] = {}
        for i, pid in enumerate(prompt_ids):
            by_shard.setdefault(self._where[pid][0], []).append(i)
        for k, positions in by_shard.items():
            e, m = self._read(self.index["shards"][k]["file"], [self._where[prompt_ids[i]][1] for i in positions])
            emb[positions], mask[positions] = e, m
        return emb, mask

    def negative_text(self, prompt_id: str) -> str:
        self._check([prompt_id])
        return self.negative_texts[self._negative_of[prompt_id]]

    def negative(self, prompt_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings of each prompt's negative prompt (its own, or the default)."""
        prompt_ids = list(prompt_ids)
        self._check(prompt_ids)
        if self._negatives is None:
            file = self.index["negatives"]["file"]
            self._negatives = self._read(file, range(len(self.negative_texts)))
        rows = torch.tensor([self._negative_of[pid] for pid in prompt_ids], dtype=torch.long)
        return self._negatives[0][rows], self._negatives[1][rows]
