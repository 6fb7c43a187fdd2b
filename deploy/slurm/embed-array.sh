#!/usr/bin/env bash
# A Slurm job array: 8 tasks, each embedding its slice of the input and
# writing its own output. `--shard auto` reads the task's index from
# SLURM_ARRAY_TASK_ID (counted from SLURM_ARRAY_TASK_MIN, so --array=1-8
# works too) and the number of slices from SLURM_ARRAY_TASK_COUNT.
#
#   sbatch deploy/slurm/embed-array.sh
#   # after a failure: rerun the same array; --resume redoes only what is
#   # missing or failed in each task's output.
#
#SBATCH --job-name=mmembed
#SBATCH --array=0-7
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --output=logs/mmembed-%A_%a.out
set -euo pipefail

INPUT=${INPUT:-/data/media}                    # a folder, glob, manifest or bucket prefix
DEFAULT_OUTPUT='/data/embeddings/part-{shard}-of-{shards}.parquet'
OUTPUT=${OUTPUT:-$DEFAULT_OUTPUT}

exec mmembed batch "$INPUT" --output "$OUTPUT" --shard auto --resume \
  --model "${MMEMBED_MODEL:-openai/clip-vit-base-patch32}" \
  --device "${MMEMBED_DEVICE:-cuda}" --batch-size "${MMEMBED_BATCH_SIZE:-256}"
