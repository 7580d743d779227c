"""Datasets and their collation: every dataset yields the sample dicts of `mmlongnet.data.collate`
(id, text, audio (S,), video (T, C, H, W), label), and `collate_samples` pads a list of them into a
`Batch` for `model(batch.inputs, batch.lengths)`. `ManifestDataset` reads your own multimodal data
listed in a JSONL manifest (see data/example_manifest/README.md); `AVDigitsDataset` composes the
bundled AV digits question-answering task (see data/README.md); `AssociativeRecall` draws
key-value recall sequences on the fly (`mmlongnet.data.recall`).
"""

from mmlongnet.data.avdigits import AVDigitsConfig, AVDigitsDataset
from mmlongnet.data.collate import (
    MEDIA_DTYPES,
    MODALITIES,
    Batch,
    LengthBuckets,
    bucket_length,
    collate_samples,
)
from mmlongnet.data.manifest import ManifestDataset
from mmlongnet.data.recall import AssociativeRecall, RecallConfig

__all__ = [
    "MEDIA_DTYPES",
    "MODALITIES",
    "AVDigitsConfig",
    "AVDigitsDataset",
    "AssociativeRecall",
    "Batch",
    "LengthBuckets",
    "ManifestDataset",
    "RecallConfig",
    "bucket_length",
    "collate_samples",
]
