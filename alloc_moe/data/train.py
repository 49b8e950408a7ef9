"""`alloc-moe train`: train a small MoE from scratch on CPU on the synthetic corpus (the embedded default's model).

The result is a plain transformers checkpoint plus the word-level tokenizer: `AutoModelForCausalLM` /
`AutoTokenizer.from_pretrained(DIR)` load it, so every other command (profile, plan, eval, ppl) treats it like a
hub model. Deterministic for a seed and thread count; checkpoints every `checkpoint_every` steps next to the
output (`DIR.ckpt.pt`) and resumes from there when re-run with the same settings.

Loss = next-token cross-entropy + `aux_loss_coef` x load-balancing loss (Switch-style, on every MoE router)
+ `z_loss_coef` x router z-loss. A small aux coefficient keeps experts in use while letting routers become
peaked, which is what makes budget allocation matter. The routers train with `router_lr_mult` x the learning rate
(their own AdamW group): at this scale and step count, routers trained at the common rate stay nearly flat in the
middle layers (normalised entropy 0.8-0.97, measured), so the default recipe is aux 1e-4, no z-loss, routers at
1.5x (README, "What the main job does", has the measured sweep).
"""

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from ..errors import AllocMoeError
from .train_config import TrainConfig  # noqa: F401 - re-exported: `from alloc_moe.data.train import TrainConfig`


def build_model(cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    from . import synthetic, zoo

    config = zoo.make_config(cfg.arch, width=cfg.width, layers=cfg.layers, vocab_size=zoo.TOKENIZER_VOCAB)
    config.vocab_size = len(synthetic.VOCAB)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = synthetic.BOS_ID, synthetic.EOS_ID, synthetic.PAD_ID
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def token_stream(cfg: TrainConfig) -> torch.Tensor:
    """All training tokens as [steps, batch, seq_len]: documents packed back to back, each opened by <s>."""
    from . import synthetic

    need = cfg.steps * cfg.batch_size * cfg.seq_len
    _, weights = synthetic.corpus_spec(cfg.corpus)
    ids: list[int] = []
    chunk = 0
    while len(ids) < need:
        docs = synthetic.make_corpus(cfg.seed * 1000 + chunk, 200, weights=weights, corpus=cfg.corpus)
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(cfg.seed * 1000 + chunk)).tolist()
        for i in order:
            ids.append(synthetic.BOS_ID)
            ids.extend(synthetic.VOCAB[w] for w in docs[i]["text"].split())
        chunk += 1
    return torch.tensor(ids[:need]).view(cfg.steps, cfg.batch_size, cfg.seq_len)


class RouterTap:
    """Collects every MoE router's logits [T, E] during a forward (forward hooks on `mlp.gate`)."""

    def __init__(self, model):
        from ..backends.hf.model import moe_layers

        self.layers = moe_layers(model)
        self.logits: list[torch.Tensor] = []
        self._handles = [m.gate.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, args, output):
        self.logits.append(output[0])  # [T, E]

    def pop(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def router_losses(logits: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style load-balancing loss E * sum_e f_e P_e (f_e: share of top-k slots, P_e: mean probability),
    and the z-loss mean(logsumexp(logits)^2), both averaged over layers."""
    aux, z = [], []
    for lg in logits:  # [T, E]
        E = lg.shape[-1]
        p = lg.float().softmax(-1)  # [T, E]
        top = p.topk(k, dim=-1).indices  # [T, k]
        f = torch.zeros(E, dtype=p.dtype).scatter_add_(0, top.flatten(), torch.ones(top.numel())) / top.numel()  # [E]
        aux.append(E * (f * p.mean(0)).sum())
        z.append(torch.logsumexp(lg.float(), -1).pow(2).mean())
    return torch.stack(aux).mean(), torch.stack(z).mean()


def routing_summary(model, ids: torch.Tensor) -> list[dict]:
    """Per MoE layer on `ids` [B, S]: mean top-1 routing probability, normalised routing entropy H / log E, and the
    busiest expert's share of the top-k slots relative to an even share (1 = balanced, E = one expert takes all)."""
    tap = RouterTap(model)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        tap.remove()
    rows = []
    for m, lg in zip(tap.layers, tap.logits):
        p = lg.float().softmax(-1)  # [T, E]
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])  # [T]
        top = p.topk(m.k_orig, dim=-1).indices  # [T, k]
        load = torch.bincount(top.flatten(), minlength=p.shape[-1]).float() / top.numel()  # [E]
        rows.append({"layer": m.index, "top1_prob": round(p.max(-1).values.mean().item(), 4),
                     "norm_entropy": round(ent.mean().item(), 4),
                     "max_load": round(load.max().item() * p.shape[-1], 3)})
    return rows


def heldout_loss(model, seq_len: int, docs_per_family: int = 20, corpus: str | None = None) -> dict:
    """Mean next-token loss per family on held-out documents (questions never seen in training)."""
    from . import synthetic

    out = {}
    with torch.no_grad():
        corpus = corpus or synthetic.CORPUS
        families, _ = synthetic.corpus_spec(corpus)
        for fam in families:
            w = {f: int(f == fam) for f in families}
            docs = synthetic.make_corpus(99991, docs_per_family, weights=w, split="heldout", corpus=corpus)
            ids = torch.tensor([[synthetic.BOS_ID] + [synthetic.VOCAB[t] for t in d["text"].split()][: seq_len - 1]
                                for d in docs if len(d["text"].split()) >= seq_len - 1])
            out[fam] = round(model(ids, labels=ids).loss.item(), 4)
    return out


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def deterministic_kernels():
    """torch's deterministic kernels for the block (restored after). Multi-threaded CPU backward of `hidden[token_idx]`
    (the MoE blocks' gather) accumulates with index_put_, whose default CPU kernel adds in thread-dependent order:
    2-thread runs of one training config diverged within 40 steps, and 20 repeats of one such backward gave 3-8
    different gradients (measured; tests/data/test_train.py). The deterministic kernel makes a run reproducible for a
    seed and thread count."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None,
          overwrite: bool = False) -> dict | None:
    """Train and write the checkpoint + tokenizer to `out_dir` (atomically). Returns the training summary.

    `stop_after` stops (after checkpointing) once that many steps are done, as a kill would: a later call resumes.
    """
    from tqdm.auto import tqdm

    from ..harness.provenance import environment

    cfg.check()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AllocMoeError(f"{out} exists and is not empty; pass --overwrite to replace it")
    ckpt_path = out.with_name(out.name + ".ckpt.pt")
    model = build_model(cfg)
    from ..backends.hf.model import moe_layers

    k = moe_layers(model)[0].k_orig
    routers = {id(p) for m in moe_layers(model) for p in m.gate.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in routers], "lr_mult": 1.0},
              {"params": [p for p in model.parameters() if id(p) in routers], "lr_mult": cfg.router_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    data = token_stream(cfg)  # [steps, B, S]
    start, history = 0, []
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise AllocMoeError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__}); delete it to start over") from None
        if state.get("config") != dataclasses.asdict(cfg):
            raise AllocMoeError(f"checkpoint {ckpt_path} was written with other training settings; delete it or "
                                f"train with the same settings to resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    model.train()
    with deterministic_kernels():  # reproducible for a seed and thread count (see deterministic_kernels)
        tap = RouterTap(model)
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress, unit="step")
        t0, tokens = time.perf_counter(), 0
        try:
            for step in range(start, cfg.steps):
                for g in opt.param_groups:
                    g["lr"] = _lr(cfg, step) * g["lr_mult"]
                ids = data[step]  # [B, S]
                lm = model(ids, labels=ids).loss
                aux, z = router_losses(tap.pop(), k)
                loss = lm + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                tokens += ids.numel()
                history.append({"step": step + 1, "lm_loss": round(lm.item(), 4),
                                "aux_loss": round(aux.item(), 4)})
                bar.set_postfix(loss=f"{lm.item():.3f}", aux=f"{aux.item():.2f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                bar.update(1)
                done = step + 1
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_after:
                    _atomic_save({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                                  "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": done,
                                  "history": history}, ckpt_path)
                if stop_after is not None and done >= stop_after and done < cfg.steps:
                    return None
        finally:
            bar.close()
            tap.remove()
    model.eval()
    probe = data[-1][:8]
    summary = {
        "config": dataclasses.asdict(cfg),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_lm_loss": history[-1]["lm_loss"],
        "loss_curve": history[:: max(1, len(history) // 50)] + history[-1:],
        "heldout_loss": heldout_loss(model, cfg.seq_len, corpus=cfg.corpus),
        "routing": routing_summary(model, probe),
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    _write_model_dir(model, summary, out)
    ckpt_path.unlink(missing_ok=True)
    return summary


def _atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_model_dir(model, summary: dict, out: Path) -> None:
    from ..io import atomic_dir
    from . import synthetic

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        synthetic.make_word_tokenizer().save_pretrained(tmp)
        (tmp / "alloc_moe_train.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def register_cli(sub) -> None:
    from .synthetic import CORPORA
    from .zoo import ZOO_SHAPES

    d = TrainConfig()
    p = sub.add_parser("train", help="train a small MoE from scratch on the synthetic corpus (CPU, minutes)",
                       description="Train a small MoE on the synthetic corpus; writes a transformers checkpoint + "
                                   "tokenizer. Checkpoints to OUT.ckpt.pt and resumes from it when re-run.")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--arch", choices=list(ZOO_SHAPES), default=d.arch)
    p.add_argument("--width", choices=["tiny", "small"], default=d.width)
    p.add_argument("--corpus", default=d.corpus,
                   help=f"synthetic corpus version: {', '.join(CORPORA)} (default {d.corpus}; v1: the corpus without a world)")
    for name in ("layers", "steps", "batch_size", "seq_len", "warmup", "seed", "checkpoint_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "aux_loss_coef", "z_loss_coef", "router_lr_mult"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--threads", type=int, default=None, help="torch threads (results are deterministic per count)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.threads is not None:
        if args.threads < 1:
            raise AllocMoeError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    s = train(cfg, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {args.out}: {s['num_parameters'] / 1e6:.2f}M params, final loss {s['final_lm_loss']:.3f}, "
          f"held-out loss {s['heldout_loss']}")
    for r in s["routing"]:
        print(f"  layer {r['layer']}: top-1 prob {r['top1_prob']:.3f}, normalised entropy {r['norm_entropy']:.3f}, "
              f"busiest expert {r['max_load']:.2f}x an even share")
    return 0
