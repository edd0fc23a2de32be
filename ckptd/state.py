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
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

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


def decode(tree: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """Rebuild a tree made by :class:`Encoder`; ``tensor(key)`` returns the loaded tensor."""
    if isinstance(tree, list):
        return [decode(v, tensor) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        (tag, val), = tree.items()
        if tag == "__t":
            return tensor(val)
        if tag == "__np":
            return tensor(val).numpy()
        if tag == "__npscalar":
            return tensor(val[1]).numpy().view(np.dtype(val[0]))[0]
        if tag == "__tuple":
            return tuple(decode(v, tensor) for v in val)
        if tag == "__dict":
            return {_hashable(decode(k, tensor)): decode(v, tensor) for k, v in val}
        if tag == "__float":
            return float(val)
        if tag == "__dtype":
            return getattr(torch, val)
        if tag == "__device":
            return torch.device(val)
        if tag == "__bytes":
            return base64.b64decode(val)
    return {k: decode(v, tensor) for k, v in tree.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (any dtype, any rank)."""
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    import random

    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    import random

    if "python" in rng:
        v = rng["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in rng:
        np.random.set_state(tuple(rng["numpy"]))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        states = rng["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
