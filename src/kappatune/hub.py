"""Models by Hugging Face Hub id (``org/name``): resolved through ``huggingface_hub`` to a local snapshot
folder, fetching only what kappatune reads (config, tokenizer files, safetensors weights and their index),
never pickled weights. ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and tokens work the usual way,
because ``huggingface_hub`` reads them.

A repository whose weights exist only as pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) is refused: loading a
pickle can run arbitrary code, and kappatune never unpickles.
"""

from __future__ import annotations

import os
import re

from .errors import KappaTuneError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
META_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_hub_id(spec) -> bool:
    """``org/name`` that is not an existing local path."""
    return isinstance(spec, str) and bool(HUB_ID.match(spec)) and not os.path.exists(spec)


def resolve(repo_id: str, revision: str | None = None, *, weights: bool = True) -> str:
    """The local snapshot folder of ``repo_id`` at ``revision`` with the files kappatune reads (downloaded
    into the Hugging Face cache unless they are there already). One-line errors for a gated, missing or
    pickle-only repository, a bad revision, or no network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise KappaTuneError(f"{repo_id}: hub ids need huggingface_hub: pip install huggingface_hub") from None
    patterns = META_FILES + (WEIGHT_FILES if weights else [])
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # huggingface_hub raises a family of errors; each becomes one line
        raise KappaTuneError(explain_hub_error(repo_id, revision, e)) from None
    if weights and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise KappaTuneError(_no_safetensors(repo_id, revision, folder))
    return folder


def explain_hub_error(repo_id: str, revision: str | None, e: Exception) -> str:
    name = type(e).__name__
    at = f"{repo_id}@{revision}" if revision else repo_id
    if name == "GatedRepoError":
        return f"{at}: gated repository; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
    if name == "RepositoryNotFoundError":
        return f"{at}: no such repository on the Hub (or it is private: log in with hf auth login or HF_TOKEN)"
    if name == "RevisionNotFoundError":
        return f"{at}: no such revision (branch, tag or commit) in the repository"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (f"{at}: not in the local Hugging Face cache and the Hub cannot be reached "
                f"(HF_HUB_OFFLINE set, or no network); download it once with network access")
    return f"{at}: cannot fetch from the Hub ({name}: {' '.join(str(e).split())[:160]})"


def _no_safetensors(repo_id: str, revision: str | None, folder: str) -> str:
    """Why a snapshot has no safetensors weights: pickles only (refused), or no weights at all."""
    files = _remote_files(repo_id, revision) or os.listdir(folder)
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        return (f"{repo_id}: the repository has only pickle weights ({pickles[0]}); kappatune never loads pickles "
                f"(they can run code): use a repository with safetensors, or convert it yourself")
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if ggufs:
        return f"{repo_id}: no safetensors weights; it has GGUF files (e.g. {ggufs[0]}): download one and pass its path"
    return f"{repo_id}: no safetensors weights in the repository"


def _remote_files(repo_id: str, revision: str | None) -> list[str]:
    """The repository's file list from the Hub ([] when offline or unreachable)."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:  # huggingface_hub's own reading of HF_HUB_OFFLINE
            return []
        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except Exception:
        return []
