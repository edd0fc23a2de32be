"""Training state <-> (JSON tree, named tensors), with no pickle anywhere.

``encode`` walks a nested state (state_dicts, RNG states, user values) and
replaces every tensor or NumPy array by a reference to a named tensor; what is
left must be JSON. Anything else raises :class:`UnsupportedStateError` naming
the path of the value and what to do. ``decode`` rebuilds the tree.

Tagged JSON objects (a single key) keep types JSON lacks:
``{"__t": key}`` tensor, ``{"__np": key}`` NumPy array, ``{"__npscalar": [dtype, key]}``,
``{"__tuple": [...]}``, ``{"__dict": [[k, v], ...]}`` (non-string keys),
``{"__float": "nan"|"inf"|"-inf"}``, ``{"__dtype": "float32"}``, ``{"__device": "cuda:0"}``,
``{"__bytes": base64}``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import store
from .errors import UnsupportedStateError

# safetensors dtype names
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                   ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _st
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
_TAGS = ("__t", "__np", "__npscalar", "__tuple", "__dict", "__float", "__dtype", "__device", "__bytes")


class Encoder:
    """Collects tensors while turning a state tree into JSON-able data."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _add(self, path: str, t: torch.Tensor) -> str:
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise UnsupportedStateError(f"{path}: {t.layout} / quantized / nested tensors are not supported; "
                                        "convert to a dense tensor in state_dict()")
        if t.dtype not in DTYPES:
            raise UnsupportedStateError(f"{path}: dtype {t.dtype} cannot be stored in safetensors; "
                                        "store real and imaginary parts separately")
        key = path
        n = 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        self.tensors[key] = t.detach()
        return key

    def encode(self, value: Any, path: str) -> Any:
        """Encode ``value`` found at ``path`` (slash-separated, e.g. ``model/fc.weight``)."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"__t": self._add(path, value)}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise UnsupportedStateError(f"{path}: NumPy object arrays need pickle; store plain numbers instead")
            return {"__np": self._add(path, torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, np.generic):
            return {"__npscalar": [value.dtype.str, self._add(path, torch.from_numpy(np.asarray(value).reshape(1)))]}
        if isinstance(value, torch.dtype):
            return {"__dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, _join(path, i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"__tuple": items}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
                return {k: self.encode(v, _join(path, k)) for k, v in value.items()}
            pairs = []
            for k, v in value.items():
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise UnsupportedStateError(f"{path}: dict key {k!r} of type {type(k).__name__} is not storable")
                pairs.append([self.encode(k, _join(path, "key")), self.encode(v, _join(path, k))])
            return {"__dict": pairs}
        raise UnsupportedStateError(
            f"{path}: value of type {type(value).__module__}.{type(value).__qualname__} cannot be stored without "
            "pickle; give it state_dict()/load_state_dict() returning tensors, numbers, strings, lists and dicts")


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


class StateDecodeError(ValueError):
    """state.json holds something the encoder never writes (a damaged or forged checkpoint)."""


# Every tag decodes only from a fixed table or a checked shape: nothing is looked up by name in a module.
TORCH_DTYPE_NAMES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
NP_SCALAR_DTYPES: dict[str, np.dtype] = {
    np.dtype(n).str: np.dtype(n) for n in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                           "uint32", "uint64", "float16", "float32", "float64")}
NP_TENSOR_DTYPES = frozenset((torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float16, torch.float32, torch.float64)) | frozenset(
    getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))
FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_DEVICE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}(:[0-9]{1,6})?$")


def decode(tree: Any, tensor: Callable[[str], torch.Tensor], path: str = "") -> Any:
    """Rebuild a tree made by :class:`Encoder`; ``tensor(key)`` returns the loaded tensor.

    Raises StateDecodeError naming the path of anything the encoder does not write: an unknown
    dtype or device, a reference to a missing tensor, a malformed tag.
    """
    if isinstance(tree, list):
        return [decode(v, tensor, _join(path, i)) for i, v in enumerate(tree)]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, val), = tree.items()
        if tag in _TAGS:
            try:
                return _decode_tag(tag, val, tensor, path)
            except StateDecodeError:
                raise
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
                raise StateDecodeError(f"{path or '/'}: bad {tag} value ({type(exc).__name__}: {exc})") from None
    return {k: decode(v, tensor, _join(path, k)) for k, v in tree.items()}


def _decode_tag(tag: str, val: Any, tensor: Callable[[str], torch.Tensor], path: str) -> Any:
    def bad(what: str) -> StateDecodeError:
        return StateDecodeError(f"{path or '/'}: {tag} {what}: {str(val)[:80]!r}")

    if tag in ("__t", "__np"):
        if not isinstance(val, str):
            raise bad("is not a tensor name")
        t = tensor(val)
        if tag == "__t":
            return t
        if t.dtype not in NP_TENSOR_DTYPES:
            raise bad(f"names a {t.dtype} tensor, which NumPy has no type for")
        return t.numpy()
    if tag == "__npscalar":
        if not (isinstance(val, list) and len(val) == 2 and isinstance(val[0], str) and isinstance(val[1], str)):
            raise bad("is not [dtype, tensor name]")
        dt = NP_SCALAR_DTYPES.get(val[0])
        if dt is None:
            raise bad("has a dtype that is not a NumPy number type")
        t = tensor(val[1])
        if t.numel() * t.element_size() != dt.itemsize:
            raise bad(f"tensor is not one {dt} value")
        return byte_view(t).numpy().view(dt)[0]
    if tag == "__tuple":
        if not isinstance(val, list):
            raise bad("is not a list")
        return tuple(decode(v, tensor, _join(path, i)) for i, v in enumerate(val))
    if tag == "__dict":
        if not (isinstance(val, list) and all(isinstance(p, list) and len(p) == 2 for p in val)):
            raise bad("is not a list of [key, value] pairs")
        out = {}
        for k, v in val:
            key = _hashable(decode(k, tensor, _join(path, "key")))
            hash(key)  # TypeError (a dict as a key) -> StateDecodeError above
            out[key] = decode(v, tensor, _join(path, key))
        return out
    if tag == "__float":
        if not isinstance(val, str) or val not in FLOATS:
            raise bad("is not nan, inf or -inf")
        return FLOATS[val]
    if tag == "__dtype":
        if not isinstance(val, str) or val not in TORCH_DTYPE_NAMES:
            raise bad("is not a torch dtype")
        return TORCH_DTYPE_NAMES[val]
    if tag == "__device":
        if not isinstance(val, str) or not _DEVICE_RE.match(val):
            raise bad("is not a device like cpu or cuda:0")
        return torch.device(val)
    # __bytes
    if not isinstance(val, str):
        raise bad("is not base64 text")
    return base64.b64decode(val, validate=True)


def dumps(tree: Any) -> bytes:
    """state.json's bytes for an encoded tree; refuses a state restore would refuse (store's bounds)."""
    raw = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
    problem = "" if len(raw) <= store.MAX_STATE_BYTES else f"is {len(raw)} bytes, more than {store.MAX_STATE_BYTES}"
    problem = problem or store.json_bounds_problem(raw, store.MAX_STATE_DEPTH, store.MAX_STATE_VALUES)
    if problem:
        raise UnsupportedStateError(f"the state's non-tensor part (state.json) {problem}; store large data as "
                                    "tensors or NumPy arrays, which go to the tensor file")
    return raw


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (any dtype, any rank)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


# ----------------------------------------------------------------------------- RNG


class _NumpyState:
    """NumPy's global RNG state, fetched again only when its Mersenne Twister words changed.

    ``np.random.get_state()`` costs ~40 us (it rebuilds the 624-word key), too much for every step; reading
    the generator's raw state (key and position, 2.5 KB) through its ctypes address and comparing costs
    ~1 us. The legacy Gaussian cache (``has_gauss``, ``gauss``) is not among those words: an empty cache
    fills only with a draw, which moves the position (or, after 624 words, rewrites the key), but a full
    one empties without a word drawn, so the state is fetched whenever the last one had it full. ``set_state``
    of the same words with another cache is missed, except by ckptd's own restore (:func:`restore_rng`
    forgets the cached state). Falls back to ``get_state()`` each time where the generator is not the
    MT19937 this relies on."""

    RAW_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos

    def __init__(self) -> None:
        self._raw: bytes | None = None
        self._state: Any = None

    def get(self) -> Any:
        import ctypes

        try:
            bg = np.random.mtrand._rand._bit_generator
            if type(bg).__name__ != "MT19937":
                return np.random.get_state()
            raw = ctypes.string_at(bg.ctypes.state_address, self.RAW_BYTES)
        except (AttributeError, TypeError, ValueError):
            return np.random.get_state()
        if raw != self._raw or self._state is None or self._state[3]:
            self._state, self._raw = np.random.get_state(), raw
        return self._state

    def forget(self) -> None:
        self._raw = self._state = None


_numpy_state = _NumpyState()


def capture_rng() -> dict[str, Any]:
    import random

    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state.get(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def check_rng(rng: Any) -> None:
    """Raise StateDecodeError unless ``rng`` is what :func:`capture_rng` makes, by applying each state
    to a throwaway generator (the process's own generators are untouched)."""
    import random

    if not isinstance(rng, dict):
        raise StateDecodeError("rng is not an object")
    try:
        if "python" in rng:
            v = rng["python"]
            random.Random().setstate((v[0], tuple(v[1]), v[2]))
        if "numpy" in rng:
            np.random.RandomState().set_state(tuple(rng["numpy"]))
        if "torch" in rng:
            torch.Generator().set_state(rng["torch"].clone())  # set_state misreads a view with an offset
        if "cuda" in rng and not (isinstance(rng["cuda"], list) and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng["cuda"])):
            raise TypeError("cuda states are not uint8 tensors")
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
        raise StateDecodeError(f"rng: not a random generator state ({exc})") from None


def restore_rng(rng: dict[str, Any]) -> None:
    import random

    check_rng(rng)
    if "python" in rng:
        v = rng["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in rng:
        np.random.set_state(tuple(rng["numpy"]))
        _numpy_state.forget()
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].clone())
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
