"""Array jobs without glue: N processes with a Kubernetes Indexed Job's or
a Slurm array's variables write outputs that together are the unsharded job."""

from __future__ import annotations

import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BIN, INTERVAL, ROOT, assert_same_rows, cli, rows_by_key

CLEAN = {"JOB_COMPLETION_INDEX": "", "SLURM_ARRAY_TASK_ID": "", "MMEMBED_SHARD_COUNT": ""}


def run_shards(media, out_dir, envs):
    pattern = str(out_dir / "part-{shard}-of-{shards}.parquet")
    for env in envs:
        done = cli(
            "batch", str(media), "-o", pattern, "--shard", "auto", "--model", "demo",
            "--interval", str(INTERVAL), env={**CLEAN, **env}, check=False,
        )
        assert done.returncode in (0, 1), done.stderr
    parts = sorted(out_dir.glob("part-*.parquet"))
    return parts, pa.concat_tables([pq.read_table(p) for p in parts])


def test_kubernetes_indexed_job(media, cli_rows, tmp_path):
    envs = [{"JOB_COMPLETION_INDEX": str(i), "MMEMBED_SHARD_COUNT": "3"} for i in range(3)]
    parts, table = run_shards(media, tmp_path, envs)
    assert [p.name for p in parts] == [f"part-{i}-of-3.parquet" for i in range(3)]
    assert_same_rows(rows_by_key(table), cli_rows)


def test_slurm_array_counted_from_its_minimum(media, cli_rows, tmp_path):
    envs = [
        {"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
        for i in (1, 2)
    ]
    parts, table = run_shards(media, tmp_path, envs)
    assert len(parts) == 2
    assert_same_rows(rows_by_key(table), cli_rows)


def test_auto_without_an_array_job_is_a_clear_error(media, tmp_path):
    done = cli(
        "batch", str(media), "-o", str(tmp_path / "x.parquet"), "--shard", "auto",
        env=CLEAN, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "JOB_COMPLETION_INDEX" in done.stderr and "SLURM_ARRAY_TASK_ID" in done.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_the_slurm_script_runs_as_an_array(media, cli_rows, tmp_path):
    script = ROOT / "deploy/slurm/embed-array.sh"
    for i in (0, 1):
        env = {
            **os.environ, **CLEAN,
            "PATH": f"{BIN.parent}{os.pathsep}{os.environ['PATH']}",
            "INPUT": str(media),
            "OUTPUT": str(tmp_path / "part-{shard}-of-{shards}.parquet"),
            "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "2",
            "MMEMBED_MODEL": "demo", "MMEMBED_DEVICE": "cpu", "MMEMBED_BATCH_SIZE": "8",
            "MMEMBED_VIDEO_INTERVAL": str(INTERVAL), "HF_HUB_OFFLINE": "1",
        }
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert done.returncode in (0, 1), done.stderr
    parts = sorted(tmp_path.glob("part-*-of-2.parquet"))
    assert len(parts) == 2
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert_same_rows(rows_by_key(table), cli_rows)


def test_the_kubernetes_manifest_is_an_indexed_job_whose_command_runs(media, cli_rows, tmp_path):
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((ROOT / "deploy/k8s/indexed-job.yaml").read_text())
    spec = job["spec"]
    assert job["kind"] == "Job" and spec["completionMode"] == "Indexed"
    assert "backoffLimitPerIndex" in spec
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["MMEMBED_SHARD_COUNT"]) == spec["completions"]
    # The container's command, on local media instead of the bucket.
    cmd = container["command"]
    assert cmd[:2] == ["mmembed", "batch"]
    args = [str(media) if a.startswith("gs://my-bucket/photos") else a for a in cmd[1:]]
    args = [str(tmp_path / a.rsplit("/", 1)[1]) if a.startswith("gs://") else a for a in args]
    for i in range(spec["completions"]):
        done = cli(
            *args, "--interval", str(INTERVAL),
            env={**CLEAN, **env, "JOB_COMPLETION_INDEX": str(i), "MMEMBED_MODEL": "demo",
                 "MMEMBED_DEVICE": "cpu", "MMEMBED_BATCH_SIZE": "8"},
            check=False,
        )
        assert done.returncode in (0, 1), done.stderr
    parts = sorted(tmp_path.glob("part-*-of-*.parquet"))
    assert len(parts) == spec["completions"]
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    assert_same_rows(rows_by_key(table), cli_rows)
