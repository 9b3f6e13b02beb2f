"""Static int8 quantisation of a U^2-Net model, and the quality gate it must pass.

The recipe (measured in bench/quant.py, bench/quant.md):

- the fp32 file is raised to opset 13 (per-channel DequantizeLinear needs ``axis``)
  and pre-processed by ONNX Runtime (constant folding: the 1x3x320x320 input is
  fixed, so every Shape/Gather/Cast chain that sizes a Resize folds away);
- calibration: real photos (scikit-image's samples, ``PHOTOS``), each through the
  same preprocessing as inference (``engine.u2net_input``), plus flipped
  crops; MinMax ranges, computed on one ORT thread and rounded outwards to 1/64
  so that the file is the same on every machine with this ORT version;
- quantised: Conv (int8 per-channel weights), and the ops between convs (Relu,
  MaxPool, Resize, Concat, Add) with uint8 activations, QDQ. With only Conv quantised
  (recipe v2), every conv's output went back to float for the Relu/Concat/Resize/Add
  between convs, and ONNX Runtime's NHWC int8 convs were wrapped in ~80 Transposes:
  u2netp-int8 v3 runs 1.12x faster than v2 per inference on 2 threads, gate as good or better
  (docs/benchmarks.md, "Quantised models");
- kept in float: the two full-resolution convs that read the photo
  (``input_convs``: stage 1's input conv and its first conv) and the nodes that carry
  their outputs to the next convs (stage 1's residual Add and skip Concats): with uint8
  activations there, a light subject on a light backdrop (a few levels of
  contrast) loses its edge to rounding, and the mask's outline comes out wavy;
  the fused head (side convs, their Resizes, the Concat, the
  output conv, every Sigmoid), and the nodes around *constant channels*: U^2-Net's
  folded BatchNorm leaves a few channels whose weights are ~0 and whose bias is
  large (up to 228 while their neighbours stay below 10). One uint8 range per
  tensor then rounds every other channel to nothing: that, not the sigmoid, is
  what wrecked the naive attempt (IoU ~0.5). Those convs, and every node from them
  to the next conv, are found from the calibration activations
  (``constant_channel_nodes``), not by name.

``gate`` compares the quantised model's masks with the fp32 model's on real
photos; ``install`` refuses a model that fails it.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RECIPE = "qdq-u8s8-perchannel-minmax-v3"
# quantised op types: the convs and everything between them (recipe v3)
QUANTISED_OPS = ("Conv", "Relu", "MaxPool", "Resize", "Concat", "Add")
OPSET = 13
RANGE_STEP = 1 / 64        # calibration ranges are rounded outwards to this grid
# a channel is "constant" when its spread is under this fraction of its peak, and it
# sets the tensor's range when its peak is this many times every other channel's peak
CONSTANT_SPREAD = 0.01
DOMINANCE = 1.5
# convs kept float from the input on (graph order): 2 keeps the white-on-white edge
# (white-on-white 24 MP boundary F 0.687 with none, 0.740 with 1, 0.886 with 2, fp32 0.876:
# docs/benchmarks.md, "White on white")
INPUT_CONVS = 2

# scikit-image sample photos that load offline (grey ones are stacked to RGB)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina",
          "camera", "coins", "clock", "page", "cell", "motorcycle_left", "motorcycle_right",
          "hubble_deep_field", "moon", "brick", "grass", "gravel")
# photos with a subject to cut out: the gate's set. The others (a star field, the
# moon's surface, three textures) have no subject; their masks are min-max
# stretched noise for the fp32 model too, and are reported, not gated.
SUBJECT_PHOTOS = PHOTOS[:13]

GATE_MEAN_IOU = 0.97
GATE_MIN_IOU = 0.90


class QuantizeError(RuntimeError):
    pass


def photo(name: str) -> np.ndarray:
    """RGB uint8 array of a scikit-image sample photo, offline."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name.endswith("left") else right
    else:
        arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.dstack([arr] * 3)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def calibration_images(crops_per_photo: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Every photo whole, plus ``crops_per_photo`` 70% crops (every other one mirrored)."""
    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        a = photo(name)
        out.append(a)
        h, w = a.shape[:2]
        for k in range(crops_per_photo):
            ch, cw = int(h * 0.7), int(w * 0.7)
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            c = a[y:y + ch, x:x + cw]
            out.append(np.ascontiguousarray(c[:, ::-1] if k % 2 == 0 else c))
    return out


# ------------------------------------------------------------------ graph analysis


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model) -> dict:
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return cons


def head_nodes(model) -> set[str]:
    """The fused output: output conv, its Concat, each side conv and Resize, every Sigmoid."""
    prod = _producers(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    out = next((n for n in convs if n.input[1] == "outconv.weight"), None)
    if out is None:
        raise QuantizeError("no 'outconv' Conv: not a U^2-Net graph")
    names = {out.name}
    cat = prod[out.input[0]]
    names.add(cat.name)
    for t in cat.input:
        n = prod[t]
        while n.op_type != "Conv":
            names.add(n.name)
            n = prod[n.input[0]]
        names.add(n.name)
    return names | {n.name for n in model.graph.node if n.op_type == "Sigmoid"}


def input_convs(model, count: int = INPUT_CONVS) -> set[str]:
    """The first ``count`` Convs from the input (ONNX graphs are topologically sorted):
    U^2-Net's full-resolution convs that read the photo's pixel contrast, and every node
    from them to the next convs: their Relus and pools, the skip Concats and stage 1's
    residual Add, which carry those features on at full resolution."""
    first = [n for n in model.graph.node if n.op_type == "Conv"][:count]
    between, _ = _to_next_convs(model, first)
    return {n.name for n in first} | between


def _to_next_convs(model, nodes) -> tuple[set[str], set[str]]:
    """From ``nodes``' outputs to the next Convs: the non-Conv nodes on the way, and those
    Convs."""
    cons = _consumers(model)
    between: set[str] = set()
    convs: set[str] = set()
    todo = [t for n in nodes for t in n.output]
    while todo:
        for c in cons.get(todo.pop(), []):
            if c.op_type == "Conv":
                convs.add(c.name)
            elif c.name not in between:
                between.add(c.name)
                todo.extend(c.output)
    return between, convs


def activation_stats(model, inputs: list[dict], session_opts) -> tuple[dict, dict]:
    """One pass of the float model over ``inputs``: the (min, max) of every float tensor
    that a quantised op type reads or writes, and each Conv output's per-channel
    (peak |x|, largest std)."""
    import onnx
    import onnxruntime as ort

    weights = {i.name for i in model.graph.initializer}
    tensors = list(dict.fromkeys(t for n in model.graph.node if n.op_type in QUANTISED_OPS
                                 for t in (*n.input, *n.output) if t and t not in weights))
    inputs_of_graph = {i.name for i in model.graph.input}
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    have = {o.name for o in aug.graph.output}
    for t in tensors:
        if t not in have and t not in inputs_of_graph:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    sess = ort.InferenceSession(aug.SerializeToString(), sess_options=session_opts,
                                providers=["CPUExecutionProvider"])
    fetch = [t for t in tensors if t not in inputs_of_graph]
    ranges: dict[str, tuple[float, float]] = {}
    channels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    conv_out = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    for feed in inputs:
        values = dict(zip(fetch, sess.run(fetch, feed)))
        values.update({k: v for k, v in feed.items() if k in tensors})
        for t, a in values.items():
            if a.dtype != np.float32 or a.size == 0:  # Resize's sizes, shapes: not activations
                continue
            lo, hi = float(a.min()), float(a.max())
            old = ranges.get(t)
            ranges[t] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            if t in conv_out:
                p, s = np.abs(a).max(axis=(0, 2, 3)), a.std(axis=(0, 2, 3))
                if t in channels:
                    p, s = np.maximum(channels[t][0], p), np.maximum(channels[t][1], s)
                channels[t] = (p, s)
    return ranges, channels


def constant_channel_nodes(model, channels: dict) -> set[str]:
    """Convs whose output range is set by near-constant channels (folded BatchNorm: ~0
    weights, a large bias), every node on the way to the next Convs (Relu, MaxPool,
    Resize, Concat...) and those Convs: one uint8 range would round the other channels
    to nothing."""
    flagged = []
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        peak, spread = channels[n.output[0]]
        const = spread < CONSTANT_SPREAD * peak
        if const.any() and (~const).any() and peak[const].max() > DOMINANCE * peak[~const].max():
            flagged.append(n)
    between, readers = _to_next_convs(model, flagged)
    return {n.name for n in flagged} | between | readers


def rounded_ranges(ranges: dict):
    """ORT's TensorsData of MinMax ranges, rounded outwards to RANGE_STEP (so last-bit
    differences between machines give the same file)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    data = {}
    for name, (lo, hi) in ranges.items():
        lo = np.float32(np.floor(lo / RANGE_STEP) * RANGE_STEP)
        hi = np.float32(np.ceil(hi / RANGE_STEP) * RANGE_STEP)
        data[name] = TensorData(lowest=np.array(lo), highest=np.array(hi))
    return TensorsData(CalibrationMethod.MinMax, data)


# ------------------------------------------------------------------ quantisation


@dataclass
class QuantReport:
    recipe: str
    onnxruntime: str
    calibration_images: int
    float_nodes: list[str] = field(default_factory=list)
    quantised_convs: int = 0


def _one_thread():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def _normalised(images: list[np.ndarray], spec) -> list[np.ndarray]:
    from daemon.inference.engine import u2net_input
    from PIL import Image

    return [u2net_input(Image.fromarray(a), spec) for a in images]


def quantize(src: Path, dst: Path, spec, images: list[np.ndarray] | None = None) -> QuantReport:
    """Write the int8 model of the fp32 U^2-Net ``src`` (registry ``spec``: its input size and
    normalisation) to ``dst`` (no atomicity: a temp path).

    ``images``: the calibration photos (RGB uint8); default ``calibration_images()``, the
    recipe's. Fewer give a different (worse) file: for tests of the mechanics only."""
    import onnx
    import onnxruntime as ort
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    with tempfile.TemporaryDirectory(prefix="rembgd-quant-") as tmpdir:
        tmp = Path(tmpdir)
        raised = version_converter.convert_version(onnx.load(str(src)), OPSET)
        onnx.save(raised, str(tmp / "op13.onnx"))
        quant_pre_process(str(tmp / "op13.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
        pre = onnx.load(str(tmp / "pre.onnx"))
        input_name = pre.graph.input[0].name
        if images is None:
            images = calibration_images()
        feeds = [{input_name: x} for x in _normalised(images, spec)]
        ranges, channels = activation_stats(pre, feeds, _one_thread())
        keep = input_convs(pre) | head_nodes(pre) | constant_channel_nodes(pre, channels)
        save_tensors_data(rounded_ranges(ranges), tmp / "ranges.json")
        quantize_static(str(tmp / "pre.onnx"), str(dst), None, calibration_cache_path=tmp / "ranges.json",
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTISED_OPS),
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=sorted(keep))
    convs = sum(1 for n in pre.graph.node if n.op_type == "Conv")
    return QuantReport(RECIPE, ort.__version__, len(feeds), sorted(keep),
                       convs - sum(1 for n in pre.graph.node if n.op_type == "Conv" and n.name in keep))


# ------------------------------------------------------------------ the gate


@dataclass
class GateResult:
    mean_iou: float
    min_iou: float
    worst: str
    per_photo: dict[str, float]
    unscored: dict[str, float]     # photos without a subject: reported, not gated
    passed: bool

    def summary(self) -> str:
        return (f"mask IoU against fp32 on {len(self.per_photo)} real photos: mean "
                f"{self.mean_iou:.4f} (gate >= {GATE_MEAN_IOU}), min {self.min_iou:.4f} on "
                f"{self.worst} (gate >= {GATE_MIN_IOU})")

    def to_dict(self) -> dict:
        return asdict(self)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of the subjects (mask >= 128) of two uint8 masks; 1.0 when both are empty."""
    a, b = a >= 128, b >= 128
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def gate(fp32, int8) -> GateResult:
    """Masks of two MaskEngine-like objects (``predict(rgb) -> uint8 mask``) on the photos."""
    per, extra = {}, {}
    for name in PHOTOS:
        rgb = photo(name)
        iou = mask_iou(fp32.predict(rgb), int8.predict(rgb))
        (per if name in SUBJECT_PHOTOS else extra)[name] = round(iou, 4)
    worst = min(per, key=per.get)
    mean = float(np.mean(list(per.values())))
    ok = mean >= GATE_MEAN_IOU and per[worst] >= GATE_MIN_IOU
    return GateResult(round(mean, 4), per[worst], worst, per, extra, ok)
