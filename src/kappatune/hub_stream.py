"""Scan a Hub model on a disk that cannot hold it: fetch one safetensors shard, scan its tensors, delete it.

``StreamingHubSource("org/name")`` lists every tensor from the shards' headers, which ``huggingface_hub``
reads remotely (``get_safetensors_metadata``: HTTP range requests, a few KB per shard), so nothing large is
downloaded before the scan starts. The scan then asks for its tensors grouped by shard (``load_order``); the
first request for a shard downloads it into a temporary folder (never into the Hugging Face cache), and once
more than ``keep`` shards are on disk one is deleted: the least recently used of those whose tensors the
scan has all read, so a thread that runs late on an older shard does not make it download twice. Shards already in the Hugging
Face cache are read from there and never deleted.

What it costs: disk peaks at about ``keep`` shards (default 2: the one being scanned and the previous one,
whose last tensors may still be in flight); every scan downloads the whole model again, because nothing is
kept, so the scan is bound by the network (kappatune's spectrum cache still saves the SVD work of a repeated
scan, not the download); and a distributed scan downloads on every rank the shards its share touches.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from typing import Any

import torch

from .errors import KappaTuneError
from .hub import META_FILES, explain_hub_error
from .sources import Source, read_safetensors_header, read_tensor, st_dtype_name
from .units import Entry


class StreamingHubSource(Source):
    """A Hub repository's safetensors weights, fetched shard by shard and deleted after use."""

    kind = "hub-stream"

    def __init__(self, repo_id: str, revision: str | None = None, *, keep: int = 2):
        import huggingface_hub as hh

        if keep < 1:
            raise KappaTuneError(f"keep must be at least 1 shard, got {keep}")
        self.repo_id, self.revision, self.keep = repo_id, revision, keep
        try:
            meta_folder = hh.snapshot_download(repo_id, revision=revision, allow_patterns=META_FILES)
            remote = hh.get_safetensors_metadata(repo_id, revision=revision)
        except Exception as e:  # huggingface_hub's errors (gated, missing, offline, not safetensors) -> one line
            raise KappaTuneError(explain_hub_error(repo_id, revision, e)) from None
        self.model_type = _model_type(meta_folder)
        self.shard_of = dict(remote.weight_map)                # tensor name -> shard file name
        self.shards = sorted(remote.files_metadata)
        self._entries = [Entry(name, tuple(info.shape), st_dtype_name(info.dtype))
                         for shard in self.shards
                         for name, info in sorted(remote.files_metadata[shard].tensors.items())]
        self.workdir = tempfile.mkdtemp(prefix="kappatune-shards-")
        self._on_disk: OrderedDict[str, tuple[str, dict, bool]] = OrderedDict()  # shard -> (path, header, ours)
        self._unread: Counter[str] = Counter()  # shard -> tensors the scan announced and has not read yet
        self._lock = threading.Lock()

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def load_order(self, keys: list[str]) -> list[str]:
        rank = {s: i for i, s in enumerate(self.shards)}
        with self._lock:
            self._unread = Counter(self.shard_of[k] for k in keys)
        return sorted(keys, key=lambda k: (rank[self.shard_of[k]], k))

    def load(self, name: str) -> torch.Tensor:
        with self._lock:  # one fetch at a time, and no shard is deleted while a thread reads from it
            shard = self.shard_of[name]
            path, header, _ = self._shard(shard)
            tensor = read_tensor(name, path, *header[name][:4])
            if self._unread[shard] > 0:
                self._unread[shard] -= 1
            return tensor

    def _shard(self, shard: str) -> tuple[str, dict, bool]:
        if shard in self._on_disk:
            self._on_disk.move_to_end(shard)
            return self._on_disk[shard]
        import huggingface_hub as hh

        cached = hh.try_to_load_from_cache(self.repo_id, shard, revision=self.revision)
        if isinstance(cached, str) and os.path.exists(cached):
            path, ours = cached, False
        else:
            while self.shards_on_disk() >= self.keep:  # make room first: never more than `keep` of ours on disk
                self._evict(self._victim())
            try:
                path = hh.hf_hub_download(self.repo_id, shard, revision=self.revision, local_dir=self.workdir)
            except Exception as e:
                raise KappaTuneError(explain_hub_error(self.repo_id, self.revision, e)) from None
            ours = True
        self._on_disk[shard] = (path, read_safetensors_header(path), ours)
        return self._on_disk[shard]

    def _victim(self) -> str:
        """The shard to delete: the least recently used one whose announced tensors have all been read. Scan
        threads can run out of order (one still holds a tensor of an older shard while another has moved two
        shards on); deleting that older shard would download it a second time. If every shard on disk still
        has reads to come, the least recently used one goes."""
        ours = [s for s, (_, _, o) in self._on_disk.items() if o]
        return next((s for s in ours if self._unread[s] == 0), ours[0])

    def _evict(self, shard: str) -> None:
        path, _, ours = self._on_disk.pop(shard)
        if ours:
            os.remove(path)

    def shards_on_disk(self) -> int:
        """Shards this source downloaded that are on disk now."""
        return sum(ours for _, _, ours in self._on_disk.values())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "repo_id": self.repo_id, "revision": self.revision, "files": len(self.shards),
                "model_type": self.model_type}

    def close(self) -> None:
        with self._lock:
            while self._on_disk:
                self._evict(next(iter(self._on_disk)))
        shutil.rmtree(self.workdir, ignore_errors=True)


def _model_type(folder: str) -> str | None:
    import json

    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("model_type")
