"""Inference: rembg mask sessions and the EfficientNet-Lite0 embedder on ONNX Runtime.

One session per model, shared by all workers (``InferenceSession.run`` is
thread-safe). Mask inference is serialised by a semaphore so that concurrent
workers overlap decoding/encoding with it instead of oversubscribing the cores.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pooch
from PIL import Image

from daemon.inference import effnet
from daemon.inference.models import ModelError, ModelFile, checked_embedder, checked_mask_model


def _refuse_download(url, *args, **kwargs):
    raise ModelError(f"refusing to download {url}: rembgd never fetches models at run time; "
                     "run `rembgd models install`")


pooch.retrieve = _refuse_download  # rembg fetches through pooch; make that impossible here


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class MaskEngine:
    """rembg's session for one model, loaded from our verified file only."""

    def __init__(self, model: ModelFile, threads: int = 0, concurrency: int = 1):
        from rembg import new_session

        os.environ["U2NET_HOME"] = str(model.path.parent)  # rembg resolves <home>/<name>.onnx
        self.model = model
        try:
            self.session = new_session(model.name, sess_opts=session_options(threads),
                                       providers=["CPUExecutionProvider"])
        except ValueError as exc:
            raise ModelError(f"rembg does not know model {model.name!r}: {exc}") from exc
        self._gate = threading.BoundedSemaphore(concurrency)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Raw model mask (uint8, HxW, same size as the input)."""
        img = Image.fromarray(rgb, "RGB")
        with self._gate:
            masks = self.session.predict(img)
        mask = np.asarray(masks[0].convert("L"), dtype=np.uint8)
        return np.ascontiguousarray(mask)


class Embedder:
    """EfficientNet-Lite0 pooled features, L2-normalised (cosine = dot product)."""

    def __init__(self, model: ModelFile, threads: int = 0):
        self.model = model
        self.session = ort.InferenceSession(str(model.path), sess_options=session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        (vec,) = self.session.run(["embedding"], {"image": effnet.preprocess(rgb)})
        vec = vec[0].astype(np.float32)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)


class Engines:
    """Lazily created, shared engines for every model a config uses."""

    def __init__(self, models_dir: Path, threads: int = 0):
        self.models_dir = Path(models_dir)
        self.threads = threads
        self._lock = threading.Lock()
        self._masks: dict[str, MaskEngine] = {}
        self._embedder: Embedder | None = None

    def mask(self, name: str) -> MaskEngine:
        with self._lock:
            if name not in self._masks:
                self._masks[name] = MaskEngine(checked_mask_model(self.models_dir, name),
                                               self.threads)
            return self._masks[name]

    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(checked_embedder(self.models_dir), self.threads)
            return self._embedder
