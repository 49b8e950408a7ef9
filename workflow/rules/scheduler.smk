# Local runs: no job-submission rate limit, so Snakemake's scheduler wakes only when a job finishes.
#
# Snakemake 9 (snakemake/scheduling/job_scheduler.py, `JobScheduler.schedule`) ends every scheduling pass that leaves
# ready jobs waiting with `_schedule_reevalutation`: a 1-s `threading.Timer` that starts another pass, which arms
# another timer. So each job event while jobs wait adds a self-renewing chain. The limiter behind it exists whenever
# `--max-jobs-per-timespan` is set, and the CLI's default is 100/1s. In the embedded default's main job the process
# held 60-70 threads and used 13-15% of a core (84 s of CPU in 17 min) while the accuracy and latency jobs it waited on
# needed both cores. A rate limit protects a cluster's or cloud's submission queue; a local run submits nothing, so
# its limiter is dropped here (then a pass runs on each job event only). Cluster and cloud executors keep theirs.
# `onstart` runs after the scheduler is built and before its first pass; `--no-hooks` skips it (timers as before).


onstart:
    if workflow.local_exec and getattr(workflow, "scheduler", None) is not None:
        workflow.scheduler.job_rate_limiter = None
