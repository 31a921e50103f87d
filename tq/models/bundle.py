"""``ModelBundle``: a prepared model directory (docs/design.md section 4), validated on load.

A bundle holds ``model.onnx`` (a decoder exported with past key values, float32; its weights in
the external data file ``model.onnx_data`` next to it, so the graph can be read without reading
the weights), ``tokenizer.json``, ``config.json``, ``generation_config.json``, optionally
``chat_template.jinja`` and the other Hugging Face tokenizer files, and ``bundle.json``, which
records where the bundle came from and the facts a decode loop needs.

Graph contract (checked by :meth:`ModelBundle.load`):

- inputs ``input_ids`` int64 [batch, seq] and, for every layer N < ``num_layers``,
  ``past_key_values.N.key`` / ``.value`` float32 [batch, kv_heads, past_seq, head_dim];
  optional inputs ``attention_mask`` [batch, past_seq + seq], ``position_ids`` [batch, seq],
  ``cache_position`` [seq] and ``use_cache_branch`` [1]; no other input;
- outputs ``logits`` float32 [batch, seq, vocab_size] and ``present.N.key`` / ``.value``
  float32 [batch, kv_heads, past_seq + seq, head_dim]. With grouped-query attention the KV heads
  are not repeated: kv_heads is the model's number of KV heads.

Graph inputs differ by model family and order: feed them by name.

Integrity: ``bundle.json`` carries its own checksum (``sha256``, :func:`tq.core.fileio.json_checksum`)
and a manifest of every other file (``files``: bytes and SHA-256 of each), written by
:func:`write_bundle_info` when the bundle is prepared. :meth:`ModelBundle.load` verifies the
checksum, every file's size, and the SHA-256 of every file up to :data:`HASH_ON_LOAD_BYTES` (the
graph, the tokenizer and the configs: 9 ms for SmolLM2); the weights (``model.onnx_data``, 540 MB
for SmolLM2, 0.35 s to hash on this machine's CPU, more from a network file system) are checked
by size on each load and hashed only with ``full_check=True``, which ``prepare_bundle`` uses
before it reuses a bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tq.core.fileio import ChecksumError, read_checked_json, sha256_file, write_checked_json

if TYPE_CHECKING:
    import onnxruntime
    import tokenizers

BUNDLE_SCHEMA = "tq.bundle/1"
BUNDLE_JSON = "bundle.json"
MODEL_ONNX = "model.onnx"
MODEL_ONNX_DATA = "model.onnx_data"
TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
REQUIRED_FILES = (BUNDLE_JSON, MODEL_ONNX, TOKENIZER_JSON, CONFIG_JSON, GENERATION_CONFIG_JSON)

INPUT_IDS = "input_ids"
LOGITS = "logits"
OPTIONAL_INPUTS = ("attention_mask", "position_ids", "cache_position", "use_cache_branch")
# Files up to this size are hashed on every load; larger ones (the weights) only by size.
HASH_ON_LOAD_BYTES = 64 << 20

# bundle.json fields every bundle has, with their JSON types.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "preset": (str, type(None)),
    "source": dict,
    "weights_sha256": str,
    "fingerprint": str,
    "num_layers": int,
    "kv_heads": int,
    "head_dim": int,
    "vocab_size": int,
    "input_names": list,
    "output_names": list,
    "eos_token_ids": list,
    "files": dict,
}
_POSITIVE_FIELDS = ("num_layers", "kv_heads", "head_dim", "vocab_size")


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupt or not what the decode loop expects."""


def past_name(layer: int, kind: str) -> str:
    """Graph input holding layer ``layer``'s past keys (``kind="key"``) or values (``"value"``)."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Graph output holding layer ``layer``'s keys or values, past and new: ``present.N.kind``."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, element type (``"float32"``, ``"int64"``, ...) and shape,
    each dimension an int (fixed) or a str (symbolic, ``"?"`` if unnamed)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


def _tensor_spec(value_info: Any) -> TensorSpec:
    import onnx

    tensor_type = value_info.type.tensor_type
    dims = tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in tensor_type.shape.dim
    )
    elem_type = tensor_type.elem_type
    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(elem_type)) if elem_type else "not a tensor"
    return TensorSpec(value_info.name, dtype, dims)


def _check_external_data(graph: Any, directory: Path) -> None:
    """Every initializer stored outside model.onnx must lie inside an existing file."""
    import onnx

    sizes: dict[str, int] = {}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if location not in sizes:
            file = directory / location
            if not location or not file.is_file():
                raise BundleError(f"{directory}: missing external data file {location!r} of {MODEL_ONNX}")
            sizes[location] = file.stat().st_size
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if end > sizes[location]:
            raise BundleError(
                f"{directory / location}: truncated ({sizes[location]} bytes, tensor {tensor.name} "
                f"needs {end})"
            )


def read_graph(path: str | os.PathLike) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph inputs and outputs of an ONNX file, in graph order, without reading the weights
    held in external data files (their presence and sizes are checked).

    Raises:
        BundleError: the file is missing or not a readable ONNX model, or an external data file
            is missing or too short.
    """
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise BundleError(f"{path}: not found") from None
    except Exception as error:  # onnx raises protobuf's DecodeError and others
        raise BundleError(f"{path}: not a readable ONNX model ({error})") from None
    _check_external_data(model.graph, path.parent)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = tuple(_tensor_spec(info) for info in model.graph.input if info.name not in initializers)
    return inputs, tuple(_tensor_spec(info) for info in model.graph.output)


def graph_facts(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> dict[str, int]:
    """``num_layers``, ``kv_heads``, ``head_dim`` and ``vocab_size`` read off an exported graph:
    the number of ``past_key_values.N.key`` inputs (numbered from 0, without a gap), the fixed
    dimensions 1 and 3 of layer 0's past keys, and the fixed last dimension of the logits.

    Raises:
        BundleError: the graph has no layer-0 past keys or logits, or those dimensions are not
            fixed.
    """
    by_name = {spec.name: spec for spec in (*inputs, *outputs)}
    num_layers = 0
    while past_name(num_layers, "key") in by_name:
        num_layers += 1
    past, logits = by_name.get(past_name(0, "key")), by_name.get(LOGITS)
    if past is None or logits is None or len(past.shape) != 4 or not logits.shape:
        raise BundleError(f"the graph has no {past_name(0, 'key')} [batch, heads, seq, dim] or no {LOGITS}")
    facts = {
        "num_layers": num_layers,
        "kv_heads": past.shape[1],
        "head_dim": past.shape[3],
        "vocab_size": logits.shape[-1],
    }
    for key, value in facts.items():
        if not isinstance(value, int):
            raise BundleError(f"the graph does not fix {key} (found {value!r})")
    return facts


def _check_cache_tensor(spec: TensorSpec, kv_heads: int, head_dim: int) -> str | None:
    if spec.dtype != "float32":
        return f"{spec.name} is {spec.dtype}, expected float32"
    if len(spec.shape) != 4:
        return f"{spec.name} has shape {list(spec.shape)}, expected [batch, kv_heads, seq, head_dim]"
    for axis, expected, what in ((1, kv_heads, "kv_heads"), (3, head_dim, "head_dim")):
        if isinstance(spec.shape[axis], int) and spec.shape[axis] != expected:
            return f"{spec.name} has {spec.shape[axis]} at axis {axis}, bundle.json says {what} {expected}"
    return None


def _missing(kind: str, names: list[str]) -> str:
    return f"{MODEL_ONNX} has no {kind}{'s' if len(names) > 1 else ''} {', '.join(names)}"


def check_graph(
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    vocab_size: int,
) -> None:
    """Check a graph against the contract in this module's docstring.

    Raises:
        BundleError: naming the missing inputs or outputs, an input the decode loop does not
            know, or a tensor of the wrong type or shape.
    """
    kinds = ("key", "value")
    past = [past_name(layer, kind) for layer in range(num_layers) for kind in kinds]
    present = [present_name(layer, kind) for layer in range(num_layers) for kind in kinds]
    in_specs = {spec.name: spec for spec in inputs}
    out_specs = {spec.name: spec for spec in outputs}
    missing_in = [name for name in (INPUT_IDS, *past) if name not in in_specs]
    if missing_in:
        raise BundleError(_missing("input", missing_in))
    missing_out = [name for name in (LOGITS, *present) if name not in out_specs]
    if missing_out:
        raise BundleError(_missing("output", missing_out))
    unknown = [name for name in in_specs if name not in {INPUT_IDS, *past, *OPTIONAL_INPUTS}]
    if unknown:
        raise BundleError(f"{MODEL_ONNX} has inputs a decode loop cannot feed: {', '.join(unknown)}")
    problems = [_check_cache_tensor(in_specs[name], kv_heads, head_dim) for name in past]
    problems += [_check_cache_tensor(out_specs[name], kv_heads, head_dim) for name in present]
    ids, logits = in_specs[INPUT_IDS], out_specs[LOGITS]
    if ids.dtype != "int64" or len(ids.shape) != 2:
        problems.append(f"{INPUT_IDS} is {ids.dtype} {list(ids.shape)}, expected int64 [batch, seq]")
    if logits.dtype != "float32" or len(logits.shape) != 3:
        problems.append(
            f"{LOGITS} is {logits.dtype} {list(logits.shape)}, expected float32 [batch, seq, vocab]"
        )
    elif isinstance(logits.shape[2], int) and logits.shape[2] != vocab_size:
        problems.append(f"{LOGITS} has {logits.shape[2]} entries per token, bundle.json says {vocab_size}")
    problems = [problem for problem in problems if problem]
    if problems:
        raise BundleError(f"{MODEL_ONNX}: {problems[0]}")


def _bundle_files(path: Path) -> list[str]:
    """Relative paths of the bundle's files that the manifest covers: every regular file but
    ``bundle.json`` and hidden entries, sorted."""
    files = []
    for file in path.rglob("*"):
        relative = file.relative_to(path)
        if (
            file.is_file()
            and relative.as_posix() != BUNDLE_JSON
            and not any(part.startswith(".") for part in relative.parts)
        ):
            files.append(relative.as_posix())
    return sorted(files)


def write_bundle_info(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write ``bundle.json`` into the bundle directory ``path``: ``info``, a ``files`` manifest
    (bytes and SHA-256 of every other file, :func:`_bundle_files`) and its own checksum,
    atomically. Call it when every other file is in place."""
    path = Path(path)
    files = {
        name: {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
        for name in _bundle_files(path)
    }
    write_checked_json(path / BUNDLE_JSON, {**info, "files": files})


def _check_files(path: Path, files: dict[str, Any], full_check: bool) -> None:
    """Every file of the manifest is there with its size, and its SHA-256 where it is at most
    :data:`HASH_ON_LOAD_BYTES` (every file with ``full_check``)."""
    for name, entry in files.items():
        file = path / name
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise BundleError(f"{path / BUNDLE_JSON}: malformed files entry for {name}")
        if not file.is_file():
            raise BundleError(f"{path}: missing {name}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"{file}: truncated or altered ({size} bytes, {BUNDLE_JSON} records {entry['bytes']}): "
                "prepare the bundle again"
            )
        if (full_check or size <= HASH_ON_LOAD_BYTES) and sha256_file(file) != entry.get("sha256"):
            raise BundleError(
                f"{file}: altered (its SHA-256 is not the one {BUNDLE_JSON} records): "
                "prepare the bundle again"
            )


def _read_info(path: Path) -> dict:
    file = path / BUNDLE_JSON
    try:
        info = read_checked_json(file)
    except FileNotFoundError:
        raise BundleError(
            f"{path}: no {BUNDLE_JSON} (not a prepared bundle, or an interrupted one)"
        ) from None
    except OSError as error:
        raise BundleError(f"{file}: corrupt ({error})") from None
    except ChecksumError as error:
        raise BundleError(f"{error}: prepare the bundle again") from None
    missing = [key for key in _FIELDS if key not in info]
    if missing:
        raise BundleError(f"{file}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key, kind in _FIELDS.items():
        value = info[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BundleError(f"{file}: field {key} has the wrong type ({type(value).__name__})")
    if info["schema"] != BUNDLE_SCHEMA:
        raise BundleError(f"{file}: schema {info['schema']!r}, expected {BUNDLE_SCHEMA!r}")
    for key in _POSITIVE_FIELDS:
        if info[key] <= 0:
            raise BundleError(f"{file}: field {key} must be positive, found {info[key]}")
    if not all(isinstance(token, int) and token >= 0 for token in info["eos_token_ids"]):
        raise BundleError(f"{file}: eos_token_ids must be non-negative integers")
    return info


class TokenizerFiles:
    """The tokenizer of a model directory (``tokenizer.json`` in :attr:`path`), shared by
    :class:`ModelBundle` and :class:`~tq.models.checkpoint.Checkpoint`."""

    path: Path

    @cached_property
    def _tokenizer(self) -> tokenizers.Tokenizer:
        from tokenizers import Tokenizer

        file = self.path / TOKENIZER_JSON
        try:
            return Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises plain Exception on a bad file
            raise BundleError(f"{file}: not a readable tokenizer ({error})") from None

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The model's tokenizer (``tokenizer.json``), loaded once per object."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens the model expects (Gemma's BOS; none
        for SmolLM2)."""
        return self.tokenizer().encode(text).ids

    def decode(self, ids: Any) -> str:
        """Text of token ids (any iterable of ints), special tokens included."""
        return self.tokenizer().decode([int(token) for token in ids], skip_special_tokens=False)


@dataclass(frozen=True)
class ModelBundle(TokenizerFiles):
    """A validated model bundle. Build it with :meth:`load`.

    Attributes:
        path: the bundle directory (absolute).
        info: the parsed ``bundle.json``.
        num_layers, kv_heads, head_dim, vocab_size: the cache geometry: each layer's past is
            [batch, kv_heads, seq, head_dim] keys and the same for values; logits have
            vocab_size entries per token.
        input_names, output_names: the graph's inputs and outputs, in graph order.
        eos_token_ids: the tokens that end generation.
    """

    path: Path
    info: dict
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, path: str | os.PathLike, full_check: bool = False) -> ModelBundle:
        """Read and validate the bundle in directory ``path``: ``bundle.json`` (its checksum,
        fields and types), the presence of every required file, the files against the manifest
        (module docstring: sizes, and SHA-256 up to :data:`HASH_ON_LOAD_BYTES`, of every file
        with ``full_check``), and the ONNX graph's inputs and outputs (module docstring), which
        must also be the names ``bundle.json`` lists. Without ``full_check`` the weights are not
        read.

        Raises:
            BundleError: naming what is missing, corrupt or inconsistent.
        """
        path = Path(path).absolute()
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory")
        info = _read_info(path)
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise BundleError(f"{path}: missing {', '.join(missing)}")
        _check_files(path, info["files"], full_check)
        inputs, outputs = read_graph(path / MODEL_ONNX)
        check_graph(inputs, outputs, *(info[key] for key in _POSITIVE_FIELDS))
        input_names = tuple(spec.name for spec in inputs)
        output_names = tuple(spec.name for spec in outputs)
        if list(input_names) != info["input_names"] or list(output_names) != info["output_names"]:
            raise BundleError(
                f"{path}: the input/output names in {BUNDLE_JSON} are not those of {MODEL_ONNX} "
                "(a stale or edited bundle: prepare it again)"
            )
        return cls(
            path=path,
            info=info,
            num_layers=info["num_layers"],
            kv_heads=info["kv_heads"],
            head_dim=info["head_dim"],
            vocab_size=info["vocab_size"],
            input_names=input_names,
            output_names=output_names,
            eos_token_ids=tuple(info["eos_token_ids"]),
        )

    @property
    def name(self) -> str:
        """The model's name in records: its preset, else the directory's name."""
        return self.info.get("preset") or self.path.name

    @property
    def has_position_ids(self) -> bool:
        """Whether the graph takes ``position_ids`` [batch, seq] (past length + arange(seq))."""
        return "position_ids" in self.input_names

    @property
    def has_attention_mask(self) -> bool:
        """Whether the graph takes ``attention_mask`` [batch, past + seq] (ones, unpadded)."""
        return "attention_mask" in self.input_names

    @property
    def has_cache_position(self) -> bool:
        """Whether the graph takes ``cache_position`` [seq] (past length + arange(seq))."""
        return "cache_position" in self.input_names

    @property
    def has_use_cache_branch(self) -> bool:
        """Whether the graph takes ``use_cache_branch`` (a merged decoder's bool [1])."""
        return "use_cache_branch" in self.input_names

    def session(self, threads: int | None = None) -> onnxruntime.InferenceSession:
        """A new ONNX Runtime session on the CPU execution provider, with ``threads`` intra-op
        threads (``None``: ONNX Runtime's default, one per core) that do not spin while idle,
        and one inter-op thread."""
        import onnxruntime

        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Idle ORT threads sleep instead of spinning: between graph calls the decode loop runs
        # the cache's Numba kernels on the same cores, and spinning threads starved them (on 2
        # cores a batched quantized decode step ran at half speed, or at random speeds).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(
            str(self.path / MODEL_ONNX), sess_options=options, providers=["CPUExecutionProvider"]
        )
