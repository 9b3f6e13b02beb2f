"""EfficientNet-Lite0 converter: real photos through the converted ONNX model."""

import io
import pickle
import shutil
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data

from daemon.inference import effnet

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    onnx_path = tmp_path_factory.mktemp("effnet") / "effnet_lite0.onnx"
    effnet.convert(effnet.find_checkpoint(), onnx_path)
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def run(session, rgb):
    embedding, logits = session.run(["embedding", "logits"], {"image": effnet.preprocess(rgb)})
    assert embedding.shape == (1, 1280) and logits.shape == (1, 1000)
    return embedding[0], logits[0]


def top5(logits):
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return [(int(i), round(float(probs[i]), 3)) for i in np.argsort(-probs)[:5]]


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def jpeg_roundtrip(rgb, quality=70):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_chelsea_is_a_cat(session):
    _, logits = run(session, data.chelsea())
    print("chelsea top5", top5(logits))
    assert int(np.argmax(logits)) in CAT_CLASSES


def test_coffee_is_espresso(session):
    _, logits = run(session, data.coffee())
    print("coffee top5", top5(logits))
    assert int(np.argmax(logits)) == ESPRESSO


def test_embedding_survives_jpeg_but_separates_images(session):
    cat, coffee = data.chelsea(), data.coffee()
    cat_emb, _ = run(session, cat)
    coffee_emb, _ = run(session, coffee)
    cat_jpeg = cosine(cat_emb, run(session, jpeg_roundtrip(cat))[0])
    coffee_jpeg = cosine(coffee_emb, run(session, jpeg_roundtrip(coffee))[0])
    cross = cosine(cat_emb, coffee_emb)
    print(f"cosine cat/jpeg={cat_jpeg:.4f} coffee/jpeg={coffee_jpeg:.4f} cat/coffee={cross:.4f}")
    assert cat_jpeg > 0.9 and coffee_jpeg > 0.9
    assert cross < 0.5


def test_tampered_checkpoint_is_rejected(tmp_path):
    tampered = tmp_path / "tampered.pth"
    shutil.copyfile(effnet.find_checkpoint(), tampered)
    with open(tampered, "r+b") as f:
        f.seek(100_000)
        byte = f.read(1)
        f.seek(100_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256"):
        effnet.convert(tampered, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# Protocol-0 pickle that would run os.system("touch <marker>") if unpickled naively.
def evil_pickle(marker):
    return b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


def test_unpickler_refuses_os_system_in_zip(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("archive/data.pkl", evil_pickle(marker))
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        effnet.load_state_dict(checkpoint)
    assert not marker.exists()


def test_unpickler_refuses_os_system_in_legacy_stream(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    checkpoint.write_bytes(evil_pickle(marker))
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        effnet.load_state_dict(checkpoint)
    assert not marker.exists()


def test_zip_checkpoint_respects_offset_and_stride(tmp_path):
    # One 2x2 tensor viewing storage [0..5] from offset 1 with strides (1, 2),
    # i.e. a transposed view: [[1, 3], [2, 4]].
    data_pkl = (
        b"(dVw\n"
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI6\ntQ"
        b"I1\n(I2\nI2\nt(I1\nI2\ntI00\n"
        b"ccollections\nOrderedDict\n)RtRs."
    )
    checkpoint = tmp_path / "tiny.pth"
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("tiny/data.pkl", data_pkl)
        archive.writestr("tiny/byteorder", "little")
        archive.writestr("tiny/data/0", np.arange(6, dtype="<f4").tobytes())
    state = effnet.load_state_dict(checkpoint)
    np.testing.assert_array_equal(state["w"], [[1, 3], [2, 4]])
    assert state["w"].dtype == np.float32


def test_real_checkpoint_shapes():
    state = effnet.load_state_dict(effnet.find_checkpoint())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
