"""Prompts in, samples out: the dataset side of the `optimal-sampling generate` command.

Prompts (`load_rows`) come from a file or a `datasets` directory, one row per example, as
`datasets` would read it: `.jsonl` (one JSON object per line; blank lines are not rows),
`.json` (a list of objects, or JSON Lines as `Dataset.to_json` writes them), `.csv` (the
header names the columns), `.parquet`, a directory saved with `save_to_disk`, or `.txt`
(every line is a row, blank ones included, so `index` is the 0-based line number). A row
whose prompt cannot be sampled (missing, null, empty) is written with its `error` set and
never stops the others (`PromptSet`).

Outputs are resumable. Rows are appended to a JSONL journal one finished batch at a time
(flushed and fsynced), next to a settings file. Rerunning the same command reads the
journal, drops a torn last line or an unfinished batch, and continues from the next
batch; since every batch is seeded from (seed, batch index), the result equals an
uninterrupted run. The settings include a digest of the prompts' content and of both
models' files, so a rerun on changed prompts or weights is refused instead of resumed.
For `.parquet` and `datasets` directory outputs, the journal is converted once every row
is in.

Only the standard library is imported here (pyarrow / datasets when a format needs them).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable


class UsageError(ValueError):
    """Bad command-line input: the message says what was wrong and how to fix it."""


# -- prompt files ------------------------------------------------------------------------

PROMPT_FILE_TYPES = ".jsonl, .json, .csv, .parquet or .txt"


def load_rows(source: str, *, prompt_column: str = "prompt") -> list[dict[str, Any]]:
    """Rows of a prompts file or saved dataset (see the module docstring for the formats).

    Each row keeps all its columns; the prompt is `row[prompt_column]`. A value that is not
    a JSON object (a `.txt` line, a bare string in a `.jsonl`) becomes `{prompt_column: value}`.
    """
    path = Path(source)
    if not path.exists():
        raise UsageError(
            f"--prompts {source!r} does not exist; give a {PROMPT_FILE_TYPES} file, "
            "or a directory saved with datasets' save_to_disk."
        )
    if path.is_dir():
        rows = _read_dataset_dir(path)
    else:
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise UsageError(
                f"--prompts {source!r}: unknown file type {path.suffix or '(none)'!r}; use a "
                f"{PROMPT_FILE_TYPES} file (.txt: one prompt per line), or a saved dataset directory."
            )
        rows = reader(path, prompt_column)
    if not rows:
        raise UsageError(f"--prompts {source!r} holds no rows.")
    if not any(prompt_column in row for row in rows):
        columns = sorted({key for row in rows for key in row})
        raise UsageError(
            f"--prompt-column {prompt_column!r} is not in {source!r}; its columns are: {', '.join(columns)}."
        )
    _check_json_values(rows, source)
    return rows


def _as_row(value: Any, prompt_column: str) -> dict[str, Any]:
    return value if isinstance(value, dict) else {prompt_column: value}


def _read_jsonl(path: Path, prompt_column: str) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_as_row(json.loads(line), prompt_column))
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
    return rows


def _read_json(path: Path, prompt_column: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several documents: JSON Lines, as Dataset.to_json writes them
            return _read_jsonl(path, prompt_column)
        raise UsageError(f"{path}:{error.lineno} is not valid JSON ({error.msg}).") from None
    if isinstance(data, list):
        return [_as_row(item, prompt_column) for item in data]
    return [_as_row(data, prompt_column)]


def _read_csv(path: Path, prompt_column: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig: spreadsheets start with a BOM
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row:
                raise UsageError(
                    f"{path}:{reader.line_num} has more fields than the header "
                    f"({', '.join(reader.fieldnames or [])}); quote fields that contain commas."
                )
            rows.append(row)
    return rows


def _read_parquet(path: Path, prompt_column: str) -> list[dict[str, Any]]:
    pq = _optional_import("pyarrow.parquet", f"Reading {path}", "pyarrow")
    return pq.read_table(path).to_pylist()


def _read_text(path: Path, prompt_column: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [{prompt_column: line.rstrip("\n")} for line in f]


def _read_dataset_dir(path: Path) -> list[dict[str, Any]]:
    datasets = _optional_import("datasets", f"Reading the saved dataset {str(path)!r}", "datasets")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise UsageError(
            f"--prompts {str(path)!r} is a directory but not a saved `datasets` dataset ({error})."
        ) from None
    if hasattr(dataset, "keys"):  # a DatasetDict: take the first split
        dataset = dataset[next(iter(dataset.keys()))]
    return [dict(row) for row in dataset]


_READERS: dict[str, Callable[[Path, str], list[dict[str, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_text,
}


def _optional_import(module: str, purpose: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"{purpose} needs the `{package}` package, which is not installed: "
            f"pip install {package}  (or pip install 'optimal-sampling[datasets]')."
        ) from None


def _check_json_values(rows: list[dict[str, Any]], source: str) -> None:
    """Rows go to a JSON journal: find a value that cannot, before any model is loaded."""
    for i, row in enumerate(rows):
        try:
            json.dumps(row)
        except (TypeError, ValueError):
            column = next(k for k, v in row.items() if not _json_ok(v))
            raise UsageError(
                f"--prompts {source!r} row {i}, column {column!r}: a {type(row[column]).__name__} "
                "value cannot be written to the output; drop or convert that column."
            ) from None


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# -- what each model is prompted with -----------------------------------------------------


def prompt_problem(value: Any, what: str = "prompt") -> str | None:
    """Why `value` cannot be sampled as a prompt, or None if it can.

    A prompt is a non-blank string, a list of chat messages (`{"role": ..., "content": ...}`)
    or a list of token ids.

    >>> prompt_problem("12+34="), prompt_problem(""), prompt_problem(None)
    (None, 'the prompt is empty', 'the prompt is null')
    """
    if value is None:
        return f"the {what} is null"
    if isinstance(value, str):
        return None if value.strip() else f"the {what} is empty"
    if isinstance(value, list) and value:
        if all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            return None
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return None
    return f"the {what} is {json.dumps(value)[:60]}, not a string, a list of chat messages or of token ids"


def template_fields(template: str) -> list[str]:
    """The named fields of a `str.format` template; positional or malformed ones are an error.

    >>> template_fields("{question} (answer: {answer})")
    ['question', 'answer']
    """
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise UsageError(f"--teacher-prompt-template is not a valid str.format template: {error}.") from None
    roots = [name.split(".")[0].split("[")[0] for name in names]
    if any(not root or root.isdigit() for root in roots):
        raise UsageError(
            "--teacher-prompt-template needs named fields, e.g. '{prompt} (answer: {answer})'; "
            "'{}' and '{0}' have no column to take."
        )
    return list(dict.fromkeys(roots))


@dataclass
class PromptSet:
    """The rows of a prompts file, what each model sees, and the rows that cannot be sampled.

    `teacher_prompts` is None when the teacher sees the base prompt. `problems` maps a row's
    index to why it cannot be sampled; such rows are written with that `error`.
    """

    rows: list[dict[str, Any]]
    prompts: list[Any]
    teacher_prompts: list[Any] | None
    problems: dict[int, str]

    @classmethod
    def from_rows(
        cls, rows: list[dict[str, Any]], prompt_column: str, teacher_template: str | None = None
    ) -> "PromptSet":
        """The teacher's prompt: `teacher_template.format(**row)` if given, else the rows'
        `teacher_prompt` column if they have one, else the base prompt.

        >>> s = PromptSet.from_rows([{"q": "1+1="}, {"q": ""}, {"x": 1}], "q", "Q: {q}")
        >>> s.teacher_prompts[0], s.problems
        ('Q: 1+1=', {1: 'the prompt is empty', 2: "the row has no 'q' column"})
        """
        problems: dict[int, str] = {}
        prompts = []
        for i, row in enumerate(rows):
            prompts.append(row.get(prompt_column))
            problem = (
                prompt_problem(row[prompt_column])
                if prompt_column in row
                else f"the row has no {prompt_column!r} column"
            )
            if problem:
                problems[i] = problem
        teacher_prompts = None
        if teacher_template is not None:
            teacher_prompts = _format_teacher_prompts(rows, teacher_template, problems)
        elif any("teacher_prompt" in row for row in rows):
            teacher_prompts = [row.get("teacher_prompt") for row in rows]
            for i, value in enumerate(teacher_prompts):
                problem = prompt_problem(value, "teacher_prompt")
                if problem and i not in problems:
                    problems[i] = problem + " (the rows' `teacher_prompt` column is the teacher's prompt)"
        return cls(rows, prompts, teacher_prompts, problems)

    def sample_rows(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.problems]

    def digest(self) -> str:
        """sha256 of every row and what each model is prompted with: a rerun on edited
        prompts (same path, same row count) gets a different digest."""
        content = json.dumps([self.rows, self.teacher_prompts], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(content.encode()).hexdigest()

    def record(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        """One output row: `index`, the sample's fields, then the input row's other columns
        (an input column named like an output field, with another value, becomes `input_<name>`)."""
        record = {"index": index, **sample}
        if record.get("teacher_prompt") is None:
            record["teacher_prompt"] = record["prompt"]
        for name, value in self.rows[index].items():
            if name in record:
                if record[name] == value:
                    continue
                name = f"input_{name}"
            record[name] = value
        return record


def _format_teacher_prompts(rows, template: str, problems: dict[int, str]) -> list[Any]:
    fields = template_fields(template)
    unknown = [name for name in fields if not any(name in row for row in rows)]
    if unknown:
        columns = sorted({key for row in rows for key in row})
        raise UsageError(
            f"--teacher-prompt-template uses {', '.join(repr(n) for n in unknown)}, which no row has; "
            f"the columns are: {', '.join(columns)}."
        )
    prompts: list[Any] = []
    for i, row in enumerate(rows):
        absent = [name for name in fields if row.get(name) is None]
        if absent:
            prompts.append(None)
            problems.setdefault(i, f"the teacher prompt template's field {absent[0]!r} is missing or null in this row")
            continue
        try:
            prompts.append(template.format(**row))
        except (KeyError, IndexError, AttributeError, TypeError, ValueError) as error:
            prompts.append(None)
            problems.setdefault(i, f"the teacher prompt template cannot be filled from this row ({error})")
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


def check_output_dependencies(path: str) -> None:
    """Parquet needs pyarrow and a dataset directory needs `datasets`: say so before sampling,
    not after it."""
    kind = output_kind(path)
    if kind == "parquet":
        _optional_import("pyarrow.parquet", f"--output {path!r} (Parquet)", "pyarrow")
    elif kind == "dataset":
        _optional_import("datasets", f"--output {path!r} (a `datasets` directory)", "datasets")


def check_output_apart_from_prompts(prompts: str, output: str) -> None:
    """Refuse an `--output` that would write over (or, with `--overwrite`, delete) the prompts file.

    >>> check_output_apart_from_prompts("data/p.jsonl", "data/./p.jsonl")
    Traceback (most recent call last):
    ...
    optimal_sampling.io.UsageError: --output 'data/./p.jsonl' is the --prompts file 'data/p.jsonl': the samples would replace the prompts (and --overwrite would delete them); choose another --output.
    """
    source = Path(prompts).resolve()
    written = [Path(output), Path(output + ".partial.jsonl"), Path(output + ".settings.json")]
    for path in written:
        same = path.resolve() == source or (path.exists() and source.exists() and os.path.samefile(path, source))
        if same:
            what = "is" if path == written[0] else f"writes {path.name!r}, which is"
            raise UsageError(
                f"--output {output!r} {what} the --prompts file {prompts!r}: the samples would replace the prompts "
                "(and --overwrite would delete them); choose another --output."
            )
    if output_kind(output) == "dataset" and source.is_relative_to(Path(output).resolve()):
        raise UsageError(
            f"--prompts {prompts!r} lies inside the --output directory {output!r}, which --overwrite deletes; choose "
            "another --output."
        )


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# What a changed setting means, for the refusal message; other keys are shown by name.
_CHANGES = {
    "prompts_sha256": "the prompts' content",
    "base_fingerprint": "the base model's files",
    "teacher_fingerprint": "the teacher model's files",
}


def describe_changes(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ, in words.

    >>> describe_changes({"temperature": 1.0, "prompts_sha256": "a"}, {"temperature": 0.5, "prompts_sha256": "b"})
    ["the prompts' content", 'temperature']
    """
    now = json.loads(json.dumps(now, default=str))
    keys = sorted(key for key in set(earlier) | set(now) if earlier.get(key) != now.get(key))
    return [_CHANGES.get(key, key) for key in sorted(keys, key=lambda k: (k not in _CHANGES, k))]


@dataclass
class ResumableWriter:
    """Append-only journal of finished rows plus a settings file; see the module docstring.

    Creating one checks that the output can be written (and that its format's package is
    installed); `start(settings)` checks them against an earlier run's.
    """

    output: str
    batch_size: int
    total: int
    overwrite: bool = False

    def __post_init__(self):
        self.kind = output_kind(self.output)
        self.journal = Path(self.output if self.kind == "jsonl" else self.output + ".partial.jsonl")
        self.meta = Path(self.output + ".settings.json")
        check_output_dependencies(self.output)
        self._check_writable()

    def _check_writable(self) -> None:
        parent = self.journal.parent
        #: the directory this writer had to create for the output (the caller says so), or None
        self.created_directory = None if parent.exists() else parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"--output {self.output!r} cannot be created ({error.strerror}); choose a writable path."
            ) from None
        if not os.access(parent, os.W_OK):
            raise UsageError(
                f"--output {self.output!r}: the directory {str(parent)!r} is not writable; choose another path."
            )
        if self.journal.exists() and not os.access(self.journal, os.W_OK):
            raise UsageError(f"--output {self.output!r} exists and is not writable.")

    def _existing_output(self) -> bool:
        return self.journal.exists() or Path(self.output).exists()

    def start(self, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """Check settings against an earlier run and return the rows it already finished."""
        fingerprint = settings_fingerprint(settings)
        if self._existing_output() and not self.overwrite:
            if not self.meta.exists():
                raise UsageError(
                    f"--output {self.output!r} already exists and was not written by this command; "
                    "choose another path or pass --overwrite to replace it."
                )
            earlier = json.loads(self.meta.read_text())
            if earlier.get("fingerprint") != fingerprint:
                changed = describe_changes(earlier.get("settings", {}), settings)
                raise UsageError(
                    f"--output {self.output!r} was written with different settings (changed since: "
                    f"{', '.join(changed)}), so its rows would be stale; rerun with the same prompts, models and "
                    "arguments to resume, choose another --output, or pass --overwrite to sample anew."
                )
        elif self.overwrite:
            self._remove_outputs()
        self.meta.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2, default=str))
        if self.kind != "jsonl" and Path(self.output).exists() and not self.journal.exists():
            return self._read_final()
        return self._recover_journal()

    def _remove_outputs(self) -> None:
        for path in (self.journal, Path(self.output), self.meta):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _recover_journal(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        rows: list[dict[str, Any]] = []
        ends: list[int] = []  # ends[i]: byte offset just after row i
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
        rows = list(rows)
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def rows_on_disk(self) -> int:
        """Complete rows in the journal now. After Ctrl-C this, not `saved`, is the truth: the
        interrupt can land between a write reaching the file and the counter's update."""
        if not self.journal.exists():
            return 0
        return self.journal.read_bytes().count(b"\n")

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """Write the final format once every row is in (JSONL needs nothing more)."""
        if self.kind == "jsonl":
            return
        columns = arrow_columns(rows)
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table(columns), self.output)
        else:
            from datasets import Dataset

            Dataset.from_dict(columns).save_to_disk(self.output)
        self.journal.unlink()


def arrow_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as columns Arrow can type: a column that mixes kinds of values (string prompts and
    chat message lists, numbers and strings) holds each value JSON-encoded instead.

    >>> arrow_columns([{"prompt": "a", "n": 1}, {"prompt": [{"role": "user", "content": "b"}]}])
    {'prompt': ['"a"', '[{"role": "user", "content": "b"}]'], 'n': [1, None]}
    """
    import pyarrow as pa

    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        columns[name] = values
    return columns
