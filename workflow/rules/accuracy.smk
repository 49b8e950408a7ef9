# Accuracy (lm-eval) and perplexity per family for every plan: one job per (run, budget), plus one for the original
# model, evaluating all of that budget's plans in one process (the model and the tasks load once). Each finished plan
# is checkpointed in results/<run>/eval/.partial-<label>/ (not a declared output, so Snakemake keeps it when it
# deletes a killed job's outputs; removed once the job's outputs are written): the rerun evaluates only the plans
# that had not finished (alloc_moe/harness/resume.py).


def _tasks_args(run):
    spec = spec_of(run)
    tasks = spec.get("tasks", "embedded")
    if tasks == "embedded":
        return ["results/tasks/embedded"], "--tasks embedded --include-path results/tasks/embedded"
    return [], f"--tasks {tasks}"


def _eval_rule(run, label, plan_files, outs):
    task_inputs, task_args = _tasks_args(run)
    spec = spec_of(run)
    model = model_ref(run)  # a staged snapshot folder, hub id@revision, a local or a trained model
    pairs = " ".join(f"--plan {p} --out {o}" for p, o in zip(plan_files, outs))
    limit = f"--limit {ACC['limit']}" if ACC.get("limit") else ""
    hf = spec.get("backend", "hf") == "hf"  # perplexity needs the HF model (a vLLM engine holds the GPU)
    text_inputs = [EVAL_TEXT] if hf and (EVAL_TEXT.startswith("results/") or os.path.exists(EVAL_TEXT)) else []
    ppl = f"--perplexity {EVAL_TEXT} --perplexity-seq-len {EVAL.get('seq_len', 64)} " if hf else ""
    vllm = "" if hf else f"{vllm_args(run)} "

    rule:
        name:
            re.sub(r"\W", "_", f"accuracy_{run}_{label}")
        input:
            plans=[p for p in plan_files if p != "original"],
            model=[] if "path" in spec else [model],
            tasks=task_inputs,
            text=text_inputs,
        output:
            outs,
        params:
            code=code("alloc_moe.stages.accuracy"),
        threads: 1
        resources:  # a real checkpoint (path:) evaluates on a GPU; the embedded model on CPU
            gpu=1 if "path" in spec else 0,
            mem_mb=64000 if "path" in spec else 4000,
            runtime=360 if "path" in spec else 30,
        log:
            f"results/{run}/logs/accuracy_{label}.log",
        conda:
            "../../envs/alloc-moe.yaml"
        shell:
            f"alloc-moe eval --model {model} {pairs} {task_args} --backend {spec.get('backend', 'hf')} "
            f"--batch-size {ACC.get('batch_size', 128)} {limit} --seed {RUNS[run][1]} --model-label {RUNS[run][0]} "
            f"{ppl}{vllm}--resume-dir results/{run}/eval/.partial-{label} --threads {{threads}} > {{log}} 2>&1"


for _run in RUNS:
    _eval_rule(_run, "original", ["original"], [f"results/{_run}/eval/original.json"])
    for _b in spec_of(_run)["budgets"]:
        _ids = plans_at(_run, _b)
        _eval_rule(_run, f"B{_b:g}", [f"results/{_run}/plans/{p}.json" for p in _ids],
                   [f"results/{_run}/eval/{p}.json" for p in _ids])
