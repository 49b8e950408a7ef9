import functools
import math
import re
import os
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from snakemake.utils import validate


def _config_error(e):
    """One line for a schema violation: where in the config, what is wrong, what is allowed."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".") or "top level"
    if e.validator == "additionalProperties" and isinstance(e.instance, dict) and "properties" in e.schema:
        unknown = ", ".join(repr(k) for k in e.instance if k not in e.schema["properties"])
        return f"{where}: unknown key {unknown} (allowed: {', '.join(e.schema['properties'])})"
    if e.validator == "oneOf" and all(list(s) == ["required"] for s in e.validator_value):
        return f"{where}: give exactly one of {', '.join(s['required'][0] for s in e.validator_value)}"
    if e.validator in ("oneOf", "anyOf"):
        return f"{where}: {e.instance!r} is not allowed (allowed: {' or '.join(map(_describe, e.validator_value))})"
    return f"{where}: {e.message}"


def _describe(schema):
    """A schema alternative in words: 'all', one of 'a', 'b', an integer >= 1, a string, ..."""
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(map(repr, schema["enum"]))
    words = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "array": "a list", "object": "a mapping", "null": "null"}
    kind = schema.get("type", "a value")
    text = " or ".join(words.get(t, t) for t in kind) if isinstance(kind, list) else words.get(kind, kind)
    bounds = [f"{op} {schema[k]:g}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                                                   ("exclusiveMaximum", "<")) if k in schema]
    return " ".join([text, " and ".join(bounds)]).strip()


def config_fail(msg):
    """A bad config stops the workflow before any job: one line on stderr, exit code 2."""
    print(f"config error: {msg}", file=sys.stderr)
    sys.exit(2)


# A model set to null is left out (a --configfile is merged over config/config.yaml: `embedded: null` drops it).
if isinstance(config.get("models"), dict):
    config["models"] = {k: v for k, v in config["models"].items() if v is not None}
_SCHEMA = Path(workflow.basedir, "workflow/schemas/config.schema.yaml")
_error = best_match(Draft202012Validator(yaml.safe_load(_SCHEMA.read_text())).iter_errors(config))
if _error is not None:
    config_fail(_config_error(_error))
validate(config, "../schemas/config.schema.yaml")  # fills in the schema's defaults

# Backends are the registry's names (adding one is a registry entry, not a schema change).
from alloc_moe.backends.base import BACKENDS

for _where, _name in [*((f"models.{m}.backend", s.get("backend")) for m, s in config["models"].items()),
                      ("latency.backend", config.get("latency", {}).get("backend"))]:
    if _name is not None and _name not in BACKENDS:
        config_fail(f"{_where}: unknown backend {_name!r} (allowed: {', '.join(BACKENDS)})")

# Embedded task suites are versioned (`embedded` = the current version, `embedded-v<n>` one version): a misspelt
# version fails here, not in a job. Other `tasks` values (lm-eval names, task YAML paths) are checked by the eval job.
from alloc_moe.data.tasks import EMBEDDED_NAMES
from alloc_moe.data.synthetic import CORPUS as _CURRENT_CORPUS
from alloc_moe.data.tasks.embedded import REQUIRES_CORPUS, version_of

CORPUS = config.get("corpus", _CURRENT_CORPUS)  # the synthetic corpus of trained models, synthetic calibration and held-out text

for _m, _s in config["models"].items():
    for _t in str(_s.get("tasks", "embedded")).split(","):
        if _t.strip().startswith("embedded") and _t.strip() not in EMBEDDED_NAMES:
            config_fail(f"models.{_m}.tasks: unknown embedded task suite {_t.strip()!r} (allowed: {', '.join(EMBEDDED_NAMES)})")
        if "train" in _s and _t.strip() in EMBEDDED_NAMES:
            _need = REQUIRES_CORPUS.get(version_of(_t.strip()))
            if _need is not None and _need != CORPUS:
                config_fail(f"models.{_m}.tasks: {_t.strip()} asks about corpus {_need}'s world, but corpus is "
                            f"{CORPUS} (set corpus: {_need}, or tasks: embedded-v2 for corpus {CORPUS})")

# Rules call the `alloc-moe` console script; make the one next to this Python first on PATH (a venv that is not
# activated). Under --use-conda the env's own bin comes first. Not an `envvars:` case: nothing is required from the
# user, and cluster jobs must keep their own PATH, so it is only prepended here, for jobs started from this process.
os.environ.update(PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

from alloc_moe.data.text import SOURCES  # hub text sources (wikitext2, c4, pile): the `download` rule fetches them

DOWNLOAD = config.get("download", {})
CAL = config.get("calibration", {})
CAL_DEFAULT = CAL.get("default", "balanced")
CAL_SETS = list(dict.fromkeys([CAL_DEFAULT, *CAL.get("sets", [CAL_DEFAULT])]))
SYNTHETIC_SETS = ("balanced", "language", "structured")
EVAL = config.get("evaluation", {})
PROFILE = config.get("profile", {})
ACC = config.get("accuracy", {})
K_BASE = config.get("k_base", 1)


def code(*entries):
    """Hash of the code behind a job, from the named alloc_moe modules (the one holding the `alloc-moe` subcommand it
    calls, whose `register_cli` parses its arguments) or workflow scripts, each with the alloc_moe modules it imports
    (transitively). Jobs re-run when that code changes, and only then. The `alloc-moe` dispatcher (`cli.py`: the
    list of subcommands and the one-line error handler) is left out, so adding a subcommand re-runs nothing."""
    from alloc_moe.harness.codehash import code_hash

    if not entries:
        raise ValueError("code() needs at least one module or workflow script")
    return code_hash([str(Path(workflow.basedir, e)) if e.endswith(".py") else e for e in entries],
                     package_dir=Path(workflow.basedir, "alloc_moe"))

# A run is one model at one seed: results/<model>-s<seed>/...
RUNS = {f"{name}-s{seed}": (name, seed) for name, spec in config["models"].items() for seed in spec.get("seeds", [0])}


def spec_of(run):
    return config["models"][RUNS[run][0]]


def plan_id(layer, token, kb, calib, budget):
    return f"{layer}__{token}__kb{kb}__{calib}__B{budget:g}"


def _calib_of(layer, token):
    """The calibration set a plan depends on: alloc-l's sensitivity, top-p/naee's routing scores; else none."""
    return CAL_DEFAULT if layer == "alloc-l" or token in ("top-p", "naee") else "none"


def plans_at(run, budget):
    """Every plan id the config asks for at one budget (deduplicated, config order)."""
    n_layers = num_moe_layers(run)
    ids = []
    for m in config["methods"]:
        ids.append(plan_id(m["layer"], m["token"], K_BASE, _calib_of(m["layer"], m["token"]), budget))
    for kb in config.get("k_base_sweep", []):
        if kb <= budget / n_layers + 1e-9:  # a larger K_base cannot be met by the budget (Table 2: n/a)
            ids.append(plan_id("uniform", "alloc-t", kb, "none", budget))
    if config.get("calibration_sweep", False):
        ids += [plan_id("alloc-l", "topk", K_BASE, c, budget) for c in CAL_SETS]
    return list(dict.fromkeys(ids))


def plan_ids(run):
    return [p for b in spec_of(run)["budgets"] for p in plans_at(run, b)]


@functools.cache
def num_moe_layers(run):
    """MoE layers of a run's model, from its config (train/make, a local checkpoint, or `hub_config:`) without
    building it; a hub id without `hub_config:` asks the hub."""
    spec = spec_of(run)
    if "train" in spec or "make" in spec:
        s = spec.get("train") or spec["make"]
        from alloc_moe.data import zoo  # counts from the config's fields: neither torch nor transformers is imported

        if "train" in spec:
            from alloc_moe.data.train_config import TrainConfig

            d = TrainConfig()
            return zoo.num_moe_layers(s.get("arch", d.arch), layers=s.get("layers", d.layers),
                                      width=s.get("width", d.width))
        return zoo.num_moe_layers(s.get("arch"), topology=s.get("topology"), layers=s.get("layers"),
                                  width=s.get("width", "tiny"))
    from transformers import AutoConfig

    source = hub_config_file(spec["hub_config"]) if "hub_config" in spec else model_ref(run)
    try:
        name, revision = split_ref(source)
        cfg = AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        config_fail(f"models.{RUNS[run][0]}: cannot read the model config of {source!r} ({first}); offline, give "
                    "hub_config: a copy of the checkpoint's config.json, or run from a stage (offline.stage_dir)")
    return cfg.num_hidden_layers - getattr(cfg, "first_k_dense_replace", 0)


def hub_config_file(value):
    """`hub_config:` as a file: `alloc_moe/...` names the installed package's copy (the published configs ship as
    `alloc_moe/data/configs/*.json`, so a container or a pip install finds them too), anything else is relative to
    the workflow's folder."""
    if value.startswith("alloc_moe/"):
        import importlib.resources

        return str(importlib.resources.files("alloc_moe").joinpath(value[len("alloc_moe/"):]))
    return str(Path(workflow.basedir, value))


def model_dir(wildcards):
    return model_ref(wildcards.run)


def model_input(wildcards):
    return [] if "path" in spec_of(wildcards.run) else f"results/{wildcards.run}/model"


# --- one GPU: every job that loads a real checkpoint declares gpu=1 (run with --resources gpu=1 to serialise them) ---

def on_gpu(run):
    """A real checkpoint (path:) is loaded with --device auto, i.e. on the GPU where there is one; the embedded and
    zoo models (train:, make:) run on CPU, gpu=0, so `--cores N` runs their jobs side by side."""
    return "path" in spec_of(run)


# Memory and time of the jobs that load a run's model (profiling, routing scores, latency, load balance,
# accuracy): a real checkpoint (path:) the sizes of a GPU node, a trained or zoo model those of a small CPU
# job. They are the rules' own, next to gpu= (gpu_of_run, latency_gpu), so that a cluster profile that names no such
# rule asks a CPU-only partition for nothing it refuses and a GPU partition for enough.
def checkpoint_or(checkpoint, other):
    return lambda wildcards: checkpoint if on_gpu(wildcards.run) else other


def gpu_of_run(wildcards):
    """`resources: gpu=` of a rule that loads the run's model (profile, routing scores, load balance)."""
    return 1 if on_gpu(wildcards.run) else 0


# --- vLLM engine settings (the `vllm:` config key, a model's own `vllm:` over it) ---
VLLM_DEFAULTS = {"mode": "auto", "gpu_memory_utilization": 0.85, "moe_backend": "auto"}


def vllm_args(run):
    """`alloc-moe eval/latency` options of a run's vLLM engines."""
    s = {**VLLM_DEFAULTS, **config.get("vllm", {}), **spec_of(run).get("vllm", {})}
    return (f"--vllm-mode {s['mode']} --gpu-memory-utilization {s['gpu_memory_utilization']:g} "
            f"--moe-backend {s['moe_backend']}")


def calib_file(name):
    """The text file of a calibration set: synthetic sets and hub sources are written by rules, else a local file."""
    if name in SYNTHETIC_SETS:
        return f"results/data/calib_{name}.jsonl"
    if name in SOURCES:
        return f"results/data/{name}_{SOURCES[name].split}.jsonl"  # the `download` rule
    return name


def calib_input(name):
    path = calib_file(name)
    return [path] if path.startswith("results/") or os.path.exists(path) else []


EVAL_TEXT = calib_file(EVAL.get("text", "results/data/heldout.jsonl"))
for _key, _name in [*(("calibration", c) for c in CAL_SETS), ("evaluation.text", EVAL_TEXT)]:
    if not calib_input(_name):
        config_fail(f"{_key}: {_name!r} is not a file; allowed: a synthetic set ({', '.join(SYNTHETIC_SETS)}), "
                    f"a hub source ({', '.join(SOURCES)}), results/data/<source>_<split>.jsonl or an existing file")
for _key, _path in DOWNLOAD.get("local", {}).items():
    if not os.path.isfile(_path):
        config_fail(f"download.local.{_key}: local copy {_path!r} not found")


# --- hub checkpoints at a revision, and offline runs from a stage (`offline: {stage_dir: DIR}`, alloc-moe stage) ---
from alloc_moe.errors import AllocMoeError
from alloc_moe.backends.hf.loading import is_hub_id, split_ref
from alloc_moe.data.stage import check as check_stage, model_needs, offline_env

try:
    model_needs(config)  # a revision belongs to a hub-id path
except AllocMoeError as e:
    config_fail(str(e))

# With a stage, everything the config downloads must be in it, checked here before any job (one line names what is
# not). Then every job started from this process gets the stage's hub and datasets caches with the hub turned off
# (`stage.offline_env`), hub checkpoints load from their staged snapshot folders (`model_ref`), and the `download`
# rule copies the staged text (ALLOC_MOE_STAGE_DIR).
STAGE = None
if config.get("offline", {}).get("stage_dir"):
    try:
        STAGE = check_stage(config, config["offline"]["stage_dir"])
    except AllocMoeError as e:
        config_fail(f"offline.stage_dir: {e}")
    os.environ.update(offline_env(STAGE.root))


def model_ref(run):
    """What a run's jobs pass as --model: the staged snapshot folder (offline.stage_dir), hub id@revision, a local
    directory, or the folder the run's train / make_model rule writes."""
    spec = spec_of(run)
    if "path" not in spec:
        return f"results/{run}/model"
    if STAGE is not None and is_hub_id(spec["path"]):
        return STAGE.model_dir(spec["path"], spec.get("revision"))
    return f"{spec['path']}@{spec['revision']}" if spec.get("revision") else spec["path"]


# --- train / make-model arguments (rules/model.smk) ---

def _train_args(wildcards):
    spec = {**spec_of(wildcards.run)["train"], "corpus": CORPUS}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in spec.items())


def _make_args(wildcards):
    spec = spec_of(wildcards.run)["make"]
    flags = {"arch": "--arch", "topology": "--topology", "layers": "--layers", "width": "--width",
             "router_std": "--router-std"}
    return " ".join(f"{flags[k]} {v}" for k, v in spec.items())


# --- plan inputs (rules/plans.smk) ---

def _plan_inputs(wc):
    # alloc-l needs Algorithm 1 on its calibration set; the data-free methods read layers and K_orig from LExI's
    # cheap profile; top-p / naee calibrate their thresholds on recorded routing scores
    profile = f"ppl_{wc.calib}.csv" if wc.layer == "alloc-l" else "lexi.csv"
    ins = {"sensitivity": f"results/{wc.run}/sensitivity/{profile}"}
    if wc.token in ("top-p", "naee"):
        ins["routing"] = f"results/{wc.run}/routing/{wc.calib}.pt"
    return ins


# --- accuracy (rules/accuracy.smk): one job per run and label (`original`, `B<budget>`) ---

def eval_plans(run, label):
    """Plan ids a (run, label) job evaluates, in config order: ["original"] or every plan at budget B<b>."""
    if label == "original":
        return ["original"]
    budget = float(label[1:])
    budgets = [b for b in spec_of(run)["budgets"] if b == budget]
    if not budgets:
        raise ValueError(f"{run}: no budget {label[1:]} in the config")
    return plans_at(run, budgets[0])


def _eval_plan_files(wc):
    return [f"results/{wc.run}/plans/{p}.json" for p in eval_plans(wc.run, wc.label) if p != "original"]


def _eval_pairs(wc, output):
    """--plan P --out O for every plan of the job (`original` for the unmodified model)."""
    ids = eval_plans(wc.run, wc.label)
    plans = ["original" if p == "original" else f"results/{wc.run}/plans/{p}.json" for p in ids]
    return " ".join(f"--plan {p} --out {output[0]}/{i}.json" for p, i in zip(plans, ids))


def _is_hf(run):
    return spec_of(run).get("backend", "hf") == "hf"  # perplexity needs the HF model (a vLLM engine holds the GPU)


def _eval_text_input(wc):
    return [EVAL_TEXT] if _is_hf(wc.run) and (EVAL_TEXT.startswith("results/") or os.path.exists(EVAL_TEXT)) else []


def embedded_suite(run):
    """The versioned embedded suite a run evaluates (`embedded-v2` for `tasks: embedded`), or None (other tasks).
    Each version is generated in its own folder, results/tasks/<suite>: switching versions re-runs accuracy."""
    from alloc_moe.data.tasks.embedded import suite_name, version_of

    tasks = str(spec_of(run).get("tasks", "embedded"))
    return suite_name(version_of(tasks)) if tasks in EMBEDDED_NAMES else None


def _eval_task_input(wc):
    suite = embedded_suite(wc.run)
    return [f"results/tasks/{suite}"] if suite else []


def _eval_args(wc):
    """Everything of the `alloc-moe eval` command line but the plans: tasks, backend, limit, seed, perplexity."""
    spec = spec_of(wc.run)
    tasks, suite = spec.get("tasks", "embedded"), embedded_suite(wc.run)
    args = [f"--tasks {suite} --include-path results/tasks/{suite}" if suite else f"--tasks {tasks}",
            f"--backend {spec.get('backend', 'hf')}", f"--batch-size {ACC.get('batch_size', 128)}"]
    if ACC.get("limit"):
        args.append(f"--limit {ACC['limit']}")
    args += [f"--seed {RUNS[wc.run][1]}", f"--model-label {RUNS[wc.run][0]}"]
    if _is_hf(wc.run):
        args.append(f"--perplexity {EVAL_TEXT} --perplexity-seq-len {EVAL.get('seq_len', 64)}")
    else:
        args.append(vllm_args(wc.run))
    return " ".join(args)


# --- latency (rules/latency.smk): the top-level `latency:` config key ---
LAT = config.get("latency", {})
LAT_DEVICE = str(LAT.get("device", "cpu"))


def latency_backend(run):
    return LAT.get("backend", spec_of(run).get("backend", "hf"))


def latency_gpu(wildcards):
    """gpu=1 where the latency job can touch the GPU: --device cuda*, or a real checkpoint unless it is measured on
    CPU with the hf backend (vLLM picks its platform itself: the CUDA build takes the GPU whatever --device says)."""
    if LAT_DEVICE.startswith("cuda"):
        return 1
    cpu_only = LAT_DEVICE == "cpu" and latency_backend(wildcards.run) == "hf"
    return 1 if on_gpu(wildcards.run) and not cpu_only else 0


LAT_METHODS = LAT.get("methods", [{"layer": "uniform", "token": "topk"}, {"layer": "lexi", "token": "topk"},
                                  {"layer": "alloc-l", "token": "alloc-t"}])


LAT_TWIN = {"hidden_size": 512, "expert_size": 512, **LAT.get("twin", {})}


def latency_on_twin(run):
    """`latency.model: twin` times the run's latency twin (results/<run>/twin, rule make_twin) instead of its model;
    only for models the workflow builds (train:, make:): a real checkpoint (path:) is always timed itself."""
    return LAT.get("model", "model") == "twin" and "path" not in spec_of(run)


def latency_max_threads(wildcards):
    """`latency.threads` as the latency job's cap on its torch threads (0: `all`, every core the job holds). The
    shell command takes the min with {threads}: a params value must not depend on --cores (a different --cores
    would re-run the job, and `snakemake --report` gives none)."""
    n = LAT.get("threads", "all")
    return 0 if n == "all" else n


def latency_model(wildcards):
    """--model of the latency job: the twin's folder or the run's model (`model_dir`)."""
    return f"results/{wildcards.run}/twin" if latency_on_twin(wildcards.run) else model_dir(wildcards)


def latency_model_input(wildcards):
    return [f"results/{wildcards.run}/twin"] if latency_on_twin(wildcards.run) else model_input(wildcards)


def latency_plans(run):
    ids = [plan_id(m["layer"], m["token"], K_BASE, _calib_of(m["layer"], m["token"]), b)
           for b in spec_of(run)["budgets"] for m in LAT_METHODS]
    return [f"results/{run}/plans/{p}.json" for p in dict.fromkeys(ids)]


# --- load balance (rules/load_balance.smk): the `load_balance:` config key ---
LB = config.get("load_balance", {})


def lb_plans(run):
    ids = LB.get("plans") or plan_ids(run)
    return [f"results/{run}/plans/{p}.json" for p in ids]


def lb_figure_plan(run):
    """The plan the per-plan figures show: `load_balance.figure_plan` (a plan id), else Alloc-MoE at the lowest budget."""
    b = min(spec_of(run)["budgets"])
    plan = LB.get("figure_plan") or plan_id("alloc-l", "alloc-t", K_BASE, CAL_DEFAULT, b)
    return f"results/{run}/plans/{plan}.json"


# --- summary (rules/summary.smk) ---

def all_evals(wildcards=None):
    """The accuracy jobs' folders (rules/accuracy.smk): results/<run>/eval/<label>/, one <plan>.json per plan."""
    return [f"results/{run}/eval/{label}" for run in RUNS
            for label in ["original", *(f"B{b:g}" for b in spec_of(run)["budgets"])]]


def final_targets():
    """What `snakemake` builds (the `all` target): the summary tables and figures, the per-run figures, the manifest and the
    report pages. Perplexity is measured with the hf backend only (a vllm model's accuracy jobs report none)."""
    hf_models = [m for m in MODEL_NAMES if config["models"][m].get("backend", "hf") == "hf"]
    run_figures = ["speedup_vs_budget", "expert_load", "load_balance_by_layer", "plan_allocation", "experts_vs_entropy"]
    return [
        *(f"results/summary/{t}.csv" for t in ["accuracy", "perplexity", "latency", "load_balance", "claims"]),
        *expand("results/summary/figures/{fig}_{model}.png", fig=["fig3", "fig4", "fig6", "tradeoff"],
                model=MODEL_NAMES),
        *expand("results/summary/figures/perplexity_{model}.png", model=hf_models),
        "results/summary/manifest.json",
        *expand("results/{run}/figures/{f}.png", run=RUNS, f=run_figures),
        *expand("results/summary/report/{table}_{model}.html", table=PAPER_TABLES, model=MODEL_NAMES),
        *expand("results/summary/report/{page}.html", page=SUMMARY_TABLES),
    ]


MODEL_NAMES = sorted(config["models"])


# Every run's MoE layer count is read now, before any job: the plan ids of every budget depend on it, and a model
# config that cannot be read (offline without `hub_config:`) stops the workflow with one line, whatever the target.
for _run in RUNS:
    num_moe_layers(_run)
