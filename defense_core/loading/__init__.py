"""Safe model loading: safetensors, ``weights_only`` state dicts, exported programs, TorchScript.

Model files come from strangers. Nothing here ever runs a general unpickler:

* **safetensors**: the JSON header is size-checked before it is read, then the
  library maps the tensors.
* **state dict** (``torch.save`` zip, or the legacy non-zip format): read only
  with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
  containers and refuses every other class. A dict that keeps the weights
  under ``"state_dict"`` or ``"model"`` is unwrapped, and a DataParallel
  ``module.`` prefix stripped.
* **torch.export** (``.pt2`` from ``torch.export.save``), for custom
  architectures, only when the spec says ``arch == "torch_export"``. Not
  through ``torch.export.load``, which in torch 2.14 unpickles payloads marked
  ``use_pickle`` (``weights_only=False``), custom and opaque objects, and the
  sample inputs (``weights_only=True`` with a fallback to ``False`` when that
  fails); hands every symbolic shape string to ``sympy.sympify`` (``eval``);
  imports the modules a pytree spec names; and ``ep.module()`` compiles the
  archive's ``guards_code`` strings into Python that runs on every call.
  Here the archive's members are checked against the layout torch writes,
  the weights and constants are rebuilt from their raw bytes (a payload that
  would need pickle is refused), the program JSON is checked by
  :func:`~defense_core.opcheck.scan_serialized_program` and stripped of guard
  code and node metadata that names Python objects, and only then handed to
  torch's deserializer, without sample inputs. The loaded program is checked
  again (:func:`~defense_core.opcheck.check_exported_program`) and turned into
  a trainable module (:func:`module_from_exported_program`).
* **TorchScript** (deprecated): only when ``arch == "torchscript"``; the
  archive's code is scanned before it is loaded
  (:func:`~defense_core.opcheck.scan_torchscript_archive`; ``torch.jit.load``
  runs ``__setstate__``) and every compiled function is checked after
  (:func:`~defense_core.opcheck.check_scripted_module`).

The format is sniffed from the bytes, never from the file name. Anything
else (a plain pickle, a whole pickled ``nn.Module``) raises
:class:`UnsafeModelError` telling the user how to save a loadable file.

Modules: :mod:`~defense_core.loading.formats` (sniffing, size bounds),
:mod:`~defense_core.loading.state_dict` (safetensors, ``torch.save``),
:mod:`~defense_core.loading.export_archive` (``.pt2`` archives),
:mod:`~defense_core.loading.export_module` (an exported program as a
trainable module), :mod:`~defense_core.loading.models` (:func:`load_model`,
:func:`inspect_model_file`) and :mod:`~defense_core.loading.saving`.
"""

from defense_core.loading.export_archive import (
    MAX_PROGRAM_JSON_BYTES,
)
from defense_core.loading.export_module import (
    ExportedDropout,
    module_from_exported_program,
)
from defense_core.loading.formats import (
    DEFAULT_MAX_MODEL_BYTES,
    MAX_SAFETENSORS_HEADER_BYTES,
    MAX_TENSORS,
    MAX_ZIP_MEMBERS,
    SAFETENSORS,
    STATE_DICT,
    TORCH_EXPORT,
    TORCHSCRIPT,
    sniff_model_format,
)
from defense_core.loading.models import (
    INSPECT_BATCH,
    INSPECT_SEED,
    MAX_REPORTED_NAMES,
    ModelFileInfo,
    inspect_model_file,
    load_model,
    probe_inputs,
)
from defense_core.loading.saving import (
    save_safetensors,
)
from defense_core.loading.state_dict import (
    read_state_dict,
)

__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "INSPECT_BATCH",
    "INSPECT_SEED",
    "MAX_PROGRAM_JSON_BYTES",
    "MAX_REPORTED_NAMES",
    "MAX_SAFETENSORS_HEADER_BYTES",
    "MAX_TENSORS",
    "MAX_ZIP_MEMBERS",
    "SAFETENSORS",
    "STATE_DICT",
    "TORCHSCRIPT",
    "TORCH_EXPORT",
    "ExportedDropout",
    "ModelFileInfo",
    "inspect_model_file",
    "load_model",
    "module_from_exported_program",
    "probe_inputs",
    "read_state_dict",
    "save_safetensors",
    "sniff_model_format",
]
