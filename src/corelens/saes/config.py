"""An SAE's configuration, read and written as SAELens's ``cfg.json``.

SAELens 6 (``sae_lens/saes/sae.py``: ``SAEConfig.to_dict``, ``save_model``) writes the inference
fields at the top level -- ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, plus ``k`` and
``rescale_acts_by_decoder_norm`` for ``topk`` -- the ``architecture``, and everything about how
the SAE was made (``hook_name``, ``model_name``, ``sae_lens_version``, ...) under ``metadata``.
Folders written before 6.0 keep those at the top level, some under older names (``hook_point``,
``activation_fn_str``, ``activation_fn_kwargs: {"k": ...}``, a boolean ``normalize_activations``):
``SAEConfig.from_dict`` reads both, as SAELens's ``handle_config_defaulting`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from corelens.errors import InputError

CFG_FILENAME = "cfg.json"  # SAELens's SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's SAE_WEIGHTS_FILENAME
# written as metadata.sae_lens_version: the format this module follows (SAELens treats a folder
# without a version >= 6 as pre-6 and rebuilds its metadata from top-level keys)
SAELENS_FORMAT_VERSION = "6.0.0"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16")}
DTYPES.update({f"torch.{name}": dtype for name, dtype in list(DTYPES.items())})
# SAELens's LLM_METADATA_KEYS: the top-level keys of a pre-6 cfg.json that 6.x moves to metadata
METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index",
                 "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
                 "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                 "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                 "hook_head_index_out")


class SAEMetadata(dict):
    """How the SAE was made (``hook_name``, ``model_name``, ...): a dict that also reads as
    attributes, a missing one as None (``sae.cfg.metadata.hook_name``, as in SAELens)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


@dataclass
class SAEConfig:
    """SAELens's ``SAEConfig`` (with ``TopKSAEConfig``'s two fields): the architecture, the
    sizes, and how an activation is prepared before encoding.

    ``normalize_activations``: ``"none"`` and ``"expected_average_only_in"`` leave the input as
    is (SAELens folds the latter's scale into the weights when it knows it);
    ``"constant_norm_rescale"`` scales each input to norm ``sqrt(d_in)`` and the output back;
    ``"layer_norm"`` standardises each input and undoes it on the output.
    ``reshape_activations="hook_z"`` flattens ``[..., head, d_head]`` to ``[..., d_in]``.
    """

    d_in: int
    d_sae: int
    architecture: str = "standard"
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None  # topk: features kept per input (SAELens's default: 100)
    rescale_acts_by_decoder_norm: bool = False  # topk: rank by pre-activation x |W_dec row|
    metadata: SAEMetadata = field(default_factory=SAEMetadata)

    def __post_init__(self) -> None:
        self.metadata = SAEMetadata(self.metadata or {})
        for key in ("sae_lens_version", "sae_lens_training_version"):  # as SAELens's defaults
            self.metadata.setdefault(key, SAELENS_FORMAT_VERSION)
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"SAE architecture {self.architecture!r} is not supported; "
                             f"corelens reads {', '.join(ARCHITECTURES)} (a BatchTopK SAE is "
                             "saved by SAELens as jumprelu)")
        if self.normalize_activations not in NORMALIZATIONS:
            raise InputError(f"normalize_activations must be one of {NORMALIZATIONS}, not "
                             f"{self.normalize_activations!r}")
        if self.reshape_activations not in RESHAPES:
            raise InputError(f"reshape_activations must be one of {RESHAPES}, not "
                             f"{self.reshape_activations!r}")
        if str(self.dtype) not in DTYPES:
            raise InputError(f"SAE dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.architecture == "topk":
            self.k = 100 if self.k is None else int(self.k)
            if not 0 < self.k <= self.d_sae:
                raise InputError(f"a topk SAE keeps k features of d_sae={self.d_sae}: k must be "
                                 f"in 1..{self.d_sae}, not {self.k}")

    @property
    def hook_name(self) -> str | None:
        """The hook point the SAE reads (``metadata.hook_name``)."""
        return self.metadata.get("hook_name")

    @hook_name.setter
    def hook_name(self, name: str | None) -> None:
        self.metadata["hook_name"] = name

    def to_dict(self) -> dict[str, Any]:
        """``cfg.json``'s content, as SAELens 6 writes it."""
        out: dict[str, Any] = {
            "d_in": self.d_in, "d_sae": self.d_sae, "dtype": str(self.dtype),
            "device": str(self.device), "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
        }
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        meta = dict(self.metadata)
        for key in ("sae_lens_version", "sae_lens_training_version"):
            if _major(meta.get(key)) < 6:  # the content is 6.x's, whatever it was read from
                meta[key] = SAELENS_FORMAT_VERSION
        out["metadata"] = meta
        out["architecture"] = self.architecture
        return out

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "SAEConfig":
        """Read a ``cfg.json`` of any SAELens version (keys a config does not use are
        dropped, as SAELens drops them)."""
        cfg = dict(cfg)
        meta = dict(cfg.get("metadata") or {})
        if _major(cfg.get("sae_lens_version") or meta.get("sae_lens_version")) < 6:
            cfg, meta = _from_pre_6(cfg)
        elif not meta.get("hook_name") and cfg.get("hook_name"):
            meta["hook_name"] = cfg["hook_name"]  # hand-written: accept it at the top too
        try:
            return cls(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]),
                       architecture=cfg.get("architecture", "standard"),
                       dtype=str(cfg.get("dtype", "float32")),
                       device=str(cfg.get("device", "cpu")),
                       apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                       normalize_activations=cfg.get("normalize_activations") or "none",
                       reshape_activations=cfg.get("reshape_activations") or "none",
                       k=cfg.get("k"),
                       rescale_acts_by_decoder_norm=bool(
                           cfg.get("rescale_acts_by_decoder_norm", False)),
                       metadata=SAEMetadata(meta))
        except KeyError as e:
            raise InputError(f"this SAE config lacks {e.args[0]!r} (SAELens's cfg.json has "
                             "d_in and d_sae)") from None


def _major(version: Any) -> int:
    """The major number of a version string ("6.18.0" -> 6); 0 where there is none."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _from_pre_6(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens's ``handle_pre_6_0_config``: old key names, defaults, metadata from the top."""
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    new = {renames.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    new.setdefault("reshape_activations",
                   "hook_z" if "hook_z" in (new.get("hook_name") or "") else "none")
    fn = new.get("activation_fn") or "relu"
    k = (new.get("activation_fn_kwargs") or {}).get("k")
    if fn == "topk" and k is not None:
        new["architecture"], new["k"] = "topk", k
    elif fn not in ("relu", "topk") and new["architecture"] == "standard":
        # SAELens 6 silently runs these as ReLU; a different function is a different SAE
        raise InputError(f"this pre-6.0 SAELens config uses activation_fn {fn!r}; corelens "
                         "reads relu and topk SAEs of that format")
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    meta = {k: v for k, v in new.items() if k in METADATA_KEYS}
    meta.update(cfg.get("metadata") or {})
    return new, meta
