"""Layer sensitivity profiling: Algorithm 1 (perplexity, allocation-isolated) and LExI (data-free).

Algorithm 1 profiles MoE layer i at k = K_orig-1..1 with all earlier layers at K_orig and all later layers at 1;
S[i, K_orig] is the perplexity of the configuration before layer i is reduced (= S[i+1, 1], or the original
model for the last layer). The naive path runs 1 + L*(K_orig-1) full forward passes.

Prefix reuse: the layers before the target always run at K_orig, so their output is the same for every k of the
target. We carry the hidden states entering MoE layer i (one forward step per row) and run only the suffix
(layer i to the top, then final norm and LM head) for each k: about half the layer work on average.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backends.dtypes import DTYPE_HELP
from ..backends.hf.model import MoeLayer, moe_layers
from ..backends.hf.perplexity import nll_from_logits, window_nll
from ..errors import AllocMoeError
from ..io import atomic_write_text


class _TopK:
    """Set the routers' top_k (restored on exit)."""

    def __init__(self, layers: list[MoeLayer]):
        self.layers = layers

    def set(self, ks: list[int]) -> None:
        for m, k in zip(self.layers, ks):
            m.gate.top_k = int(k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.set([m.k_orig for m in self.layers])


def _batches(input_ids: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    return [input_ids[s : s + batch_size].to(device) for s in range(0, input_ids.shape[0], batch_size)]


def _full_nll(model, batches) -> float:
    return sum(float(window_nll(model, ids).sum()) for ids in batches)


class _Checkpoint:
    """Finished rows of S in a JSON file next to the output; rewritten atomically after every row."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint, self.rows = path, fingerprint, {}
        self.original_nll: float | None = None
        data = self.read(path)
        if data is not None:
            if data["fingerprint"] != fingerprint:
                raise AllocMoeError(f"checkpoint {path} belongs to a different profiling run; delete it to start over")
            self.rows, self.original_nll = data["rows"], data["original_nll"]

    @staticmethod
    def read(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            return {"fingerprint": data.get("fingerprint"), "original_nll": data.get("original_nll"),
                    "rows": {int(i): [float(x) for x in v] for i, v in data["rows"].items()}}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise AllocMoeError(f"checkpoint {path} is corrupt; delete it to start over") from None

    def check_original(self, nll: float) -> None:
        """The original model's NLL is recomputed by every run: a resumed run must see the same model and data."""
        if self.original_nll is not None and not math.isclose(nll, self.original_nll, rel_tol=1e-6):
            raise AllocMoeError(f"checkpoint {self.path} was made with a different model or data (original NLL "
                                f"{self.original_nll:.6g}, now {nll:.6g}); delete it to start over")
        self.original_nll = nll

    def save_row(self, i: int, values: list[float]) -> None:
        self.rows[i] = values
        atomic_write_text(self.path, json.dumps(
            {"fingerprint": self.fingerprint, "original_nll": self.original_nll, "rows": self.rows}, indent=1))

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def profile_perplexity(
    model,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    prefix_reuse: bool = True,
    checkpoint: Path | None = None,
    fingerprint: dict | None = None,
    progress: bool = True,
) -> tuple[list[int], np.ndarray]:
    """Algorithm 1 on windows `input_ids [N, S]`. Returns (decoder indices of the MoE layers, S [L, K_orig])."""
    layers = moe_layers(model)
    L, K = len(layers), layers[0].k_orig
    if any(m.k_orig != K for m in layers):
        raise AllocMoeError("Algorithm 1 needs the same K_orig in every MoE layer")
    device = next(model.parameters()).device
    batches = _batches(input_ids, batch_size, device)
    n_tok = input_ids.shape[0] * (input_ids.shape[1] - 1)
    ckpt = _Checkpoint(Path(checkpoint), fingerprint or {}) if checkpoint else None
    rows: dict[int, list[float]] = dict(ckpt.rows) if ckpt else {}  # row i -> nll sums for k = 1..K-1
    todo = [i for i in range(L) if i not in rows]
    bar = tqdm(total=1 + L * (K - 1), initial=(L - len(todo)) * (K - 1), desc="profile", unit="pass", disable=not progress)
    with torch.inference_mode(), _TopK(layers) as topk:
        topk.set([K] * L)
        if prefix_reuse:  # one original pass gives S[L-1, K_orig] and the inputs the suffix runs start from
            captured = [_capture_layer_inputs(model, ids, layers[0].index) for ids in batches]
            full = sum(nll for _, _, nll in captured)
        else:
            full = _full_nll(model, batches)  # S[L-1, K_orig]: the original model
        if ckpt:
            ckpt.check_original(full)
        bar.update(1)
        if prefix_reuse:
            states = [(h, kw) for h, kw, _ in captured]
            run_row = _suffix_rows(model, layers, batches, states, topk, todo, bar)
        else:
            run_row = _naive_rows(model, layers, batches, topk, todo, bar)
        for i, values in run_row:
            rows[i] = values
            if ckpt:
                ckpt.save_row(i, values)
    bar.close()
    nll = np.empty((L, K))
    for i in range(L):
        nll[i, : K - 1] = rows[i]
        nll[i, K - 1] = rows[i + 1][0] if i + 1 < L else full
    if ckpt:
        ckpt.done()
    return [m.index for m in layers], np.exp(nll / n_tok)


def _naive_rows(model, layers, batches, topk, todo, bar):
    L, K = len(layers), layers[0].k_orig
    for i in todo:
        values = []
        for k in range(1, K):
            topk.set([K] * i + [k] + [1] * (L - i - 1))
            values.append(_full_nll(model, batches))
            bar.update(1)
        yield i, values


def _capture_layer_inputs(model, ids, first: int):
    """Run the model once (all K_orig): return the hidden states entering decoder layer `first`, every decoder
    layer's keyword arguments (masks, rotary embeddings: shared tensors, no copies) and the summed NLL."""
    decoder = model.model.layers
    kwargs, hidden = {}, {}

    def pre_hook(j):
        def hook(mod, args, kw):
            kwargs[j] = kw
            if j == first:
                hidden[0] = args[0] if args else kw["hidden_states"]
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(j), with_kwargs=True) for j, layer in enumerate(decoder)]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    layer_kwargs = {j: {k: v for k, v in kw.items() if k != "hidden_states"} for j, kw in kwargs.items()}
    return hidden[0], layer_kwargs, float(nll_from_logits(logits, ids).sum())


def _run_layers(decoder, hidden, kwargs, start: int, stop: int):
    for j in range(start, stop):
        hidden = decoder[j](hidden, **kwargs[j])
    return hidden


def _suffix_rows(model, layers, batches, states, topk, todo, bar):
    """`states`: per batch, (hidden states entering the first MoE layer, per-layer kwargs) from the original pass."""
    L, K = len(layers), layers[0].k_orig
    base = model.model
    decoder = base.layers
    n_dec = len(decoder)
    pos = layers[0].index  # decoder index the carried hidden states enter
    for i in todo:
        d = layers[i].index
        topk.set([K] * L)
        states = [(_run_layers(decoder, h, kw, pos, d), kw) for h, kw in states]  # advance the prefix at K_orig
        pos = d
        values = []
        for k in range(1, K):
            topk.set([K] * i + [k] + [1] * (L - i - 1))
            total = 0.0
            for ids, (h, kw) in zip(batches, states):
                out = base.norm(_run_layers(decoder, h, kw, d, n_dec))
                total += float(nll_from_logits(model.lm_head(out), ids).sum())
            values.append(total)
            bar.update(1)
        yield i, values


def profile_lexi(model, *, tokens: int = 256, draws: int = 4, seed: int = 0, progress: bool = True) -> tuple[list[int], np.ndarray]:
    """LExI's data-free sensitivity: S[i, k-1] = mean over draws of ||block_k(x) - block_Korig(x)||_F.

    x is Gaussian noise passed through the layer's own post-attention norm (the block's real input distribution
    up to scale); the block includes shared experts, which cancel in the difference.
    """
    layers = moe_layers(model)
    decoder = model.model.layers
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    K = max(m.k_orig for m in layers)
    S = np.zeros((len(layers), K))
    with torch.inference_mode(), _TopK(layers):
        for i, m in enumerate(tqdm(layers, desc="lexi", unit="layer", disable=not progress)):
            norm = getattr(decoder[m.index], "post_attention_layernorm", None)
            g = torch.Generator().manual_seed(seed * 100003 + m.index)
            for _ in range(draws):
                x = torch.randn(1, tokens, model.config.hidden_size, generator=g).to(device, dtype)  # [1, T, H]
                if norm is not None:
                    x = norm(x)
                m.gate.top_k = m.k_orig
                ref = m.block(x).float()
                for k in range(1, m.k_orig):
                    m.gate.top_k = k
                    S[i, k - 1] += float(torch.linalg.norm(m.block(x).float() - ref)) / draws
                m.gate.top_k = m.k_orig
    return [m.index for m in layers], S


def register_cli(sub) -> None:
    p = sub.add_parser(
        "profile", help="profile per-layer sensitivity (Algorithm 1 perplexity, or LExI data-free) into S.csv",
        description="Write the long layer,k,value sensitivity CSV that `alloc-moe plan` reads.",
    )
    p.add_argument("--model", required=True, help="hub id or local model directory")
    p.add_argument("--method", choices=["ppl", "lexi"], default="ppl", help="ppl: Algorithm 1 (default); lexi: data-free")
    p.add_argument("--calib", help="calibration source (wikitext2, c4, pile, or a local .txt/.jsonl); needed for ppl")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--max-tokens", type=int, default=8192, help="calibration tokens used (default 8192 = 64x128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-prefix-reuse", action="store_true", help="run every configuration from the first layer (slow reference path)")
    p.add_argument("--lexi-tokens", type=int, default=256, help="lexi: Gaussian tokens per draw")
    p.add_argument("--lexi-draws", type=int, default=4, help="lexi: draws averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--experts-implementation", choices=["eager", "grouped_mm", "batched_mm"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="sensitivity CSV to write")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from .. import __version__
    from ..backends.hf.loading import load_model
    from ..core.sensitivity import write_sensitivity
    from ..data.text import load_calibration, tokenize_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method == "ppl" and not args.calib:
        raise AllocMoeError("--method ppl needs --calib (wikitext2, c4, pile, or a local .txt/.jsonl)")
    for name in ("seq_len", "max_tokens", "batch_size", "lexi_tokens", "lexi_draws"):
        if getattr(args, name) < 1:
            raise AllocMoeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    docs = load_calibration(args.calib) if args.method == "ppl" else None
    ckpt_path = Path(str(args.out) + ".ckpt.json")
    if args.method == "ppl":
        _Checkpoint.read(ckpt_path)  # a corrupt checkpoint fails before the model is loaded
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, experts_implementation=args.experts_implementation,
                            progress=not args.no_progress)
    torch.manual_seed(args.seed)
    if args.method == "lexi":
        layers, S = profile_lexi(model, tokens=args.lexi_tokens, draws=args.lexi_draws, seed=args.seed, progress=not args.no_progress)
    else:
        windows = tokenize_windows(docs, tok, seq_len=args.seq_len, max_tokens=args.max_tokens)
        fingerprint = {"model": args.model, "calib": args.calib, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                       "batch_size": args.batch_size, "prefix_reuse": not args.no_prefix_reuse, "dtype": args.dtype,
                       "device": args.device, "experts_implementation": args.experts_implementation,
                       "windows_sum": int(windows.input_ids.sum()), "version": __version__}
        layers, S = profile_perplexity(
            model, windows.input_ids, batch_size=args.batch_size, prefix_reuse=not args.no_prefix_reuse,
            checkpoint=ckpt_path, fingerprint=fingerprint, progress=not args.no_progress,
        )
    write_sensitivity(args.out, layers, S)
    print(f"wrote {args.out}: {len(layers)} MoE layers x K_orig={S.shape[1]} ({args.method})")
    return 0
