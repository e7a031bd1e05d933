"""The project's data files: JSONL in and out, every line checked at load.

Each reader yields one dict per non-blank line and checks it as it goes: the file exists, the line
is UTF-8, it is one JSON object, and the fields it needs are non-empty strings. A bad line raises
`DataError` with a one-line message, `path:line: what is wrong; how to fix it`, so a person can
open the file at that line. `write_jsonl` writes atomically, so a crash never leaves half a file.

It also holds the two helpers that make every generated stream reproducible: `stable_fraction`
(a hash split that is the same on every machine) and `seeded_rng` (sample i of a stream is a pure
function of its seed and i, so a resumed run sees the same samples).

Standard library only: every other module may import it, and it imports none of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

HASH_BYTES = 8  # a 64-bit digest: stable_fraction's steps (2**-64) are far finer than any split fraction
LANGS = ("en", "zh")  # the languages a sample may be written in; "en" when a line does not say


class DataError(ValueError):
    """A data problem a person can fix: a missing file, a malformed line, an unknown task name."""


# --- deterministic randomness ---------------------------------------------------------------------

def stable_fraction(key: str) -> float:
    """A number in [0, 1) for `key`, the same on every machine and run (unlike hash())."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=HASH_BYTES).digest()
    return int.from_bytes(digest, "big") / 2 ** (8 * HASH_BYTES)


def seeded_rng(*parts) -> random.Random:
    """An RNG seeded from its parts joined as a string: seeded_rng("train", seed, i) is sample i's."""
    return random.Random("/".join(str(p) for p in parts))


def epochs(rows: list, seed, start: int = 0) -> Iterator:
    """`rows` epoch after epoch, each in its own shuffled order from (seed, epoch), from item
    `start` on: item i of the stream is a pure function of (rows, seed, i), so a resumed reader
    continues where it stopped."""
    epoch, offset = divmod(start, len(rows))
    while True:
        order = list(range(len(rows)))
        seeded_rng("epoch", seed, epoch).shuffle(order)
        for k in order[offset:]:
            yield rows[k]
        epoch, offset = epoch + 1, 0


# --- reading, one checked line at a time ----------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; any malformed line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (JSONL, one object per line)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "write one JSON object per line") from None
            except RecursionError:  # json's decoder recurses once per nesting level
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read; write one flat object "
                                "per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}; "
                                'write {"key": value, ...} per line')
            yield lineno, row


def text_field(row: dict, key: str, where: str, required: bool = True) -> str | None:
    """row[key] as a non-empty string; None if it is absent and not required. `where` is 'path:line'."""
    if key not in row:
        if not required:
            return None
        raise DataError(f"{where}: missing field {key!r}; add it (fields present: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, not a string; "
                        f'write it as a JSON string, e.g. "{key}": "{str(value)[:40]}"')
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty; give it a non-empty string or drop the line")
    return value


def check_lang(row: dict, where: str) -> str:
    """The line's "lang", "en" if absent; anything but "en" or "zh" raises DataError."""
    lang = row.get("lang", LANGS[0])
    if lang not in LANGS:
        raise DataError(f"{where}: field 'lang' is {lang!r}; use \"en\" or \"zh\" (or drop it for en)")
    return lang


# --- the two stage files: SFT examples and preference pairs ---------------------------------------

def load_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "response", optional "source"} -> SFT examples; the prompt is used verbatim."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        out.append({"prompt": text_field(row, "prompt", where), "response": text_field(row, "response", where),
                    "source": text_field(row, "source", where, required=False) or "jsonl"})
    return out


def load_pref_jsonl(path: str | os.PathLike) -> list[dict]:
    """Lines {"prompt", "chosen", "rejected"} -> preference pairs for the reward model."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        out.append({k: text_field(row, k, where) for k in ("prompt", "chosen", "rejected")})
    return out


# --- writing --------------------------------------------------------------------------------------

def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temp file in the same directory, then os.replace); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        n = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")  # UTF-8 as is: Chinese stays readable
                n += 1
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so the new name never points at a partial file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
