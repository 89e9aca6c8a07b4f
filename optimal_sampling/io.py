"""Prompts in, samples out: the dataset side of the `optimal-sampling generate` command.

Outputs are resumable. Rows are appended to a JSONL journal one finished batch at a time
(flushed and fsynced), next to a settings file. Rerunning the same command reads the
journal, drops a torn last line or an unfinished batch, and continues from the next
batch; since every batch is seeded from (seed, batch index), the result equals an
uninterrupted run. For `.parquet` and `datasets` directory outputs, the journal is
converted once every row is in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


class UsageError(ValueError):
    """Bad command-line input: the message says what was wrong and how to fix it."""


# -- prompts ----------------------------------------------------------------------------


def load_rows(source: str, *, prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """Rows from a JSONL file, a text file (one prompt per line) or a `datasets` dataset saved
    with `save_to_disk`. Each row keeps all its columns; the prompt is `row[prompt_column]`."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"--prompts {source!r} does not exist; give a .jsonl / .txt file or a saved dataset directory.")
    if path.is_dir():
        rows = _rows_from_dataset_dir(path)
    elif path.suffix == ".jsonl" or path.suffix == ".json":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{source}:{number} is not valid JSON ({error.msg}).") from None
                if not isinstance(row, dict):
                    row = {prompt_column: row}
                rows.append(row)
    else:
        with path.open(encoding="utf-8") as f:
            rows = [{prompt_column: line.rstrip("\n")} for line in f if line.strip()]
    if not rows:
        raise UsageError(f"--prompts {source!r} holds no rows.")
    missing = [i for i, row in enumerate(rows) if prompt_column not in row]
    if missing:
        columns = sorted({key for row in rows for key in row})
        raise UsageError(
            f"--prompt-column {prompt_column!r} is not in {source!r} (row {missing[0]} lacks it); "
            f"its columns are: {', '.join(columns)}."
        )
    return rows


def _rows_from_dataset_dir(path: Path) -> list[dict[str, Any]]:
    try:
        from datasets import load_from_disk
    except ImportError:  # pragma: no cover - datasets is a test/trl extra
        raise UsageError("Reading a saved dataset needs the `datasets` package: pip install datasets.") from None
    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise UsageError(f"--prompts {str(path)!r} is a directory but not a saved `datasets` dataset ({error}).") from None
    if hasattr(dataset, "keys"):  # a DatasetDict: take the first split
        split = next(iter(dataset.keys()))
        dataset = dataset[split]
    return [dict(row) for row in dataset]


def teacher_prompts_from_template(rows: list[dict[str, Any]], template: str) -> list[str]:
    """`template.format(**row)` per row, with a clear error for a field the rows lack."""
    prompts = []
    for i, row in enumerate(rows):
        try:
            prompts.append(template.format(**row))
        except KeyError as error:
            raise UsageError(
                f"--teacher-prompt-template uses the field {error.args[0]!r}, which row {i} lacks; "
                f"available fields: {', '.join(sorted(row))}."
            ) from None
        except (IndexError, ValueError) as error:
            raise UsageError(f"--teacher-prompt-template is not a valid str.format template: {error}.") from None
    return prompts


# -- outputs ----------------------------------------------------------------------------

OUTPUT_KINDS = ("jsonl", "parquet", "dataset")


def output_kind(path: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    if Path(path).suffix == "" or Path(path).is_dir():
        return "dataset"
    raise UsageError(f"--output {path!r}: use a .jsonl or .parquet file, or a directory for a `datasets` save_to_disk.")


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ResumableWriter:
    """Append-only journal of finished rows plus a settings file; see the module docstring."""

    output: str
    settings: dict[str, Any]
    batch_size: int
    total: int
    overwrite: bool = False

    def __post_init__(self):
        self.kind = output_kind(self.output)
        self.journal = Path(self.output if self.kind == "jsonl" else self.output + ".partial.jsonl")
        self.meta = Path(self.output + ".settings.json")
        self._check_writable()

    def _check_writable(self) -> None:
        parent = self.journal.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--output {self.output!r} cannot be created ({error.strerror}); choose a writable path.") from None
        if not os.access(parent, os.W_OK):
            raise UsageError(f"--output {self.output!r}: the directory {str(parent)!r} is not writable; choose another path.")
        if self.journal.exists() and not os.access(self.journal, os.W_OK):
            raise UsageError(f"--output {self.output!r} exists and is not writable.")

    def _existing_output(self) -> bool:
        final = Path(self.output)
        return self.journal.exists() or final.exists()

    def start(self) -> list[dict[str, Any]]:
        """Check settings against an earlier run and return the rows it already finished."""
        fingerprint = settings_fingerprint(self.settings)
        if self._existing_output() and not self.overwrite:
            if not self.meta.exists():
                raise UsageError(
                    f"--output {self.output!r} already exists and was not written by this command; "
                    "choose another path or pass --overwrite to replace it."
                )
            earlier = json.loads(self.meta.read_text())
            if earlier.get("fingerprint") != fingerprint:
                changed = sorted(
                    key for key in set(earlier.get("settings", {})) | set(self.settings)
                    if earlier.get("settings", {}).get(key) != json.loads(json.dumps(self.settings, default=str)).get(key)
                )
                raise UsageError(
                    f"--output {self.output!r} was written with different settings (changed: {', '.join(changed)}); "
                    "rerun with the same arguments to resume, choose another --output, or pass --overwrite."
                )
        elif self.overwrite:
            self._remove_outputs()
        self.meta.write_text(json.dumps({"fingerprint": fingerprint, "settings": self.settings}, indent=2, default=str))
        if self.kind != "jsonl" and Path(self.output).exists() and not self.journal.exists():
            return self._read_final()
        return self._recover_journal()

    def _remove_outputs(self) -> None:
        import shutil

        for path in (self.journal, Path(self.output), self.meta):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _recover_journal(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        rows, ends = [], []  # ends[i]: byte offset just after row i
        with self.journal.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn last write
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
                ends.append((ends[-1] if ends else 0) + len(line))
        # Keep whole batches only (a batch is written in one go, so a short tail is torn):
        # resuming then starts at a batch boundary, where the per-batch seed puts it.
        if len(rows) < self.total:
            whole = (len(rows) // self.batch_size) * self.batch_size
            rows = rows[:whole]
        with self.journal.open("r+b") as f:
            f.truncate(ends[len(rows) - 1] if rows else 0)
        return rows

    def _read_final(self) -> list[dict[str, Any]]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(self.output).to_pylist()
        from datasets import load_from_disk

        return [dict(r) for r in load_from_disk(self.output)]

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Write the final format once every row is in (JSONL needs nothing more)."""
        if self.kind == "jsonl":
            return
        from datasets import Dataset

        clean = [dict(row) for row in rows]
        for key in ("prompt", "teacher_prompt"):  # Arrow needs one type per column
            if not all(isinstance(row.get(key), str) for row in clean):
                for row in clean:
                    row[key] = json.dumps(row.get(key), ensure_ascii=False)
        dataset = Dataset.from_list(clean)
        if self.kind == "parquet":
            dataset.to_parquet(self.output)
        else:
            dataset.save_to_disk(self.output)
        self.journal.unlink()
