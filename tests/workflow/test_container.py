"""The CPU image, built and smoke-tested for real by .ci/container-smoke (root, docker.io, debootstrap; minutes).

Opt in with ALLOC_MOE_CONTAINER_TEST=1; otherwise skipped with the reason.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ALLOC_MOE_CONTAINER_TEST") != "1",
                    reason="builds a docker image (minutes, needs root): set ALLOC_MOE_CONTAINER_TEST=1 to run")
def test_cpu_image_builds_offline_and_passes_the_smoke_checks():
    res = subprocess.run([str(ROOT / ".ci/container-smoke")], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "container smoke: OK" in res.stdout
    assert "import alloc_moe" in res.stdout and "snakemake -n jobs: total" in res.stdout


def test_app_stage_has_the_repository_layout_the_workflow_hashes():
    """Cheap, always run: the workflow hashes each job's code from <workflow dir>/alloc_moe (code() in common.smk),
    so the images' /app must hold alloc_moe next to the Snakefile, or every `snakemake` in them fails at parse time."""
    common = (ROOT / "workflow/rules/common.smk").read_text()
    assert 'package_dir=Path(workflow.basedir, "alloc_moe")' in common
    app = (ROOT / "Dockerfile").read_text().split("FROM scratch AS app", 1)[1].split("\nFROM ", 1)[0]
    for path in ("Snakefile", "config", "workflow", "envs", "alloc_moe"):
        assert f"COPY {path} /app/" in app, path


def test_ci_runs_the_container_stage_after_the_readme_command():
    """Cheap, always run: .ci/run ends with .ci/container-run (not behind a switch), which runs CI's reduced default
    in the image as .ci/regress-reference runs it on the host (same target, 1 core, config copied in as
    config/config.yaml), offline, as the image's user, and regresses against results/reference/ci."""
    run = (ROOT / ".ci/run").read_text()
    assert run.index("set -x; $cmd\"") < run.index("\n.ci/container-run\n")
    script = (ROOT / ".ci/container-run").read_text()
    reference = (ROOT / ".ci/regress-reference").read_text()
    assert 'cp config/ci.yaml "$work/config/config.yaml"' in script
    assert 'cp config/ci.yaml "$work/config/config.yaml"' in reference
    assert "results/summary/manifest.json --snakefile" in reference and "--cores 1" in reference
    assert "run_args=(results/summary/manifest.json --snakefile /app/Snakefile --directory /work --cores 1" in script
    assert script.count("--network none") >= 3 and "--user" not in script.replace("--user is not used", "")
    assert "--baseline /work/reference" in script and "cp -r results/reference/ci" in script
    assert "--tolerance /app/config/ci-tolerance.yaml" in script
