"""Inference: mask sessions and the EfficientNet-Lite0 embedder on ONNX Runtime.

One session per model, shared by all workers (``InferenceSession.run`` is
thread-safe). Mask inference is serialised by a semaphore so that concurrent
workers overlap decoding/encoding with it instead of oversubscribing the cores.

A model's spec (registry.py) names its runner. The U^2-Net family (``runner:
u2net``: u2net, u2netp, u2net_human_seg, silueta and the int8 files quantised here),
which in rembg 2.0.86 all share ``U2netSession.predict``, runs here directly on
ONNX Runtime (``U2netSession`` below reproduces rembg's pre- and post-processing
step for step, with the spec's input size and normalisation, so the masks are
rembg's, byte for byte: tests/test_models.py).
That spares every process with a miss importing rembg, which pulls in
pymatting, numba and scipy (~1-2 s). Other models go through rembg's own
session, imported only when one is created; rembg is handed our verified file
directly: its session class is subclassed with ``download_models`` returning
our path, so no environment variable is set and no download can start.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
from PIL import Image

from daemon.inference import effnet, registry
from daemon.inference.models import (
    ModelError, ModelFile, check_image_input, checked_embedder, checked_mask_model, model_spec)
from daemon.inference.offline import refuse_downloads

__all__ = ["Embedder", "Engines", "MaskEngine", "ModelError", "ModelFile", "U2NET_FAMILY",
           "U2netSession", "refuse_downloads", "session_options", "u2net_input"]

# rembg 2.0.86's sessions whose predict is U2netSession.predict (same normalisation,
# 320x320 input, min-max output); u2net's extra clip(0, 1) is a no-op on min-max output.
U2NET_FAMILY = frozenset(s.name for s in registry.SPECS.values()
                         if s.runner == registry.U2NET and s.base is None)


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    # ORT's memory pattern plans one block for a run's tensors after the first run, and the
    # second run then faults in that fresh block: u2netp-int8 ran 170, 160, then 95 ms. Off,
    # only the first run is slow, steady runs are as fast (95 ms) and the session's peak RSS
    # is 345 MB instead of 572 (docs/benchmarks.md). It plans memory only: the same masks.
    opts.enable_mem_pattern = False
    return opts


def _load_error(model: ModelFile, exc: Exception) -> ModelError:
    return ModelError(
        f"model {model.name!r} at {model.path} does not load ({type(exc).__name__}: "
        f"{str(exc)[:200]}). Run `{model_spec(model.name).fix('--force')}`")


def u2net_input(img: Image.Image, spec: registry.ModelSpec) -> np.ndarray:
    """rembg's ``BaseSession.normalize(img, *spec.norm, (size, size))``: LANCZOS resize, scale
    by the image's max, per-channel (x - mean) / std in float64; 1x3xHxW float32 out."""
    mean, std = spec.norm
    size = (spec.input_size, spec.input_size)
    im_ary = np.array(img.convert("RGB").resize(size, Image.Resampling.LANCZOS))
    im_ary = im_ary / max(np.max(im_ary), 1e-6)
    tmp = np.zeros((im_ary.shape[0], im_ary.shape[1], 3))
    for c in range(3):
        tmp[:, :, c] = (im_ary[:, :, c] - mean[c]) / std[c]
    return np.expand_dims(tmp.transpose((2, 0, 1)), 0).astype(np.float32)


class U2netSession:
    """rembg 2.0.86's ``U2netSession`` (``BaseSession.normalize`` + ``predict``) without rembg.

    The same interface as rembg's session (``inner_session``, ``predict(img) -> [mask]``)
    and the same arithmetic, in the same order and dtypes, so the mask is identical.
    """

    def __init__(self, model: ModelFile, opts: ort.SessionOptions):
        self.model_name = model.name
        self.spec = model_spec(model.name)
        try:
            self.inner_session = ort.InferenceSession(str(model.path), sess_options=opts,
                                                      providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own classes (InvalidProtobuf, NoSuchFile...)
            raise _load_error(model, exc) from None
        self._input = self.inner_session.get_inputs()[0].name

    def normalize(self, img: Image.Image) -> dict[str, np.ndarray]:
        return {self._input: u2net_input(img, self.spec)}

    def predict(self, img: Image.Image) -> list[Image.Image]:
        """``U2netSession.predict``: min-max normalised output, uint8, LANCZOS to img.size."""
        pred = self.inner_session.run(None, self.normalize(img))[0][:, 0, :, :]
        ma, mi = np.max(pred), np.min(pred)
        pred = np.squeeze((pred - mi) / (ma - mi))
        mask = Image.fromarray((pred.clip(0, 1) * 255).astype("uint8"), mode="L")
        return [mask.resize(img.size, Image.Resampling.LANCZOS)]


RUNNERS = {registry.U2NET: U2netSession}


def mask_session(model: ModelFile, opts: ort.SessionOptions):
    """The session predicting ``model``'s masks: its spec's runner (ours, or rembg's)."""
    runner = RUNNERS.get(model_spec(model.name).runner, rembg_session)
    return runner(model, opts)


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
        raise _load_error(model, exc) from None


class MaskEngine:
    """The mask session for one model (see ``mask_session``), loaded from our verified file only."""

    def __init__(self, model: ModelFile, threads: int = 0, concurrency: int = 1):
        spec = model_spec(model.name)  # unknown or remote: ModelError before rembg
        self.model = model
        self.session = mask_session(model, session_options(threads))
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
