"""The gallery manifest: what built the embeddings and how they are indexed, as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from index.errors import GalleryCorruptError, GalleryMismatchError
from index.format import FORMAT_VERSION, check_readable
from index.layout import MANIFEST, gallery_snapshot

__all__ = [
    "Manifest",
    "canonical_preprocessing",
    "check_compatible",
    "load_manifest",
    "utc_now",
]

METRIC = "inner_product"


def utc_now() -> str:
    """An ISO-8601 UTC timestamp with seconds precision."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_preprocessing(preprocessing: Any) -> dict[str, Any]:
    """A JSON-normalised dict (tuples become lists) so equal settings compare equal.

    Accepts a ``model.config.Preprocessing`` (anything with ``to_dict``) or a plain mapping.
    """
    data = preprocessing.to_dict() if hasattr(preprocessing, "to_dict") else dict(preprocessing)
    return json.loads(json.dumps(data, sort_keys=True))


@dataclass
class Manifest:
    """Everything needed to refuse a foreign query model and to rebuild the index."""

    model_fingerprint: str
    preprocessing: dict[str, Any]
    embedding_dim: int
    index_type: str
    index_params: dict[str, Any] = field(default_factory=dict)
    requested_index_type: str = "auto"
    count: int = 0
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    metric: str = METRIC
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, directory: Path) -> Manifest:
        """Parse the manifest of the gallery at ``directory`` (named in errors); a format
        newer than this code's is refused before its fields are read."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise GalleryCorruptError(
                f"gallery {directory}: manifest is not valid JSON: {error}"
            ) from error
        if not isinstance(data, dict):
            raise GalleryCorruptError(f"gallery {directory}: manifest is not a JSON object")
        check_readable(directory, data.get("format_version"))
        known = {f.name for f in fields(cls)}
        missing = {"model_fingerprint", "preprocessing", "embedding_dim", "index_type"} - set(data)
        if missing:
            raise GalleryCorruptError(f"gallery {directory}: manifest lacks {sorted(missing)}")
        return cls(**{key: value for key, value in data.items() if key in known})


def load_manifest(directory: Path) -> tuple[Path, Manifest]:
    """The snapshot ``current`` points at in the gallery ``directory``, and its manifest."""
    snapshot = gallery_snapshot(directory)
    path = snapshot / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise GalleryCorruptError(f"cannot read {path}: {error}") from error
    return snapshot, Manifest.from_json(text, directory)


def check_compatible(
    manifest: Manifest,
    expected_fingerprint: str | None,
    expected_preprocessing: Any | None,
) -> None:
    """Refuse a gallery whose embeddings a different model or preprocessing produced."""
    if expected_fingerprint is not None and expected_fingerprint != manifest.model_fingerprint:
        raise GalleryMismatchError(
            f"gallery was built by model {manifest.model_fingerprint!r} but the query model is "
            f"{expected_fingerprint!r}; rebuild the gallery with this model"
        )
    if expected_preprocessing is not None:
        expected = canonical_preprocessing(expected_preprocessing)
        stored = canonical_preprocessing(manifest.preprocessing)
        if expected != stored:
            raise GalleryMismatchError(
                f"gallery (model {manifest.model_fingerprint!r}) was built with preprocessing "
                f"{stored} but the query model (fingerprint "
                f"{expected_fingerprint or 'not given'!r}) uses {expected}"
            )
