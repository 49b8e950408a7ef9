"""`alloc-moe eval`: lm-eval accuracy of a model under a plan (or the original model), as summary-CSV rows.

lm-eval runs in-process on the patched model. The backend (`--backend`, a name registered in
`alloc_moe.backends.base.BACKENDS`, reached through `get_backend`) builds the lm-eval model object with the plan
applied for the duration of a block (`Backend.make_lm`); `hf` is `alloc_moe/backends/hf/`, `vllm`
`alloc_moe/backends/vllm/`. Several plans are evaluated in one process (`evaluate(..., plans=[...])`) so the
model and the tasks are loaded once.

`alloc-moe eval --resume-dir DIR` checkpoints every finished plan's result there (`alloc_moe.harness.resume`): a killed job,
run again, evaluates only the plans it had not finished and writes the same bytes as an uninterrupted run.

Scores are in points (0-100); a task's standard error is lm-eval's; group scores are the mean of the group's tasks
(`tasks.group_scores`). Output JSON has no timestamps: same inputs, same bytes.

Per-item results (`"items"`, for the paired statistics of `alloc_moe.report.claims`): {task: {lm-eval task: [metric
value per document, in doc_id order]}}, from lm-eval's sample logs; a leaf task is its own single member, a group or
tag lists its leaf tasks. Values are the metric's per-document value (0/1 ints for acc and exact_match, not points);
a task whose per-document metric is not a number (corpus-level metrics) has no entry.
"""

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

from ..backends.base import BACKENDS, DTYPE_HELP, check_dtype, get_backend
from ..backends.vllm import options as vllm_options
from ..core.plan import Plan
from ..data.tasks import EMBEDDED_NAMES, SUITE_NAMES, TaskSpec, group_scores, suite
from ..errors import AllocMoeError
from ..io import atomic_write_text, sha256_file

ROW_COLUMNS = ["model", "layer_method", "token_allocation", "k_base", "budget", "calibration", "backend", "task",
               "group", "metric", "value", "stderr", "seed"]


# ---- tasks ------------------------------------------------------------------------------------------------------
def _embedded_dir(include_path: str | None, version: int | None = None) -> Path:
    """The generated embedded suite of `version` (default: the current one): `include_path` if it holds it, else a
    cache keyed by the generator's code and the version. A folder whose suite.json names another version is an error
    (one line), not silently replaced."""
    from ..data.tasks import embedded

    version = embedded.VERSION if version is None else version
    tasks = embedded.VERSIONS[version]
    if include_path and any(Path(include_path).glob("emb_*.yaml")):
        found = embedded.suite_version_in(include_path)
        if found is not None and found != version:
            raise AllocMoeError(f"{include_path} holds {embedded.suite_name(found)}, not the asked "
                                f"{embedded.suite_name(version)}: write it with `alloc-moe make-tasks --version {version}`")
        if found == version or all((Path(include_path) / f"{t}.yaml").exists() for t in tasks):
            return Path(include_path)
    src = Path(embedded.__file__)
    key = hashlib.sha256(src.read_bytes() + (src.parent.parent / "synthetic.py").read_bytes()).hexdigest()[:12]
    cache = Path.home() / ".cache" / "alloc_moe" / f"embedded-v{version}-tasks-{key}"
    if not all((cache / f"{t}.yaml").exists() for t in tasks):
        embedded.write_suite(cache, version=version)
    return cache


def _local_config(path: Path) -> dict:
    """A local lm-eval YAML as a config dict, with its data files made absolute (relative to the YAML's folder)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise AllocMoeError(f"cannot read task file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise AllocMoeError(f"{path} is not an lm-eval task YAML (no 'task' key)")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        items = files.items() if isinstance(files, dict) else [("test", files)]
        fixed = {}
        for split, f in items:
            p = Path(f) if Path(f).is_absolute() else path.parent / f
            if not p.exists():
                raise AllocMoeError(f"task {cfg['task']}: data file {p} not found")
            fixed[split] = str(p.resolve())
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": fixed if isinstance(files, dict) else fixed["test"]}
    return cfg


def _spec_from_config(cfg: dict) -> TaskSpec:
    metric = (cfg.get("metric_list") or [{"metric": "acc"}])[0]["metric"]
    filt = (cfg.get("filter_list") or [{"name": "none"}])[0]["name"]
    meta = cfg.get("metadata") or {}
    return TaskSpec(name=cfg["task"], group=meta.get("group", "other"), metric=metric, filter=filt, chance=meta.get("chance"))


def resolve_tasks(tasks: str, include_path: str | None = None) -> list[tuple[TaskSpec, str | dict]]:
    """`--tasks` (comma-separated suite names, lm-eval task names, or paths to task YAML files / folders) ->
    [(spec, what lm-eval gets)]. Fails with one line on anything unknown, before any model is loaded."""
    out, names = [], []
    for item in [t.strip() for t in tasks.split(",") if t.strip()]:
        if item in EMBEDDED_NAMES or item.startswith("embedded-v"):  # embedded-v9: one line naming the versions
            from ..data.tasks import embedded

            version = embedded.version_of(item)
            d = _embedded_dir(include_path, version)
            for s in suite(item):
                cfg = _local_config(d / f"{s.name}.yaml")
                out.append((dataclasses.replace(s, chance=(cfg.get("metadata") or {}).get("chance")), cfg))
        elif item in SUITE_NAMES:
            out += [(s, s.name) for s in suite(item)]
            names += [s.name for s in suite(item)]
        elif item.endswith((".yaml", ".yml")) or Path(item).is_dir():
            p = Path(item)
            files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
            if not p.exists() or not files:
                raise AllocMoeError(f"task path {item} not found (give a task YAML file or a folder of them)")
            for f in files:
                cfg = _local_config(f)
                out.append((_spec_from_config(cfg), cfg))
        else:
            out.append((TaskSpec(name=item, group="other", metric="acc"), item))
            names.append(item)
    if not out:
        raise AllocMoeError(f"no tasks given; allowed: {', '.join(SUITE_NAMES)}, lm-eval task names, or task YAML paths")
    if names:
        known = _task_manager(include_path, defaults=True).all_tasks
        unknown = [n for n in names if n not in known]
        if unknown:
            raise AllocMoeError(f"unknown task(s) {', '.join(unknown)}; give lm-eval task names, suite names "
                                f"({', '.join(SUITE_NAMES)}) or paths to task YAML files")
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    class ReusingTaskManager(TaskManager):
        """Loads a task list once per process: every plan of `evaluate` reuses the task objects (lm-eval rebuilds
        their requests at each evaluation), instead of re-reading the datasets per plan."""

        _loaded: dict = {}

        def load(self, tasks):
            key = json.dumps(tasks, sort_keys=True, default=str)
            if key not in self._loaded:
                try:
                    self._loaded[key] = super().load(tasks)
                except (ConnectionError, FileNotFoundError) as e:  # datasets' offline / not-found errors: one line
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise AllocMoeError(f"cannot load the data of the lm-eval tasks ({type(e).__name__}: {first}); "
                                        "offline, stage the datasets (alloc-moe stage) and run with HF_DATASETS_CACHE="
                                        "<stage>/datasets HF_DATASETS_OFFLINE=1 (the workflow's offline.stage_dir)") from None
            return self._loaded[key]

    return ReusingTaskManager(include_path=include_path, include_defaults=defaults)


# ---- scoring ----------------------------------------------------------------------------------------------------
def _metric(entry: dict, spec: TaskSpec) -> tuple[float, float]:
    key = f"{spec.metric},{spec.filter}" if spec.filter else next((k for k in entry if k.startswith(spec.metric + ",")
                                                                    and "stderr" not in k), None)
    if key not in entry:
        raise AllocMoeError(f"task {spec.name}: lm-eval reported no metric {key or spec.metric!r} "
                            f"(has: {', '.join(k for k in entry if k != 'alias')})")
    name, _, filt = key.partition(",")
    se = entry.get(f"{name}_stderr,{filt}")
    se = float(se) if isinstance(se, (int, float)) else float("nan")
    return 100.0 * float(entry[key]), 100.0 * se


def task_score(results: dict, spec: TaskSpec) -> tuple[float, float]:
    """(value, stderr) in points for one spec from lm-eval's results; a tag scores the mean of its member tasks."""
    for section in ("groups", "results"):
        if spec.name in results.get(section, {}):
            entry = results[section][spec.name]
            if any(k.startswith(spec.metric + ",") for k in entry):
                return _metric(entry, spec)
    members = results.get("group_subtasks", {}).get(spec.name) or [
        n for n in results.get("results", {}) if n != spec.name and spec.kind == "tag"]
    vals = [_metric(results["results"][m], spec) for m in members if m in results.get("results", {})]
    if not vals:
        raise AllocMoeError(f"task {spec.name}: not in lm-eval's results")
    return sum(v for v, _ in vals) / len(vals), math.sqrt(sum(s * s for _, s in vals)) / len(vals)


def _leaves(res: dict, name: str) -> list[str]:
    """The lm-eval tasks with sample logs under `name`: itself, or its group's subtasks, recursively."""
    if name in res.get("samples", {}):
        return [name]
    return [leaf for sub in res.get("group_subtasks", {}).get(name, []) for leaf in _leaves(res, sub)]


def _tagged(res: dict, task: str, tag: str) -> bool:
    """Whether lm-eval's config of `task` lists `tag` among its tags (a tag is not a group: no group_subtasks)."""
    tags = (res.get("configs", {}).get(task) or {}).get("tag") or []
    return tag in ([tags] if isinstance(tags, str) else tags)


def _compact(v) -> int | float | None:
    """A per-document metric value as stored: an int when integral (acc: 0/1), else rounded; None if not a number."""
    if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)):
        return int(v) if float(v).is_integer() else round(float(v), 6)
    return None


def task_items(res: dict, spec: TaskSpec) -> dict[str, list]:
    """{leaf lm-eval task: [per-document metric value in doc_id order]} of one spec from `simple_evaluate(...,
    log_samples=True)`'s results; the same filter as `task_score` (`spec.filter`, else the first one logged)."""
    samples = res.get("samples") or {}
    names = _leaves(res, spec.name) or [n for n in samples if _tagged(res, n, spec.name)]
    out = {}
    for name in sorted(names):
        logged = [s for s in samples[name] if spec.metric in s]
        if not logged:
            continue
        filt = spec.filter or logged[0]["filter"]
        values = [_compact(s[spec.metric]) for s in sorted((s for s in logged if s["filter"] == filt),
                                                          key=lambda s: s["doc_id"])]
        if values and None not in values:
            out[name] = values
    return out


# ---- evaluation -------------------------------------------------------------------------------------------------
def plan_fields(plan: Plan | None, model_obj=None, k_orig: int | None = None, num_layers: int | None = None) -> dict:
    if plan is None:
        return {"layer_method": "original", "token_allocation": "topk", "k_base": "",
                "budget": float(k_orig * num_layers) if k_orig and num_layers else float("nan")}
    return {"layer_method": plan.layer_method, "token_allocation": plan.token_allocation,
            "k_base": plan.k_base if plan.token_allocation == "alloc-t" else "", "budget": float(plan.budget)}


@functools.lru_cache(maxsize=1)
def _lm_eval_env_info() -> tuple:
    from lm_eval.loggers.utils import add_env_info

    info: dict = {}
    add_env_info(info)
    return tuple(info.items())


def _collect_env_info_once() -> None:
    """lm-eval's `simple_evaluate` collects torch's environment report (`add_env_info`: subprocesses, ~0.8 s) on every
    call, so once per plan here; the process's environment does not change between plans: collect it once. (The
    report is not in our outputs: a result's environment is `harness.provenance.environment()`.)"""
    import lm_eval.evaluator

    lm_eval.evaluator.add_env_info = lambda storage: storage.update(_lm_eval_env_info())


def evaluate(model: str, plans: list[Plan | None], tasks: list[tuple[TaskSpec, str | dict]], *, backend: str = "hf",
             model_label: str | None = None, calibration: str = "", limit: int | None = None, batch_size: int = 64,
             num_fewshot: int | None = None, dtype: str = "auto", device: str = "auto", seed: int = 0,
             include_path: str | None = None, progress: bool = False, backend_args: dict | None = None,
             perplexity_data: str | None = None, perplexity_seq_len: int = 64) -> list[dict]:
    """Evaluate every plan (None = the original model) on `tasks`; returns one result dict per plan.

    With `perplexity_data` (a text source, see `data.load_calibration`), each result also holds the perplexity
    overall and per family and the expert pairs computed on that text (HF backend).
    """
    import lm_eval
    from lm_eval.utils import setup_logging

    from ..harness.provenance import environment

    impl = get_backend(backend)
    setup_logging("ERROR")
    _collect_env_info_once()
    needs_defaults = any(isinstance(t, str) for _, t in tasks)
    tm = _task_manager(include_path, needs_defaults) if needs_defaults else _task_manager(None, False)
    label = model_label or Path(model).name
    windows = None
    if perplexity_data is not None:
        if not impl.routing_stats:
            raise AllocMoeError(f"--perplexity needs the hf backend, not {backend!r}")
        from ..data.text import load_calibration, tokenize_windows

        windows = tokenize_windows(load_calibration(perplexity_data), impl.load(model, dtype=dtype, device=device)[1],
                                   seq_len=perplexity_seq_len)
    out = []
    for plan in plans:
        from ..backends.hf.stats import RoutingStats

        stats = RoutingStats() if impl.routing_stats else None
        with impl.make_lm(model, plan, batch_size=batch_size, dtype=dtype, device=device, seed=seed, stats=stats,
                          **(backend_args or {})) as lm:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[t for _, t in tasks], num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                log_samples=True, verbosity="ERROR")
            record = getattr(lm, "alloc_moe_record", None)  # vLLM: version, scheduler settings, Alloc-T scope
        layers = impl.engine_layers(model, dtype, device)
        k_orig, num_layers = (layers[0].k_orig, len(layers)) if layers else (None, None)
        fields = plan_fields(plan, k_orig=k_orig, num_layers=num_layers)
        rows = []
        for spec, _ in tasks:
            value, se = task_score(res, spec)
            calib = "" if plan is None else plan.provenance.get("calibration", calibration)
            rows.append({"model": label, **fields, "calibration": calib,
                         "backend": backend, "task": spec.name, "group": spec.group, "metric": spec.metric,
                         "value": round(value, 6), "stderr": round(se, 6), "seed": seed})
        result = {"rows": rows, "groups": [{k: round(v, 6) if isinstance(v, float) else v for k, v in g.items()}
                                           for g in group_scores(rows)],
                  "chance": {s.name: s.chance for s, _ in tasks if s.chance is not None},
                  "settings": {"model": model, "backend": backend, "limit": limit, "batch_size": batch_size,
                               "num_fewshot": num_fewshot, "dtype": dtype, "seed": seed,
                               "tasks": [s.name for s, _ in tasks], **({"engine": record} if record else {})}}
        if stats is not None:
            pairs = stats.summary()
            tokens = pairs[0]["tokens"] if pairs else 0
            result["computed_pairs"] = {str(r["layer"]): r["computed_pairs"] for r in pairs}
            result["activations_per_token"] = round(sum(r["computed_pairs"] for r in pairs) / tokens, 6) if tokens else 0.0
        if windows is not None:
            from .ppl import evaluate_plan

            ppl = evaluate_plan(impl.load(model, dtype=dtype, device=device)[0], windows, plan, batch_size=batch_size, progress=progress)
            result["perplexity"] = {"data": perplexity_data, "seq_len": perplexity_seq_len,
                                    **{k: ppl[k] for k in ("ppl", "n_tokens", "per_family", "activations_per_token")},
                                    "computed_pairs": {str(r["layer"]): r["computed_pairs"] for r in ppl["layers"]}}
        result["environment"] = environment()
        result["items"] = {s.name: task_items(res, s) for s, _ in tasks}  # last: long lists
        out.append(result)
    return out


def register_cli(sub) -> None:
    p = sub.add_parser("eval", help="lm-eval accuracy of a model with or without a plan (rows of accuracy.csv)",
                       description="Run lm-eval in-process on the model with the plan applied; writes byte-stable "
                                   "JSON with one row per task (columns of results/summary/accuracy.csv).")
    p.add_argument("--model", required=True, help="hub id or local model directory")
    p.add_argument("--plan", action="append", default=None,
                   help="plan JSON (repeat for several plans in one process; 'original' = no plan; default: original)")
    p.add_argument("--tasks", required=True, help=f"comma-separated: suite ({', '.join(SUITE_NAMES)}), lm-eval task names, or "
                                                  "paths to task YAML files / folders")
    p.add_argument("--backend", default="hf", help=f"one of: {', '.join(BACKENDS)} (default hf)")
    p.add_argument("--out", action="append", required=True, help="result JSON (one per --plan, in the same order)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    p.add_argument("--model-label", default=None, help="model name written in the rows (default: the folder name)")
    p.add_argument("--calibration", default="",
                   help="calibration label for plans that do not record one (`alloc-moe plan --calibration`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--perplexity", metavar="TEXT", default=None,
                   help="also report perplexity (overall, per family) on this text source (.jsonl/.txt or a source name)")
    p.add_argument("--perplexity-seq-len", type=int, default=64)
    p.add_argument("--resume-dir", default=None, metavar="DIR",
                   help="checkpoint each finished plan here and reuse matching checkpoints of an earlier, killed run "
                        "(one directory per job; stale files in it are removed; emptied when the outputs are written)")
    vllm_options.add_cli_options(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    import torch

    from ..backends.hf.model import check_plans_fit_model_dir

    plans_in = args.plan or ["original"]
    if len(args.out) != len(plans_in):
        raise AllocMoeError(f"give one --out per --plan: {len(plans_in)} plan(s), {len(args.out)} --out")
    for name in ("batch_size", "limit", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise AllocMoeError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise AllocMoeError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    check_dtype(args.dtype)
    backend_args = vllm_options.from_cli(args, args.backend)
    get_backend(args.backend)  # an unknown name or a missing extra: one line, before anything loads
    plans = [None if p == "original" else Plan.load(p) for p in plans_in]
    check_plans_fit_model_dir(args.model, list(zip(plans_in, plans)))
    tasks = resolve_tasks(args.tasks, args.include_path)
    _check_suites_fit_model(args.tasks, args.model)
    if args.perplexity is not None:
        from ..data.text import load_calibration

        load_calibration(args.perplexity)  # a missing or malformed text file fails here, before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    store = None
    if args.resume_dir:
        from ..harness.resume import Checkpoints

        store = Checkpoints(args.resume_dir, [_checkpoint_key(args, p, tasks, backend_args) for p in plans_in])
        store.remove_stale()
    results = _evaluate_missing(args, plans_in, plans, tasks, backend_args, store)
    for path, plan_path, res in zip(args.out, plans_in, results):
        res = {"plan": None if plan_path == "original" else plan_path,
               "plan_sha256": None if plan_path == "original" else sha256_file(plan_path), **res}
        atomic_write_text(path, json.dumps(res, indent=1) + "\n")
        head = res["rows"][0]
        print(f"{head['layer_method']} x {head['token_allocation']} B={head['budget']:g}: " + ", ".join(
            f"{g['group']} {g['value']:.2f} +- {g['stderr']:.2f}" for g in res["groups"]))
    if store is not None:
        store.clear()
    return 0


def _check_suites_fit_model(tasks: str, model: str) -> None:
    """An embedded suite that asks about a corpus's world needs a model trained on that corpus (one line if not)."""
    from ..data.tasks import embedded

    for item in [t.strip() for t in tasks.split(",")]:
        if item in EMBEDDED_NAMES:
            embedded.check_model_corpus(embedded.version_of(item), model)


def _evaluate_missing(args, plans_in: list[str], plans: list, tasks, backend_args: dict, store) -> list[dict]:
    """Every plan's result: from its checkpoint where `store` has a matching one, else evaluated (one plan at a time,
    the model and tasks loaded once: the hf backend's `load` and `_task_manager` are cached) and checkpointed at once."""
    results = [store.load(i) if store is not None else None for i in range(len(plans))]
    todo = [i for i, r in enumerate(results) if r is None]
    for i, r in enumerate(results):
        if r is not None:
            print(f"plan {plans_in[i]}: reused its checkpoint", flush=True)
    for n, i in enumerate(todo, 1):
        print(f"plan {plans_in[i]}: evaluating ({n}/{len(todo)})", flush=True)
        results[i] = evaluate(args.model, [plans[i]], tasks, backend=args.backend, model_label=args.model_label,
                              calibration=args.calibration, limit=args.limit, batch_size=args.batch_size,
                              num_fewshot=args.num_fewshot, dtype=args.dtype, device=args.device, seed=args.seed,
                              include_path=args.include_path, backend_args=backend_args,
                              perplexity_data=args.perplexity, perplexity_seq_len=args.perplexity_seq_len)[0]
        if store is not None:
            store.save(i, results[i])
    return results


def _tasks_fingerprint(tasks: list[tuple[TaskSpec, str | dict]]) -> list:
    """The resolved tasks with the contents of their local data files (lm-eval task names stand for themselves)."""
    from ..harness.resume import fingerprint

    out = []
    for spec, task in tasks:
        files = (task.get("dataset_kwargs") or {}).get("data_files") if isinstance(task, dict) else None
        files = list(files.values()) if isinstance(files, dict) else [files] if files else []
        out.append({"spec": dataclasses.asdict(spec), "task": task, "data": [fingerprint(f) for f in files]})
    return out


def _checkpoint_key(args, plan_path: str, tasks, backend_args: dict) -> dict:
    """Everything a plan's result depends on (`alloc_moe.harness.resume`): the plan file's bytes, the model's files, the
    tasks and their data, every setting, the code of this command, the environment (versions, commit, hardware,
    threads) and the ALLOC_MOE_/VLLM_/TRITON_/CUDA_ environment variables."""
    import importlib.metadata
    import os

    from ..harness.codehash import code_hash
    from ..harness.provenance import environment
    from ..harness.resume import fingerprint

    settings = {k: getattr(args, k) for k in ("tasks", "include_path", "backend", "limit", "batch_size",
                                              "num_fewshot", "model_label", "calibration", "seed", "dtype",
                                              "device", "threads", "perplexity_seq_len")}
    return {
        "plan": plan_path if plan_path == "original" else fingerprint(plan_path),
        "model": fingerprint(args.model),
        "tasks": _tasks_fingerprint(tasks),
        "settings": settings | {"backend_args": backend_args,
                                "perplexity": args.perplexity and fingerprint(args.perplexity)},
        "code": code_hash(["alloc_moe.stages.accuracy"]),  # with every registered backend (`base.BACKENDS`)
        "environment": environment() | {"lm_eval": importlib.metadata.version("lm_eval")},
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("ALLOC_MOE_", "VLLM_", "TRITON_",
                                                                             "CUDA_"))},
    }
