"""Inference: rembg mask sessions and the EfficientNet-Lite0 embedder on ONNX Runtime.

One session per model, shared by all workers (``InferenceSession.run`` is
thread-safe). Mask inference is serialised by a semaphore so that concurrent
workers overlap decoding/encoding with it instead of oversubscribing the cores.

rembg (and with it pymatting, numba, scipy) is imported only when a mask
session is created. rembg is handed our verified file directly: its session
class is subclassed with ``download_models`` returning our path, so no
environment variable is set and no download can start.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
from PIL import Image

from daemon.inference import effnet
from daemon.inference.models import (
    ModelError, ModelFile, check_image_input, checked_embedder, checked_mask_model, model_spec)
from daemon.inference.offline import refuse_downloads

__all__ = ["Embedder", "Engines", "MaskEngine", "ModelError", "ModelFile", "refuse_downloads",
           "session_options"]


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def rembg_session(model: ModelFile, opts: ort.SessionOptions):
    """rembg's session object for ``model.name``, running ``model.path`` (never a download)."""
    from rembg.sessions import sessions

    cls = sessions.get(model.name)
    if cls is None:
        raise ModelError(f"rembg does not know model {model.name!r}")
    path = str(model.path)
    pinned = type(f"Pinned{cls.__name__}", (cls,),
                  {"download_models": classmethod(lambda c, *a, **k: path)})
    try:
        return pinned(model.name, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own classes (InvalidProtobuf, NoSuchFile...)
        raise ModelError(
            f"model {model.name!r} at {path} does not load ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Run `{model_spec(model.name).fix('--force')}`") from None


class MaskEngine:
    """rembg's session for one model, loaded from our verified file only."""

    def __init__(self, model: ModelFile, threads: int = 0, concurrency: int = 1):
        spec = model_spec(model.name)  # unknown or remote: ModelError before rembg
        self.model = model
        self.session = rembg_session(model, session_options(threads))
        check_image_input(model.name, self.session.inner_session.get_inputs(), spec.input_size,
                          str(model.path), spec.fix("--force"))
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
        try:
            self.session = ort.InferenceSession(str(model.path),
                                                sess_options=session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"embedder {model.path} does not load ({type(exc).__name__}). "
                             "Run `rembgd models install --force`") from None

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        (vec,) = self.session.run(["embedding"], {"image": effnet.preprocess(rgb)})
        vec = vec[0].astype(np.float32)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)


class Engines:
    """Lazily created, shared engines for every model a config uses."""

    def __init__(self, models_dir: Path, threads: int = 0):
        refuse_downloads()
        self.models_dir = Path(models_dir)
        self.threads = threads
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._masks: dict[str, MaskEngine] = {}
        self._embedder: Embedder | None = None

    def model_file(self, name: str) -> ModelFile:
        """The verified model file and its checksum, without an ONNX session or rembg.

        Once a session is loaded this is the file that session runs (a file replaced
        on disk since takes effect at the next load, with its new checksum).
        """
        with self._lock:
            loaded = self._masks.get(name)
        return loaded.model if loaded is not None else checked_mask_model(self.models_dir, name)

    def mask(self, name: str) -> MaskEngine:
        with self._lock:
            engine = self._masks.get(name)
        if engine is not None:
            return engine
        with self._load_lock:  # one load at a time; lookups of loaded models never wait
            with self._lock:
                engine = self._masks.get(name)
            if engine is None:
                engine = MaskEngine(checked_mask_model(self.models_dir, name), self.threads)
                with self._lock:
                    self._masks[name] = engine
        return engine

    def preload(self, names: Iterable[str]) -> list[ModelFile]:
        """Load every named model's session now (ModelError on the first that fails)."""
        return [self.mask(name).model for name in dict.fromkeys(names)]

    def embedder(self) -> Embedder:
        with self._load_lock:
            if self._embedder is None:
                self._embedder = Embedder(checked_embedder(self.models_dir), self.threads)
            return self._embedder
