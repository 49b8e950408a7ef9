"""config/paper.yaml and config/smoke.yaml: `snakemake -n --configfile config/X.yaml` resolves the whole DAG with no
hub access (the MoE layer counts come from `hub_config:`), with the job counts per rule that the paper's design
gives; bad configs stop before any job with one line.

Like `snakemake --configfile config/paper.yaml` in the repository, every dry run here merges the file over the
embedded default config/config.yaml."""

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, dry_run_jobs, snakemake_over_default

# the hub text files the `download` rule writes: each calibration source's default split, and the evaluation text
SPLITS = {"wikitext2": "test", "c4": "validation", "pile": "validation"}


def _moe_layers(spec: dict) -> int:
    cfg = json.loads((ROOT / spec["hub_config"]).read_text())
    return cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)


def _expected(cfg: dict) -> tuple[dict[str, int], set[str]]:
    """Jobs per rule and the download outputs, computed from the config by the paper's rules: every method at every
    budget; Table 2's K_base sweep under Uniform + Alloc-T where K_base <= B / L; Table 3's Alloc-L per calibration
    set; Fig. 5's latency methods; a plan that needs data (Alloc-L, top-p, NAEE) uses the default calibration set."""
    models = {k: v for k, v in cfg["models"].items() if v is not None}
    cal, kb = cfg["calibration"], cfg["k_base"]

    def pid(layer, token, k, budget):
        data = layer == "alloc-l" or token in ("top-p", "naee")
        return layer, token, k, cal["default"] if data else "none", budget

    plans = set()
    for name, spec in models.items():
        n_layers = _moe_layers(spec)
        for b in spec["budgets"]:
            plans |= {(name, *pid(m["layer"], m["token"], kb, b)) for m in cfg["methods"] + cfg["latency"]["methods"]}
            plans |= {(name, "uniform", "alloc-t", k, "none", b) for k in cfg["k_base_sweep"] if k * n_layers <= b}
            if cfg["calibration_sweep"]:
                plans |= {(name, "alloc-l", "topk", kb, c, b) for c in cal["sets"]}
    ppl_sets = {p[4] for p in plans if p[1] == "alloc-l"}
    routing_sets = {p[4] for p in plans if p[2] in ("top-p", "naee")}
    text = {f"results/data/{s}_{SPLITS[s]}.jsonl" for s in ppl_sets | routing_sets} | {cfg["evaluation"]["text"]}
    jobs = {"plan": len(plans), "profile_ppl": len(models) * len(ppl_sets), "profile_lexi": len(models),
            "routing_scores": len(models) * len(routing_sets), "download": len(text), "latency": len(models),
            "load_balance": len(models)}
    jobs["accuracy"] = sum(1 + len(spec["budgets"]) for spec in models.values())  # original + one per budget
    return jobs, text


@pytest.fixture(scope="module")
def paper_log(tmp_path_factory):
    """The dry run of config/paper.yaml as the README runs it on one GPU (`--resources gpu=1`), with shell commands."""
    res = snakemake_over_default(tmp_path_factory.mktemp("paper"), [ROOT / "config/paper.yaml"], "-n", "--resources", "gpu=1",
                     "--printshellcmds")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def paper(paper_log):
    return dry_run_jobs(paper_log)


@pytest.mark.parametrize("name", ["paper", "smoke"])
def test_dry_run_resolves_offline_with_the_jobs_the_config_asks_for(name, paper, tmp_path):
    cfg = yaml.safe_load((ROOT / f"config/{name}.yaml").read_text())
    if name == "paper":
        counts, outputs = paper
    else:
        res = snakemake_over_default(tmp_path, [ROOT / f"config/{name}.yaml"])
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        counts, outputs = dry_run_jobs(res.stdout + res.stderr)
    jobs, texts = _expected(cfg)
    assert {r: counts[r] for r in jobs} == jobs
    # the embedded default it is merged over is gone: nothing trains, no synthetic data or tasks
    assert not {"train", "make_model", "calibration_set", "heldout_text", "embedded_tasks"} & set(counts)
    assert set(outputs["download"]) == texts | {t.replace(".jsonl", ".meta.json") for t in texts}


def test_paper_plan_count_is_the_papers_design(paper):
    """Per budget: 9 methods, K_base 0..floor(B/L) other than the default 1 (Table 2), Alloc-L on C4 and Pile
    (Table 3). DeepSeek (L=26) 13+14+15+16, Qwen (L=24) 13+13+14+14, OLMoE (L=16) 15+16+17+18."""
    counts, outputs = paper
    assert counts["plan"] == 58 + 54 + 66
    assert counts["profile_ppl"] == 3 * 3 and counts["download"] == 4
    ds = [p for p in outputs["plan"] if p.startswith("results/deepseek-v2-lite-s0/")]
    assert "results/deepseek-v2-lite-s0/plans/uniform__alloc-t__kb5__none__B130.json" in ds  # K_base = K_orig - 1
    assert not [p for p in ds if "__kb6__" in p]  # 6 x 26 > 130: n/a
    assert "results/deepseek-v2-lite-s0/plans/alloc-l__alloc-t__kb1__wikitext2__B78.json" in ds  # Alloc-MoE
    assert "results/olmoe-1b-7b-0924-s0/plans/uniform__alloc-t__kb7__none__B112.json" in outputs["plan"]


def _job_listing(log: str) -> list[dict]:
    """Every job of a dry run's listing (with --printshellcmds): rule, resources {name: value}, shell command."""
    jobs = []
    for line in log.splitlines():
        if m := re.match(r"^(?:local)?rule (\S+):$", line):
            jobs.append({"rule": m.group(1), "resources": None, "shell": None})
        elif jobs and (m := re.match(r"^\s+resources: (.*)$", line)):
            jobs[-1]["resources"] = dict(kv.split("=", 1) for kv in m.group(1).split(", "))
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs


# alloc-moe subcommands that never load model weights (`plan --model` is a label recorded in the plan)
NO_WEIGHTS = {"plan", "make-corpus", "make-tasks", "download", "make-model", "train"}


def _loads_model_on_gpu(shell: str | None) -> bool:
    """Whether a job's command can put a model on the GPU, read from the command alone (not from the rule): an
    `alloc-moe` subcommand that loads weights with --device cuda*, or with a real checkpoint (not one the workflow
    builds under results/) unless it runs on CPU through transformers (--device cpu, backend hf); vLLM picks the GPU
    itself. A `script:` rule has no shell command: none loads a model today."""
    if not shell:
        return False
    argv = shlex.split(shell.split(" > ")[0])
    if argv[0] != "alloc-moe" or argv[1] in NO_WEIGHTS:
        return False
    opts = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
    device, model = opts.get("--device", "auto"), opts.get("--model")
    if device.startswith("cuda"):
        return True
    real = model is not None and not model.startswith("results/")
    return real and not (device == "cpu" and opts.get("--backend", "hf") == "hf")


def test_every_job_that_loads_a_model_on_the_gpu_requests_it(paper_log):
    """Under `--resources gpu=1` two jobs that each request gpu=1 never overlap: so every job that can load a model
    on the GPU must request it (else it runs beside a vLLM engine that wants 85% of the memory); jobs that cannot
    request none, so they run side by side."""
    jobs = _job_listing(paper_log)
    assert len(jobs) == sum(dry_run_jobs(paper_log)[0].values()) and all(j["resources"] is not None for j in jobs)
    wrong = [(j["rule"], j["resources"].get("gpu"), (j["shell"] or "")[:120]) for j in jobs
             if j["resources"].get("gpu", "0") != ("1" if _loads_model_on_gpu(j["shell"]) else "0")]
    assert not wrong, wrong
    on_gpu = Counter(j["rule"] for j in jobs if j["resources"].get("gpu") == "1")
    # 3 models: profiles (3 calibration sets + LExI), routing scores (wikitext2), load balance, latency, 5 accuracy
    assert on_gpu == {"profile_ppl": 9, "profile_lexi": 3, "routing_scores": 3, "load_balance": 3, "latency": 3,
                      "accuracy": 15}


def test_embedded_default_requests_no_gpu(tmp_path):
    """The embedded default (CPU) requests no GPU anywhere: `--cores 2` runs its jobs side by side."""
    res = snakemake_over_default(tmp_path, [ROOT / "config/config.yaml"], "-n", "--printshellcmds")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = _job_listing(res.stdout + res.stderr)
    assert jobs and all(j["resources"] is not None and j["resources"].get("gpu", "0") == "0" for j in jobs)
    assert not any(_loads_model_on_gpu(j["shell"]) for j in jobs)
    assert any(j["rule"] == "profile_lexi" for j in jobs)


@pytest.mark.parametrize("corpus", ["v1", "v3"])
def test_corpus_reaches_training_calibration_and_heldout_text(corpus, tmp_path):
    """`corpus:` decides the text of every job that draws the synthetic corpus: the training stream, each synthetic
    calibration set and the held-out text (v1 with the suite that runs on it, v3 the default)."""
    (tmp_path / "over.yaml").write_text("corpus: v1\nmodels: {embedded: {tasks: embedded-v2}}\n" if corpus == "v1" else "{}\n")
    res = snakemake_over_default(tmp_path / "work", [tmp_path / "over.yaml"], "-n", "--printshellcmds")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cmds = {}
    for j in _job_listing(res.stdout):
        cmds.setdefault(j["rule"], []).append(j["shell"])
    drawn = cmds["train"] + cmds["calibration_set"] + cmds["heldout_text"]
    assert len(cmds["calibration_set"]) == 3 and len(cmds["train"]) == len(cmds["heldout_text"]) == 1
    assert all(f" --corpus {corpus} " in c for c in drawn), drawn


def test_vllm_settings_reach_eval_and_latency_with_model_overrides(tmp_path):
    """The `vllm:` config key (smoke.yaml: graphs, 0.85 of the GPU memory, Triton MoE) reaches every vLLM eval and
    latency job as CLI options, a model's own `vllm:` over it key by key; accuracy jobs checkpoint per plan."""
    (tmp_path / "over.yaml").write_text("vllm: {mode: eager}\n"
                                        "models: {olmoe-1b-7b-0924: {vllm: {gpu_memory_utilization: 0.5}}}\n")
    res = snakemake_over_default(tmp_path / "work", [ROOT / "config/smoke.yaml", tmp_path / "over.yaml"], "-n", "--printshellcmds")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cmds = [j["shell"] for j in _job_listing(res.stdout) if j["rule"] in ("latency", "accuracy")]
    assert len(cmds) == 3 * 2 + 3
    for cmd in cmds:
        share = "0.5" if "--model allenai/OLMoE-1B-7B-0924" in cmd else "0.85"
        assert f" --vllm-mode eager --gpu-memory-utilization {share} --moe-backend triton " in cmd, cmd
        assert (" --resume-dir results/" in cmd) == cmd.startswith("alloc-moe eval"), cmd


BAD = {
    "unknown key": ("models: {deepseek-v2-lite: {budget: [52]}}",
                    "models.deepseek-v2-lite: unknown key 'budget' (allowed: path, hub_config, train, make, seeds, "),
    "budget <= 0": ("models: {qwen1.5-moe-a2.7b: {budgets: [48, 0]}}",
                    "models.qwen1.5-moe-a2.7b.budgets[1]: 0 is less than or equal to the minimum of 0"),
    "unknown method": ("methods: [{layer: uniform, token: topk}, {layer: alloc-t, token: topk}]",
                       "methods[1].layer: 'alloc-t' is not one of ['alloc-l', 'uniform', "),
    "unknown backend": ("models: {olmoe-1b-7b-0924: {backend: sglang}}",
                        "models.olmoe-1b-7b-0924.backend: unknown backend 'sglang' (allowed: hf, vllm)"),
    "unknown top-level key": ("calibration_sets: [c4]", "top level: unknown key 'calibration_sets' (allowed: models, "),
    "two model sources": ("models: {olmoe-1b-7b-0924: {make: {topology: olmoe-1b-7b-0924}}}",
                          "models.olmoe-1b-7b-0924: give exactly one of path, train, make"),
    "unknown calibration set": ("calibration: {sets: [wikitext2, wikitext103]}",
                                "calibration: 'wikitext103' is not a file; allowed: a synthetic set "),
    "missing local copy": ("download: {local: {c4_validation: /nowhere/c4.json.gz}}",
                           "download.local.c4_validation: local copy '/nowhere/c4.json.gz' not found"),
    "gpu memory share > 1": ("vllm: {gpu_memory_utilization: 1.5}",
                             "vllm.gpu_memory_utilization: 1.5 is greater than the maximum of 1"),
    "unknown vllm mode": ("models: {olmoe-1b-7b-0924: {vllm: {mode: fast}}}",
                          "models.olmoe-1b-7b-0924.vllm.mode: 'fast' is not one of ['auto', 'graphs', 'eager']"),
    "latency threads": ("latency: {threads: many}",
                        "latency.threads: 'many' is not allowed (allowed: an integer >= 1 or 'all')"),
    "unknown embedded suite": ("models: {olmoe-1b-7b-0924: {tasks: embedded-v9}}",
                               "models.olmoe-1b-7b-0924.tasks: unknown embedded task suite 'embedded-v9' (allowed: "
                               "embedded, embedded-v1, embedded-v2, embedded-v3, embedded-v4)"),
    "suite v3 on corpus v1": ("corpus: v1\nmodels: {embedded: {train: {arch: olmoe}, budgets: [12], tasks: embedded-v3}}",
                              "models.embedded.tasks: embedded-v3 asks about corpus v2's world, but corpus is v1 (set "
                              "corpus: v2, or tasks: embedded-v2 for corpus v1)"),
    "suite v4 on corpus v2": ("corpus: v2\nmodels: {embedded: {train: {arch: olmoe}, budgets: [12], tasks: embedded}}",
                              "models.embedded.tasks: embedded asks about corpus v3's world, but corpus is v2 (set "
                              "corpus: v3, or tasks: embedded-v2 for corpus v2)"),
    "suite v3 on corpus v3": ("models: {embedded: {train: {arch: olmoe}, budgets: [12], tasks: embedded-v3}}",
                              "models.embedded.tasks: embedded-v3 asks about corpus v2's world, but corpus is v3 (set "
                              "corpus: v2, or tasks: embedded-v2 for corpus v3)"),
    "unknown corpus": ("corpus: v9", "corpus: 'v9' is not one of ['v1', 'v2', 'v3']"),
    "hub id, no hub_config": ("models: {extra: {path: org/not-here, budgets: [8]}}",
                              "models.extra: cannot read the model config of 'org/not-here' ("),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_stops_before_any_job_with_one_line(case, tmp_path):
    override, message = BAD[case]
    (tmp_path / "bad.yaml").write_text(override + "\n")
    res = snakemake_over_default(tmp_path / "work", [ROOT / "config/paper.yaml", tmp_path / "bad.yaml"])
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if not x.startswith("Config file config/config.yaml is extended")]
    assert len(lines) == 1 and lines[0].startswith(f"config error: {message}"), res.stderr
    assert "rule " not in res.stdout and not (tmp_path / "work/results").exists()


@pytest.mark.workflow
def test_download_rule_reads_a_local_copy_and_fails_offline_naming_the_key(tmp_path):
    """The `download` jobs for real, offline: a split given under download.local is converted; one that is not
    fails with the line that names the key, and leaves no output."""
    rows = ["first row", "", "second row"]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (tmp_path / "local.yaml").write_text(f"download: {{local: {{wikitext2_test: {tmp_path / 'test.jsonl'}}}}}\n")
    work, configs = tmp_path / "work", [ROOT / "config/smoke.yaml", tmp_path / "local.yaml"]
    hf = str(tmp_path / "hf")
    res = snakemake_over_default(work, configs, "--cores", "1", "--", "results/data/wikitext2_test.jsonl", HF_HOME=hf)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = [json.loads(line) for line in (work / "results/data/wikitext2_test.jsonl").read_text().splitlines()]
    assert got == [{"family": "wikitext2", "text": r} for r in rows]
    meta = json.loads((work / "results/data/wikitext2_test.meta.json").read_text())
    assert meta["local_file"] == str(tmp_path / "test.jsonl") and meta["max_chars"] == 1000000

    res = snakemake_over_default(work, configs, "--cores", "1", "--", "results/data/c4_validation.jsonl", HF_HOME=hf)
    assert res.returncode != 0
    log = (work / "results/logs/download_c4_validation.log").read_text()
    assert log.count("\n") == 1 and "under the config key download.local.c4_validation " in log, log
    assert not list((work / "results/data").glob("c4_validation*"))


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "qwen1.5-moe-a2.7b", "olmoe-1b-7b-0924"])
def test_workflow_model_configs_are_the_zoos(name):
    """The paper config's `hub_config: alloc_moe/data/configs/<name>.json` names the package's own copy (one file,
    found inside an installed package too: the container has no alloc_moe/ source folder)."""
    import importlib.resources

    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    assert cfg["models"][name]["hub_config"] == f"alloc_moe/data/configs/{name}.json"
    assert (importlib.resources.files("alloc_moe") / "data" / "configs" / f"{name}.json").is_file()


@pytest.mark.parametrize("configfile", [None, "config/paper.yaml"])
def test_snakemake_lint_is_clean(configfile):
    """`snakemake --lint` finds nothing to complain about, for the embedded default and the paper config."""
    snakemake = Path(sys.executable).with_name("snakemake")
    if not snakemake.exists():
        pytest.skip("snakemake is not installed (pip install -e '.[workflow]')")
    extra = ["--configfile", configfile] if configfile else []
    res = subprocess.run([str(snakemake), "--lint", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0 and "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr, (
        res.stdout[-3000:] + res.stderr[-3000:])
