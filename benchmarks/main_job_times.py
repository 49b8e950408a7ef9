"""Where a Snakemake run's time went, from its log: per rule the jobs and job-seconds, the long jobs' start and end,
and the run's elapsed time (docs/results/performance.md#main-job-time-and-host-speed).

    python benchmarks/main_job_times.py .snakemake/log/<date>.snakemake.log [--timeline]

Reads the lines Snakemake writes for every job: `[<date>]`, `rule <name>:` or `localrule <name>:`, `jobid: <n>`,
`wildcards: ...` and `Finished jobid: <n>`. Times have whole seconds, as the log has.
"""

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_DATE = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$")
_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")
_FINISHED = re.compile(r"^Finished job(?:id:)? (\d+)")
_ELAPSED = re.compile(r"^Elapsed time: (.*)$")


@dataclass
class Job:
    rule: str
    wildcards: str
    start: datetime
    end: datetime | None = None

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


def parse(text: str) -> tuple[list[Job], str | None]:
    """The finished jobs of a Snakemake log in order of finishing, and its "Elapsed time" (None if it has none)."""
    now = rule = last = elapsed = None
    started: dict[str, Job] = {}
    done: list[Job] = []
    for line in text.splitlines():
        if m := _DATE.match(line):
            now = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := _RULE.match(line):
            rule = m.group(1)
        elif (m := _JOBID.match(line)) and rule and now:
            last = started[m.group(1)] = Job(rule, "", now)
            rule = None
        elif (m := _WILDCARDS.match(line)) and last is not None and not last.wildcards:
            last.wildcards = m.group(1)
        elif (m := _FINISHED.match(line)) and m.group(1) in started:
            job = started.pop(m.group(1))
            job.end = now
            done.append(job)
        elif m := _ELAPSED.match(line):
            elapsed = m.group(1)
    return done, elapsed


def per_rule(jobs: list[Job]) -> list[tuple[str, int, float]]:
    """(rule, jobs, job-seconds), most job-seconds first."""
    secs, count = defaultdict(float), defaultdict(int)
    for j in jobs:
        secs[j.rule] += j.seconds
        count[j.rule] += 1
    return sorted(((r, count[r], s) for r, s in secs.items()), key=lambda x: (-x[2], x[0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="a Snakemake log (.snakemake/log/*.snakemake.log, or the run's captured output)")
    ap.add_argument("--timeline", action="store_true", help="also list every job of 5 s or more, by start")
    args = ap.parse_args(argv)
    try:
        jobs, elapsed = parse(Path(args.log).read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        print(f"error: cannot read {args.log}: {e.strerror}", file=sys.stderr)
        return 2
    if not jobs:
        print(f"error: {args.log} has no finished Snakemake jobs (is it a Snakemake log?)", file=sys.stderr)
        return 2
    print("| rule | jobs | job-seconds |\n|---|---:|---:|")
    for rule, n, s in per_rule(jobs):
        print(f"| {rule} | {n} | {s:.0f} |")
    print(f"\n{len(jobs)} jobs, {sum(j.seconds for j in jobs):.0f} job-seconds; elapsed {elapsed or 'not in the log'}")
    if args.timeline:
        print("\n| rule | wildcards | start | end | seconds |\n|---|---|---|---|---:|")
        for j in sorted((j for j in jobs if j.seconds >= 5), key=lambda j: j.start):
            print(f"| {j.rule} | {j.wildcards} | {j.start:%H:%M:%S} | {j.end:%H:%M:%S} | {j.seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
