"""Ray Data adapter: embed media in a pool of actors, each loading the model once.

::

    import ray
    from mmembed.ray import RayEmbedder

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    rows = ds.map_batches(
        RayEmbedder,
        fn_constructor_kwargs={"spec": "local:openai/clip-vit-base-patch32?device=cuda"},
        batch_format="pyarrow",
        batch_size=1024,
        # Two batches per actor at once: its model runs one while the next
        # is decoded (the calls release the GIL; the model thread takes them
        # in turn), instead of the GPU waiting for each batch's decoding.
        compute=ray.data.ActorPoolStrategy(
            size=4, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
        ),
        num_gpus=1,
    )
    rows.write_parquet("s3://bucket/embeddings/")

The rows are those of ``mmembed batch`` (``uri``, ``embedding``, ``status``,
``video_start_sec``/``video_end_sec`` per segment, ``model``, ``space``, …);
a broken file gives a row with its ``status`` and never fails the batch, so
a rerun can pick out exactly the rows to redo (open-source Ray has no
job-level resume). ``read_binary_files`` names objects without their
scheme (``bucket/key``), so ``uri`` holds that name for bucket inputs.
"""

from __future__ import annotations

import pyarrow as pa

from . import Embedder


class RayEmbedder:
    """A callable class for ``Dataset.map_batches(..., batch_format="pyarrow")``.

    The batch needs ``path`` or ``uri`` (strings) and may have ``bytes``
    (``read_binary_files(include_paths=True)`` gives both); other columns
    are carried through. Video rows are split into segments, so a batch may
    come back with more rows than it had.
    """

    def __init__(
        self,
        spec: str = "local:demo",
        *,
        start_sec: int | None = None,
        end_sec: int | None = None,
        interval_sec: int | None = None,
        dimension: int | None = None,
    ) -> None:
        self.embedder = Embedder(spec)
        self.options = dict(
            start_sec=start_sec, end_sec=end_sec, interval_sec=interval_sec, dimension=dimension
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.embedder.embed_arrow(batch, **self.options)
        return out if isinstance(out, pa.Table) else pa.Table.from_batches([out])
