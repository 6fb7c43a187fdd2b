"""Type stubs of the compiled module (``mmembed._native``)."""

import os
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa

__version__: str

Media = bytes | bytearray | memoryview | str | os.PathLike[str]

class MmembedError(Exception):
    """A backend, model or I/O failure."""

class InvalidInputError(ValueError):
    """A bad spec, option, dimension or modality."""

class EmbedResult:
    """Rows of one call: one per text or image, one per video segment."""

    embeddings: npt.NDArray[np.float32]
    """(rows, dimension); NaN where ``status`` is not empty."""
    status: list[str]
    """``""`` for rows with a vector, the error otherwise."""
    ok: npt.NDArray[np.bool_]
    input_index: npt.NDArray[np.int64]
    """Which input each row belongs to."""
    start_sec: npt.NDArray[np.float64]
    """A segment's start (NaN for texts and images)."""
    end_sec: npt.NDArray[np.float64]
    model: str
    space: str
    dimension: int
    def __len__(self) -> int: ...

class Embedder:
    def __init__(self, spec: str) -> None: ...
    @property
    def info(self) -> dict[str, Any]:
        """``backend``, ``model``, ``space``, ``dimension``,
        ``supported_dimensions``, ``modalities``, ``max_text_tokens``."""
    @property
    def spec(self) -> str: ...
    def embed_texts(self, texts: Sequence[str], *, dimension: int | None = None) -> EmbedResult: ...
    def embed_images(
        self, images: Sequence[Media], *, dimension: int | None = None
    ) -> EmbedResult: ...
    def embed_videos(
        self,
        videos: Sequence[Media],
        *,
        start_sec: int | None = None,
        end_sec: int | None = None,
        interval_sec: int | None = None,
    ) -> EmbedResult: ...
    def embed_record_batch(
        self,
        batch: pa.RecordBatch,
        *,
        start_sec: int | None = None,
        end_sec: int | None = None,
        interval_sec: int | None = None,
        dimension: int | None = None,
    ) -> tuple[pa.RecordBatch, npt.NDArray[np.int64]]: ...

def embedding_dtype(dimension: int) -> pa.DataType: ...
def tune_malloc_for_inference() -> bool:
    """Sets glibc's allocator for batches of inference (process-wide);
    False where it has no effect (not Linux/glibc)."""
