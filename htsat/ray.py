"""Ray Data: :class:`Embedder` and :class:`Tagger`, callable classes for ``Dataset.map_batches``.

Each actor loads the model once (``checkpoint=``: a file or a name of ``htsat models``) and runs the
same code as ``htsat embed`` / ``htsat predict`` (:func:`htsat.inference.run_files`: long files as
windows, short ones fitted, windows of the batch's files ``batch_size`` to a forward), so a row
equals that file's line of their output. Input columns: ``path`` (decoded by htsat), or the
``amplitude`` (channels x samples) and ``sample_rate`` columns of ``ray.data.read_audio`` (with
``include_paths=True`` its ``path`` becomes ``file``). Output: the batch's other columns, and

- ``file``: the path (when the batch has one);
- ``embedding`` (Embedder): float32 vectors (NaN for a row with an error);
- ``labels`` and ``scores`` (Tagger): the top ``top_k`` classes, best first ([] for an error);
- ``error``: why a row has no result (None when it has one): a bad file never fails the batch.

Needs ``pip install -e ".[ray]"``. Example (README): ``ds.map_batches(Embedder, fn_constructor_kwargs=
{"checkpoint": ...}, compute=ray.data.ActorPoolStrategy(size=2), batch_size=64)``; on a cluster add
``num_gpus=1`` (an actor per GPU). More: docs/scale-out.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["Embedder", "Tagger"]


class _Runner:
    mode = ""

    def __init__(
        self,
        checkpoint: str,
        *,
        device: str | None = None,
        batch_size: int = 16,
        model: str | None = None,
        backend: str = "auto",
        precision: str = "auto",
        short_clips: str = "tile",
        allow_silent: bool = False,
        **predictor_options,
    ):
        """``batch_size``: windows of clip_seconds per forward (as ``--batch-size``; Ray's own
        ``batch_size`` of ``map_batches`` is rows per call). Other keywords go to
        :meth:`htsat.Predictor.from_checkpoint` (``labels_file``, ...)."""
        from .predict import Predictor

        self.predictor = Predictor.from_checkpoint(
            checkpoint,
            name=model,
            backend=backend,
            device=device,
            short_clips=short_clips,
            silence_db=None if allow_silent else -80.0,
            precision=precision,
            batch_size=batch_size,
            num_workers=0,  # an actor is the unit of parallelism: Ray starts as many as asked
            **predictor_options,
        )

    def _sources(self, batch: Mapping) -> tuple[list, list | None]:
        from .inference import DecodedAudio

        if "amplitude" in batch:
            if "sample_rate" not in batch:
                raise ValueError("an 'amplitude' column needs its 'sample_rate' column (ray.data.read_audio gives both)")
            names = [str(p) for p in batch["path"]] if "path" in batch else None
            amps, rates = batch["amplitude"], batch["sample_rate"]
            return [DecodedAudio(names[i] if names else f"<row {i}>", amps[i], int(rates[i])) for i in range(len(amps))], names
        if "path" in batch:
            names = [str(p) for p in batch["path"]]
            return names, names
        raise ValueError(f"expected a 'path' column or 'amplitude' and 'sample_rate' columns; got {sorted(batch)}")

    def _results(self, batch: Mapping, **kwargs) -> tuple[dict, list[dict]]:
        from .inference import InputList, run_files

        sources, names = self._sources(batch)
        todo = InputList()
        todo.extend(sources)  # an InputList: taken as given, never expanded as patterns
        p = self.predictor
        results = list(run_files(p, todo, mode=self.mode, batch_size=p.batch_size, num_workers=0, **kwargs))
        out = {k: v for k, v in batch.items() if k not in ("amplitude", "path")}
        if names is not None:
            out["file"] = np.array(names, dtype=object)
        out["error"] = np.array([r.get("error") for r in results], dtype=object)
        return out, results


class Embedder(_Runner):
    """``embedding`` per row: the ``htsat embed`` vector (``embedding="clap_embedding"`` for CLAP checkpoints)."""

    mode = "embed"

    def __init__(self, checkpoint: str, *, embedding: str = "latent_output", **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.embedding = embedding
        cfg = self.predictor.model.config
        self.dim = int(cfg.projection_dim if embedding == "clap_embedding" else cfg.num_features)

    def __call__(self, batch: Mapping) -> dict:
        out, results = self._results(batch, embedding=self.embedding)
        mat = np.full((len(results), self.dim), np.nan, np.float32)  # same width in every batch, errors too
        for i, r in enumerate(results):
            if "embedding" in r:
                mat[i] = r["embedding"]
        out["embedding"] = mat
        return out


class Tagger(_Runner):
    """``labels`` and ``scores`` per row: the ``htsat predict`` top ``top_k``, best first."""

    mode = "predict"

    def __init__(self, checkpoint: str, *, top_k: int = 5, **kwargs):
        super().__init__(checkpoint, **kwargs)
        if int(top_k) < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = int(top_k)

    def __call__(self, batch: Mapping) -> dict:
        out, results = self._results(batch, top_k=self.top_k)
        labels = np.empty(len(results), dtype=object)
        scores = np.empty(len(results), dtype=object)
        for i, r in enumerate(results):
            labels[i] = [t["label"] for t in r.get("top", ())]
            scores[i] = np.array([t["score"] for t in r.get("top", ())], np.float32)
        out["labels"], out["scores"] = labels, scores
        return out
