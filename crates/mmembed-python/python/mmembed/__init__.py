"""mmembed: multimodal (text, image, video) embeddings from Python.

The same backends and spec strings as the ``mmembed`` command::

    import mmembed
    e = mmembed.Embedder("local:demo")
    r = e.embed_texts(["a red star", "a blue square"])
    r.embeddings.shape      # (2, 64), float32, L2-normalised
    r.status                # ["", ""]: a failed item has its error here

Media rows exactly as ``mmembed batch`` makes them (one per image, one per
video segment, a status per row) come from :meth:`Embedder.embed_arrow`;
:mod:`mmembed.ray` and :mod:`mmembed.daft` wrap it for Ray Data and Daft.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from . import _native
from ._native import (
    EmbedResult,
    InvalidInputError,
    MmembedError,
    embedding_dtype,
    tune_malloc_for_inference,
)

__version__ = _native.__version__
__all__ = [
    "Embedder",
    "EmbedResult",
    "MmembedError",
    "InvalidInputError",
    "embedding_dtype",
    "tune_malloc_for_inference",
    "__version__",
]


_malloc_tuned = False


def _tune_malloc_once() -> None:
    # What the ``mmembed`` command does at start: without it glibc unmaps
    # each layer's large activation blocks and faults them back in on the
    # next layer (measured 3-10 % of a CPU batch). Process-wide, so it can be
    # turned off with MMEMBED_TUNE_MALLOC=0.
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get("MMEMBED_TUNE_MALLOC", "1").strip().lower() not in ("0", "false", "no", "off"):
        tune_malloc_for_inference()


class Embedder(_native.Embedder):
    """An embedding backend built from a spec string (or a ``.toml`` file).

    ``"local:demo"``, ``"local:/path/to/checkpoint?device=cuda&precision=f16"``,
    ``"vertex:my-project/us-central1"``, ``"fallback(local:demo, vertex:my-project)"``.
    Loading a local model happens here, once; calls release the GIL while
    the model runs. An embedder pickles as its spec (the receiving process
    loads its own model); one built before a ``fork`` refuses calls in the
    child with a clear error instead of hanging.

    The first embedder built in a process sets glibc's allocator for
    inference (:func:`tune_malloc_for_inference`, as the ``mmembed`` command
    does); ``MMEMBED_TUNE_MALLOC=0`` leaves the allocator alone.
    """

    def __new__(cls, spec: str):
        _tune_malloc_once()
        return super().__new__(cls, spec)

    def __reduce__(self):
        # Pickled as its spec: the receiving process loads the model itself
        # (how Ray and multiprocessing ship an embedder to workers).
        return (type(self), (self.spec,))

    def embed_arrow(
        self,
        data: Any,
        *,
        start_sec: int | None = None,
        end_sec: int | None = None,
        interval_sec: int | None = None,
        dimension: int | None = None,
    ) -> pa.Table | pa.RecordBatch:
        """Rows of ``mmembed batch`` for a table of media.

        ``data`` is a ``pyarrow.RecordBatch``, a ``pyarrow.Table`` or any
        object with ``__arrow_c_stream__``; it needs a string column ``uri``
        (or ``path``, as ``ray.data.read_binary_files(include_paths=True)``
        names it, or ``url``/``URL`` as web datasets do) and may have a binary ``bytes`` column with the content
        and a string ``content_type`` column (an object table's) that types
        each object, as ``mmembed batch`` does: the declared type when it is
        a supported image or video type, else the name's extension, else
        (a name without an extension) the first bytes; for a remote URI
        without ``bytes``, the type its store declares, then its first
        bytes (one request, abandoned after them; the backend reads the
        object, and its size, generation and etag are recorded). Every other column
        is carried to the rows of its object. The result
        (a batch for a batch, a table otherwise) has the columns ``uri``,
        ``content_type``, ``size_bytes``, ``generation``, ``etag``,
        ``updated``, ``embedding`` (fixed_size_list<float32>), ``status``,
        ``video_start_sec``, ``video_end_sec``, ``model``, ``space``,
        ``dimension``, then the carried ones.
        """
        opts = dict(
            start_sec=start_sec, end_sec=end_sec, interval_sec=interval_sec, dimension=dimension
        )
        if isinstance(data, pa.RecordBatch):
            return self.embed_record_batch(data, **opts)[0]
        table = data if isinstance(data, pa.Table) else pa.table(data)
        batches = [self.embed_record_batch(b, **opts)[0] for b in table.to_batches() if b.num_rows]
        if not batches:
            empty = pa.RecordBatch.from_pydict(
                {c: pa.array([], type=table.schema.field(c).type) for c in table.column_names}
            )
            batches = [self.embed_record_batch(empty, **opts)[0]]
        return pa.Table.from_batches(batches)
