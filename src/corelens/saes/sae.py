"""Sparse autoencoders with SAELens's weights, folder format, hook points and semantics.

SAELens pins ``transformer-lens<4``, so corelens cannot import its classes beside TL 4; this
module re-implements its inference SAEs (SAELens 6: ``sae_lens/saes/sae.py``,
``standard_sae.py``, ``topk_sae.py``, ``jumprelu_sae.py``) so that a folder SAELens saved loads
here and one saved here loads in SAELens:

- weights ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
  (+ ``threshold [d_sae]`` for jumprelu) in ``sae_weights.safetensors``, the config in
  ``cfg.json`` (``corelens.saes.config``);
- ``encode``: ``x -> hook_sae_input -> (normalise) - b_dec -> @ W_enc + b_enc ->
  hook_sae_acts_pre -> activation -> hook_sae_acts_post``; ``decode``: ``@ W_dec + b_dec ->
  hook_sae_recons -> (un-normalise)``;
- ``forward``: ``hook_sae_output(decode(encode(x)))``; with ``use_error_term`` the output is
  ``recons + hook_sae_error(x - recons_clean)``, the error computed without gradient and with
  the SAE's hooks off, so the forward is unchanged while hooks on the features edit it
  (corelens also adds back what that sum loses to rounding: unedited, the output is ``x`` bit
  for bit, where SAELens's is within an ulp of the reconstruction).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from corelens.errors import InputError
from corelens.saes.config import CFG_FILENAME, DTYPES, WEIGHTS_FILENAME, SAEConfig

HOOK_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output",
               "hook_sae_recons", "hook_sae_error")


class SAE(HookedRootModule):
    """A sparse autoencoder (SAELens's ``SAE``): build one with ``SAE.create(...)`` /
    ``SAE.from_config(cfg)``, read one with ``SAE.load(folder)``; the architecture picks the
    class (``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``).

    Its hook points are TransformerLens ``HookPoint``s (``sae.run_with_cache(acts)`` works on
    the SAE alone); spliced into a model (``corelens.saes.add_sae``) they are the model's too,
    as ``<hook_name>.hook_sae_acts_post`` and so on.
    """

    architecture: ClassVar[str] = ""
    _classes: ClassVar[dict[str, type["SAE"]]] = {}

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.architecture:
            SAE._classes[cls.architecture] = cls

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False) -> None:
        if cfg.architecture != self.architecture:
            raise TypeError(f"{type(self).__name__} is the {self.architecture or 'abstract'} "
                            f"SAE; a {cfg.architecture!r} config builds with "
                            "SAE.from_config(cfg)")
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        self._init_weights(DTYPES[str(cfg.dtype)], torch.device(cfg.device))
        for name in HOOK_POINTS:
            setattr(self, name, HookPoint())
        self._hooks_on = True
        self._norm: dict[str, Tensor] = {}  # the last encode's normalisation statistics
        self._d_head: int | None = None  # hook_z: the head width of the last input
        self.setup()

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: SAEConfig, use_error_term: bool = False) -> "SAE":
        """The SAE of ``cfg.architecture`` (SAELens's initialisation: ``W_dec`` Kaiming-uniform,
        ``W_enc = W_dec.T``, zero biases and thresholds)."""
        return SAE._classes[cfg.architecture](cfg, use_error_term)

    @classmethod
    def create(cls, d_in: int, d_sae: int, hook_name: str | None = None,
               architecture: str = "standard", **cfg: Any) -> "SAE":
        """A new SAE: ``SAE.create(128, 512, "blocks.1.hook_resid_post", "topk", k=8)``
        (further ``SAEConfig`` fields as keywords)."""
        meta = dict(cfg.pop("metadata", None) or {})
        if hook_name is not None:
            meta["hook_name"] = hook_name
        return cls.from_config(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture,
                                         metadata=meta, **cfg))

    def _init_weights(self, dtype: torch.dtype, device: torch.device) -> None:
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        w_dec = torch.empty(d_sae, d_in, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(w_dec)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # --- the computation ---------------------------------------------------------------------
    def _hook(self, point: HookPoint, x: Tensor) -> Tensor:
        return point(x) if self._hooks_on else x

    @contextmanager
    def hooks_disabled(self) -> Iterator[None]:
        """Within the block the SAE's hook points pass through (their hooks do not fire)."""
        before, self._hooks_on = self._hooks_on, False
        try:
            yield
        finally:
            self._hooks_on = before

    def process_sae_in(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """The input as the encoder sees it: cast to the SAE's dtype, flattened (``hook_z``),
        through ``hook_sae_input``, normalised, minus ``b_dec`` (``apply_b_dec_to_input``)."""
        x = x.to(self.dtype)
        if self.cfg.reshape_activations == "hook_z":
            self._d_head = x.shape[-1]
            x = x.flatten(-2)
        x = self._norm_in(self._hook(self.hook_sae_input, x))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def hidden_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """The encoder's pre-activation (through ``hook_sae_acts_pre``)."""
        return self._hook(self.hook_sae_acts_pre, self.process_sae_in(x) @ self.W_enc
                          + self.b_enc)

    def activation(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The architecture's activation function (ReLU here)."""
        return torch.relu(hidden_pre)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of ``x`` (through ``hook_sae_acts_post``)."""
        return self._hook(self.hook_sae_acts_post, self.activation(self.hidden_pre(x)))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """The reconstruction of feature activations (through ``hook_sae_recons``), in the
        input's space (normalisation undone, ``hook_z`` heads restored)."""
        out = self._hook(self.hook_sae_recons, feature_acts @ self.W_dec + self.b_dec)
        out = self._norm_out(out)
        if self.cfg.reshape_activations == "hook_z" and self._d_head is not None:
            out = out.unflatten(-1, (-1, self._d_head))
        return out

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """``decode(encode(x))``; with ``use_error_term``, plus the SAE's error on ``x`` (so the
        output is ``x`` itself until a hook edits the features)."""
        sae_out = self.decode(self.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                with self.hooks_disabled():
                    clean = self.decode(self.encode(x))
                sae_error = self._hook(self.hook_sae_error, x - clean)
                # what clean + (x - clean) loses to rounding (~ an ulp of the reconstruction):
                # added too, so that unedited features give x back bit for bit
                rounding = x - (clean + (x - clean))
            sae_out = sae_out + sae_error + rounding
        return self._hook(self.hook_sae_output, sae_out)

    def _norm_in(self, x: Tensor) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            self._norm = {"coeff": (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)}
            return x * self._norm["coeff"]
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self._norm = {"mu": mu, "std": std}
            return x / (std + 1e-5)
        return x

    def _norm_out(self, x: Tensor) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode not in ("constant_norm_rescale", "layer_norm"):
            return x
        if not self._norm:
            raise InputError(f"a {mode!r} SAE decodes with the statistics of its last encode: "
                             "call encode (or the SAE itself) first")
        if mode == "constant_norm_rescale":
            return x / self._norm["coeff"]
        return x * self._norm["std"] + self._norm["mu"]

    # --- the folder --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` into ``folder`` (SAELens's
        ``save_model``); returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        self.cfg.device = str(self.device)
        weights = folder / WEIGHTS_FILENAME
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(weights))
        cfg = folder / CFG_FILENAME
        cfg.write_text(json.dumps(self.cfg.to_dict(), indent=2))
        return weights, cfg

    save_model = save

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu",
             dtype: str | torch.dtype | None = None) -> "SAE":
        """Read a SAELens-format SAE folder (``cfg.json`` + ``sae_weights.safetensors``, any
        SAELens version's config) onto ``device``, in ``dtype`` (default: the config's)."""
        folder = Path(folder)
        missing = [n for n in (CFG_FILENAME, WEIGHTS_FILENAME) if not (folder / n).is_file()]
        if missing:
            raise InputError(f"{str(folder)!r} is not an SAE folder: it lacks "
                             f"{', '.join(missing)} (SAELens's format)")
        cfg_dict = json.loads((folder / CFG_FILENAME).read_text())
        cfg_dict["device"] = str(device)
        if dtype is not None:
            cfg_dict["dtype"] = str(dtype).removeprefix("torch.")
        cfg = SAEConfig.from_dict(cfg_dict)
        state = _read_weights(folder / WEIGHTS_FILENAME, DTYPES[cfg.dtype], str(device))
        sae = cls.from_config(cfg)
        if not isinstance(sae, cls):
            raise InputError(f"{str(folder)!r} holds a {cfg.architecture} SAE, not a "
                             f"{cls.__name__}: load it with SAE.load")
        try:
            sae.load_state_dict(state)
        except RuntimeError as e:
            raise InputError(f"the weights in {str(folder)!r} do not fit its cfg.json "
                             f"({cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae}): "
                             f"{e}") from None
        return sae

    load_from_disk = load


def _read_weights(path: Path, dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    """SAELens's ``read_sae_components_from_disk``: every tensor cast to the config's dtype;
    a pre-6 all-ones ``scaling_factor`` dropped; a ``log_threshold`` read as ``threshold``."""
    with safe_open(str(path), framework="pt", device=device) as f:
        state = {k: f.get_tensor(k).to(dtype=dtype) for k in f.keys()}  # noqa: SIM118
    scale = state.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise InputError(f"{str(path)!r} holds a fine-tuning scaling_factor that is not all "
                         "ones; SAELens 6 does not read such SAEs and neither does corelens")
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").exp()
    return state


class StandardSAE(SAE):
    """SAELens's ``standard`` SAE: ReLU features."""

    architecture = "standard"


class TopKSAE(SAE):
    """SAELens's ``topk`` SAE: the ``k`` largest pre-activations, ReLU'd, the rest zero
    (``rescale_acts_by_decoder_norm``: ranked by pre-activation x decoder-row norm, and divided
    by that norm again before decoding)."""

    architecture = "topk"

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        pre = self.hidden_pre(x)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return self._hook(self.hook_sae_acts_post, self.activation(pre))

    def activation(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        values, indices = torch.topk(hidden_pre, k=int(self.cfg.k or 0), dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts / self.W_dec.norm(dim=-1)
        return super().decode(feature_acts)


class JumpReLUSAE(SAE):
    """SAELens's ``jumprelu`` SAE: a feature is its ReLU'd pre-activation where that exceeds
    the feature's ``threshold``, else zero (BatchTopK SAEs are saved in this form)."""

    architecture = "jumprelu"
    threshold: nn.Parameter

    def _init_weights(self, dtype: torch.dtype, device: torch.device) -> None:
        super()._init_weights(dtype, device)
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=dtype, device=device))

    def activation(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        acts = torch.relu(hidden_pre)
        return acts * (hidden_pre > self.threshold).to(acts.dtype)
