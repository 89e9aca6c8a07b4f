"""Where a model given on the command line comes from, and what identifies its weights.

`resolve_model` answers before anything is loaded: a local directory (fingerprinted by
the content of its files), a `.gguf` file (transformers' `gguf_file=`, fingerprinted by its
content), a Hub id (pinned to a commit), or a clear error, at once, for a directory that does
not exist, a `.gguf` file without the `gguf` package, or a Hub id that cannot be reached. The fingerprints let a
rerun see that a model changed under the same path (`optimal-sampling generate` refuses
to resume then). Standard library only, plus `huggingface_hub` for Hub ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .io import UsageError

# A Hub repo id: `name` or `owner/name`, letters, digits, '-', '_', '.'; anything else given
# for a model that is not an existing directory was meant as a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


@dataclass(frozen=True)
class ModelSource:
    """A model's location (an absolute directory or a Hub id), its fingerprint, the Hub commit to
    load (None for a directory) and, for a GGUF model, the file's name in that directory."""

    location: str
    fingerprint: str
    revision: str | None = None
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        """What `AutoModelForCausalLM.from_pretrained(source.location, ...)` and the tokenizer's take."""
        kwargs: dict = {"revision": self.revision} if self.revision is not None else {}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_fingerprint(path: Path) -> str:
    """sha256 over the names and contents of a model directory's top-level files (weights,
    config, tokenizer); subdirectories such as training checkpoints are not part of the model.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "config.json").write_text("{}")
    ...     before = directory_fingerprint(Path(d))
    ...     _ = (Path(d) / "config.json").write_text('{"changed": 1}')
    ...     before == directory_fingerprint(Path(d))
    False
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{file.name}\0{file_sha256(file)}\0".encode())
    return "sha256:" + digest.hexdigest()


def resolve_model(name: str, flag: str) -> ModelSource:
    """A local directory or a Hub id, checked now (`flag` names the option in errors).

    >>> resolve_model("/no/such/model", "--base")
    Traceback (most recent call last):
    ...
    optimal_sampling.io.UsageError: --base '/no/such/model': no such directory. Give a model directory (with config.json) or a Hub id such as 'Qwen/Qwen2.5-0.5B'.
    """
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_source(path, flag)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{flag} {name!r} is a directory without config.json, so not a saved model; "
                "give the directory that `save_pretrained` wrote."
            )
        return ModelSource(str(path.resolve()), directory_fingerprint(path))
    if path.exists():
        raise UsageError(
            f"{flag} {name!r} is a file; give the model's directory (with config.json), a .gguf file, or a Hub id."
        )
    if not _HUB_ID.match(name):
        raise UsageError(
            f"{flag} {name!r}: no such directory. Give a model directory (with config.json) "
            "or a Hub id such as 'Qwen/Qwen2.5-0.5B'."
        )
    commit = hub_commit(name, flag)
    return ModelSource(name, f"hub:{name}@{commit}", revision=commit)


def gguf_source(path: Path, flag: str) -> ModelSource:
    """A GGUF model file: transformers dequantises it on load (`gguf_file=`), which needs `gguf`."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise UsageError(
            f"{flag} {str(path)!r} is a GGUF file, which transformers reads with the `gguf` package: pip install gguf"
        )
    path = path.resolve()
    return ModelSource(str(path.parent), "sha256:" + file_sha256(path), gguf_file=path.name)


def hub_commit(repo_id: str, flag: str) -> str:
    """The commit of a Hub model: the cached one, else the Hub's current one (one quick request
    instead of transformers' retries, which take most of a minute on a machine without network)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    not_here = f"{flag} {repo_id!r} is not a local directory"
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            f"{not_here}, and the Hub model is not in the local cache while HF_HUB_OFFLINE is set. "
            "Download it first, or give a local directory."
        )
    try:
        commit = HfApi().model_info(repo_id, timeout=10).sha
    except RepositoryNotFoundError:
        raise UsageError(
            f"{not_here}, nor a model on the Hub (or it is private: log in with `hf auth login`)."
        ) from None
    except HfHubHTTPError as error:
        raise UsageError(f"{not_here}, and the Hub answered: {error}") from None
    except (HTTPError, OSError) as error:  # no network: DNS, refused connection, timeout
        raise UsageError(
            f"{not_here}, and the Hub ({constants.ENDPOINT}) cannot be reached "
            f"({type(error).__name__}: {error}). Give a local directory, or set HF_HUB_OFFLINE=1 "
            "to use the models already in the cache."
        ) from None
    if commit is None:
        raise UsageError(f"{not_here}, and the Hub did not say which commit it is at; give a local directory.")
    return commit
