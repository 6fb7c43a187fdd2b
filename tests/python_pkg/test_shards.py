"""Array jobs without glue: N processes with a Kubernetes Indexed Job's or
a Slurm array's variables write outputs that together are the unsharded job."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import INTERVAL, assert_same_rows, cli, rows_by_key

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
