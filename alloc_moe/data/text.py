"""Calibration text: hub sources or local files -> documents -> fixed-length token windows.

torch is imported where windows are built, not at import: the workflow's start (`common.smk` reads `SOURCES`) stays
light."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from alloc_moe.errors import AllocMoeError

# Pinned dataset commits on the Hugging Face Hub.
WIKITEXT_REVISION = "b08601e04326c79dfdd32d625aee71d232d685c3"  # Salesforce/wikitext
C4_REVISION = "607bd4c8450a42878aa9ddc051a65a055450ef87"  # allenai/c4
PILE_REVISION = "2f5e46ae6a69cf0dce4b12f78241c408936ca0e4"  # mit-han-lab/pile-val-backup

LOCAL_SUFFIXES = (".txt", ".jsonl")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSource:
    """Arguments for `datasets.load_dataset(path, name, data_files=..., revision=...)` plus split and text field."""

    path: str
    name: str | None
    revision: str
    split: str
    text_field: str = "text"
    data_files: dict[str, str] | None = None

    def load_kwargs(self, split: str) -> dict:
        kw = dict(path=self.path, name=self.name, revision=self.revision, split=split)
        if self.data_files is not None:
            kw["data_files"] = self.data_files
        return kw


SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", WIKITEXT_REVISION, "test"),
    "c4": HubSource(
        "allenai/c4",
        None,
        C4_REVISION,
        "validation",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    # The backup holds only val.jsonl.zst, exposed as split "validation" (needs `zstandard` installed).
    "pile": HubSource("mit-han-lab/pile-val-backup", None, PILE_REVISION, "validation"),
}


@dataclass(frozen=True)
class Document:
    text: str
    family: str


@dataclass(frozen=True)
class Windows:
    """Token windows, grouped by family (families in sorted order, windows in text order)."""

    input_ids: torch.Tensor  # [N, S] long
    families: list[str] = field(default_factory=list)  # len N

    def __post_init__(self):
        import torch

        if self.input_ids.ndim != 2 or self.input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a 2-D LongTensor, got {self.input_ids.dtype} {tuple(self.input_ids.shape)}"
            )
        if len(self.families) != self.input_ids.shape[0]:
            raise ValueError(f"{len(self.families)} families for {self.input_ids.shape[0]} windows")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


# ---------------------------------------------------------------------------------------------- loading


def load_calibration(source: str, *, split: str | None = None, max_chars: int | None = None) -> list[Document]:
    """Load calibration documents from a registry name (see `SOURCES`) or a local .txt / .jsonl file.

    `max_chars` keeps documents in order until that many characters, cutting the last one short.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise AllocMoeError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    if source in SOURCES:
        docs = _load_hub(source, split)
    else:
        path = Path(source)
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            if path.suffix or path.exists() or os.sep in source:
                raise AllocMoeError(f"unsupported calibration file {source!r}: the extension must be .txt or .jsonl")
            raise AllocMoeError(
                f"unknown calibration source {source!r}: use one of {', '.join(sorted(SOURCES))} "
                f"or a path to a .txt or .jsonl file"
            )
        if split is not None:
            raise AllocMoeError(
                f"split={split!r} applies only to hub sources ({', '.join(sorted(SOURCES))}), not to {source!r}"
            )
        docs = _load_local(path)
    return _cap_chars(docs, max_chars)


def _cap_chars(docs: list[Document], max_chars: int | None) -> list[Document]:
    if max_chars is None:
        return docs
    out, left = [], max_chars
    for d in docs:
        if left <= 0:
            break
        out.append(d if len(d.text) <= left else Document(d.text[:left], d.family))
        left -= len(d.text)
    return out


def _offline() -> str | None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def _load_hub(source: str, split: str | None) -> list[Document]:
    spec = SOURCES[source]
    split = split or spec.split
    where = f"{spec.path}@{spec.revision[:12]} split {split!r}"
    hint = "pass a local .txt or .jsonl path to --calib instead"
    # Fail before touching the network (or importing `datasets`) when offline mode is requested.
    if var := _offline():
        raise AllocMoeError(
            f"calibration source {source!r} ({where}) needs the Hugging Face Hub but {var} is set; {hint}"
        )
    try:
        import datasets
    except ImportError:
        raise AllocMoeError(
            f"calibration source {source!r} needs the `datasets` package (pip install 'alloc-moe[data]'); {hint}"
        ) from None
    try:
        ds = datasets.load_dataset(**spec.load_kwargs(split))
        texts = list(_iter_texts(ds, spec.text_field))
    except Exception as e:  # noqa: BLE001 - any hub/network/format failure is a user-facing input problem
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise AllocMoeError(
            f"could not load calibration source {source!r} ({where}): {type(e).__name__}: {msg}; {hint}"
        ) from e
    # Rows are kept as-is (empty wikitext lines included) so joining with "\n\n" reproduces the GPTQ protocol.
    return [Document(t, source) for t in texts]


def _iter_texts(ds, text_field: str):
    if hasattr(ds, "iter"):  # datasets.Dataset: stream in batches instead of materialising the whole column
        for batch in ds.iter(batch_size=1024):
            yield from batch[text_field]
    else:
        yield from ds[text_field]


def _read_text(path: Path) -> str:
    if not path.exists():
        raise AllocMoeError(f"calibration file not found: {str(path)!r}")
    if not path.is_file():
        raise AllocMoeError(f"calibration path is not a file: {str(path)!r}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AllocMoeError(f"calibration file {str(path)!r} is not valid UTF-8 (byte {e.start})") from None


def _load_local(path: Path) -> list[Document]:
    raw = _read_text(path)
    if path.suffix.lower() == ".txt":
        docs = [Document(raw, path.stem)] if raw.strip() else []
    else:
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AllocMoeError(
                    f"{str(path)!r} line {lineno}: invalid JSON ({e.msg}); each line must be a JSON object"
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise AllocMoeError(f'{str(path)!r} line {lineno}: expected a JSON object with a string "text" field')
            family = obj.get("family", path.stem)
            if not isinstance(family, str) or not family:
                raise AllocMoeError(f'{str(path)!r} line {lineno}: "family" must be a non-empty string, got {family!r}')
            docs.append(Document(obj["text"], family))
    if not any(d.text.strip() for d in docs):
        raise AllocMoeError(f"calibration file {str(path)!r} is empty: it holds no text")
    return docs


# ------------------------------------------------------------------------------------------ tokenizing


def tokenize_windows(
    documents, tokenizer, *, seq_len: int, max_tokens: int | None = None, add_bos: bool = True
) -> Windows:
    """Cut each family's text into non-overlapping `seq_len`-token windows (incomplete tail dropped).

    Documents of one family are joined with "\\n\\n" and tokenized once; families go in sorted order.
    With `add_bos` and a tokenizer bos token, every window starts with bos followed by seq_len-1 text tokens.
    `max_tokens` keeps max_tokens // seq_len whole windows, split across families in proportion to how
    many windows each has (largest remainder, ties to the earlier family); each family keeps its first ones.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise AllocMoeError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < seq_len):
        raise AllocMoeError(f"max_tokens must be None or an integer >= seq_len ({seq_len}), got {max_tokens!r}")
    import torch

    by_family: dict[str, list[str]] = {}
    for d in documents:
        by_family.setdefault(d.family, []).append(d.text)
    if not by_family:
        raise AllocMoeError("no calibration documents to tokenize")

    bos = tokenizer.bos_token_id if add_bos else None
    step = seq_len - 1 if bos is not None else seq_len  # text tokens per window
    per_family: dict[str, torch.Tensor] = {}
    n_text_tokens = longest = 0
    for fam in sorted(by_family):
        ids = tokenizer("\n\n".join(by_family[fam]), add_special_tokens=False, verbose=False)["input_ids"]
        n_text_tokens += len(ids)
        longest = max(longest, len(ids))
        n = len(ids) // step
        if n == 0:
            continue
        w = torch.tensor(ids[: n * step], dtype=torch.long).view(n, step)  # [n, step]
        if bos is not None:
            w = torch.cat([torch.full((n, 1), bos, dtype=torch.long), w], dim=1)  # [n, seq_len]
        per_family[fam] = w
    if not per_family:
        raise AllocMoeError(
            f"no complete window: calibration text has {n_text_tokens} tokens ({len(by_family)} families, "
            f"largest {longest}) but seq_len={seq_len} needs {step} text tokens per window; "
            f"use more text or a smaller seq_len"
        )

    keep = _proportional(
        {f: len(w) for f, w in per_family.items()}, None if max_tokens is None else max_tokens // seq_len
    )
    chunks, families = [], []
    for fam, w in per_family.items():
        if keep[fam]:
            chunks.append(w[: keep[fam]])
            families += [fam] * keep[fam]
    return Windows(torch.cat(chunks), families)


def _proportional(counts: dict[str, int], budget: int | None) -> dict[str, int]:
    total = sum(counts.values())
    if budget is None or budget >= total:
        return dict(counts)
    keep = {f: budget * n // total for f, n in counts.items()}
    order = sorted(counts, key=lambda f: -(budget * counts[f] % total))  # stable: ties keep sorted family order
    for f in order[: budget - sum(keep.values())]:
        keep[f] += 1
    return keep
