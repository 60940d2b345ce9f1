"""Train a ``corelens.saes.sae.SAE`` on an MLLM's activations (``ActivationStore``).

Why not SAELens's trainer: SAELens pins ``transformer-lens<4`` and corelens runs on
TransformerLens 4 (``TransformerBridge``), so ``import sae_lens`` fails beside it; and its
``ActivationsStore`` feeds the model tokens only, which on an MLLM would run without the image
(``corelens.saes.store`` explains). This module is the smallest trainer that reproduces SAELens
6's objectives and defaults for the two architectures:

* ``standard`` (``sae_lens/saes/standard_sae.py``, ``StandardTrainingSAE.calculate_aux_loss``):
  loss = MSE + ``l1_coefficient`` * mean over tokens of sum_i |f_i| * ||W_dec[i]||, the
  coefficient warmed up linearly over ``l1_warm_up_steps`` (``CoefficientScheduler``,
  ``sae_lens/training/optim.py``; default 0, ``l1_coefficient`` default 1.0).
* ``topk`` (``sae_lens/saes/topk_sae.py``, ``TopKTrainingSAE``): the ``k`` largest
  pre-activations (ranked after scaling by ||W_dec[i]||: ``rescale_acts_by_decoder_norm=True``),
  ReLU'd; loss = MSE + ``aux_loss_coefficient`` (1.0) * the AuxK loss of the dead features
  (``calculate_topk_aux_loss``: the top ``d_in // 2`` dead pre-activations reconstruct the
  residual, scaled by min(n_dead / (d_in // 2), 1)). The saved SAE has the decoder norms folded
  in (``_fold_norm_topk``), as SAELens saves it.
* Shared (``sae_lens/saes/sae.py`` ``TrainingSAE``, ``sae_lens/training/sae_trainer.py``
  ``SAETrainer``, ``sae_lens/config.py`` defaults): MSE = squared error summed over ``d_in``,
  mean over tokens; init ``W_dec`` Kaiming-uniform with rows scaled to norm 0.1
  (``decoder_init_norm``), ``W_enc = W_dec.T``, zero biases; Adam (lr 3e-4, betas 0.9 /
  0.999); gradient norm clipped to 1.0; the learning rate from ``get_lr_scheduler`` (linear
  warm-up from lr / warm_up over ``lr_warm_up_steps``, then ``constant`` or ``cosineannealing``
  to ``lr_end`` = lr / 10, then a linear decay to 0 over ``lr_decay_steps``; defaults 0, 0,
  constant); dead features = not fired for ``dead_feature_window`` (1000) steps, firing
  frequencies reset every ``feature_sampling_window`` (2000) steps;
  ``normalize_activations="expected_average_only_in"`` scales inputs by sqrt(d_in) / mean norm
  (``ActivationScaler``, estimated here on the first ``n_norm_batches`` training batches,
  which are then trained on as well) and folds the factor into the weights at the end.

Not reproduced: autocast, wandb logging, sparse activations, the other architectures.

Resumable: with ``checkpoint=folder`` the SAE, Adam, the schedulers, the feature statistics and
the store's position are written every ``checkpoint_every`` steps (``step_<n>/``, pointed to by
``latest.json``, written last); a rerun with the same arguments goes on from there, and -- the
store replaying its shuffle -- ends with the same SAE as an uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from corelens.errors import InputError
from corelens.saes.sae import SAE
from corelens.saes.store import ActivationBatch, ActivationStore

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainResult:
    """The trained SAE, the steps done, the loss of each step run here, the held-out metrics."""

    sae: SAE
    steps: int
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------- SAELens's schedules
def lr_scheduler(optimizer: torch.optim.Optimizer, steps: int, lr: float, warm_up_steps: int,
                 decay_steps: int, lr_end: float, name: str = "constant") -> Any:
    """SAELens's ``get_lr_scheduler`` (``sae_lens/training/optim.py``)."""
    from torch.optim import lr_scheduler as sched

    main_steps = steps - warm_up_steps - decay_steps
    if name == "constant":
        main: Any = sched.LambdaLR(optimizer, lr_lambda=lambda _: 1.0)
        lr_end = lr
    elif name == "cosineannealing":
        main = sched.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=lr_end)
    else:
        raise InputError(f"lr_scheduler {name!r}: use 'constant' or 'cosineannealing'")
    parts, milestones = [], []
    if warm_up_steps > 0:
        parts.append(sched.LinearLR(optimizer, start_factor=1 / warm_up_steps, end_factor=1.0,
                                    total_iters=warm_up_steps - 1))
        milestones.append(warm_up_steps)
    parts.append(main)
    if decay_steps > 0:
        parts.append(sched.LinearLR(optimizer, start_factor=lr_end / lr, end_factor=0.0,
                                    total_iters=decay_steps))
        milestones.append(steps - decay_steps)
    return sched.SequentialLR(optimizer, schedulers=parts, milestones=milestones)


def coefficient(final: float, warm_up_steps: int, step: int) -> float:
    """SAELens's ``CoefficientScheduler`` value at ``step`` (0-based)."""
    if warm_up_steps <= 0 or step >= warm_up_steps:
        return final
    return final * step / warm_up_steps if step else 0.0


# ------------------------------------------------------------------------------- the forward
def forward(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(features, hidden_pre, reconstruction) as SAELens's ``encode_with_hidden_pre`` /
    ``decode`` give them (topk: hidden_pre after the decoder-norm scaling)."""
    pre = sae.hidden_pre(x)
    if sae.cfg.architecture == "topk" and sae.cfg.rescale_acts_by_decoder_norm:
        pre = pre * sae.W_dec.norm(dim=-1)
    feats = sae.activation(pre)
    return feats, pre, sae.decode(feats)


def topk_aux_loss(sae: SAE, x: Tensor, out: Tensor, pre: Tensor, dead: Tensor) -> Tensor:
    """SAELens's ``TopKTrainingSAE.calculate_topk_aux_loss`` (coefficient 1.0)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return out.new_tensor(0.0)
    residual = (x - out).detach()
    k_aux = x.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    top = torch.where(dead[None], pre, -torch.inf).topk(k_aux, sorted=False)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return scale * (sae.decode(acts) - residual).pow(2).sum(-1).mean()


def _rows(item: Any) -> Tensor:
    return item.acts if isinstance(item, ActivationBatch) else item


@torch.no_grad()
def evaluate(sae: SAE, data: ActivationStore | Iterable[Any], scale: float = 1.0
             ) -> dict[str, float]:
    """Explained variance (SAELens's: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2), L0 (mean
    nonzero features per token), MSE per token and the fraction of features that never fire,
    over ``data``: a store (its ``batches()``: every token once, state untouched), or an
    iterable of ``ActivationBatch`` / tensors."""
    sae.eval()
    it = data.batches() if isinstance(data, ActivationStore) else data
    n, sq, s, err, l0 = 0, 0.0, None, 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    for item in it:
        x = _rows(item).to(sae.device, sae.dtype) * scale
        feats, _, out = forward(sae, x)
        x64 = x.double()
        n += len(x)
        sq += float(x64.pow(2).sum())
        s = x64.sum(0) if s is None else s + x64.sum(0)
        err += float((out.double() - x64).pow(2).sum())
        l0 += float((feats != 0).sum())
        fired |= (feats != 0).any(0)
    if not n or s is None:
        raise InputError("no activations to evaluate on")
    total = sq - float(s.pow(2).sum()) / n
    return {"explained_variance": 1 - err / total, "l0": l0 / n, "mse": err / n,
            "dead_fraction": 1 - float(fired.float().mean()), "tokens": float(n)}


# --------------------------------------------------------------------------------- the trainer
def _new_sae(d_in: int, d_sae: int, architecture: str, k: int | None, store: ActivationStore,
             seed: int, device: Any) -> SAE:
    kw: dict[str, Any] = {"k": k, "rescale_acts_by_decoder_norm": True} \
        if architecture == "topk" else {}
    kw["metadata"] = {"model_name": getattr(getattr(store.model, "cfg", None), "model_name",
                                            None), "token_roles": list(store.roles)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = SAE.create(d_in, d_sae, store.hook_name, architecture, **kw)
    with torch.no_grad():  # SAELens's decoder_init_norm = 0.1
        sae.W_dec.mul_(0.1 / sae.W_dec.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae.to(device) if device is not None else sae


def _fold(sae: SAE, scale: float | None) -> None:
    """Fold the input scaling (``fold_activation_norm_scaling_factor``) and, for top-k, the
    decoder norms (``_fold_norm_topk``) into the weights, as SAELens saves them."""
    with torch.no_grad():
        if scale is not None:
            sae.W_enc.mul_(scale)
            sae.W_dec.div_(scale)
            sae.b_dec.div_(scale)
        if sae.cfg.architecture == "topk" and sae.cfg.rescale_acts_by_decoder_norm:
            norm = sae.W_dec.norm(dim=-1)
            sae.b_enc.mul_(norm)
            sae.W_enc.mul_(norm[None])
            sae.W_dec.div_(norm[:, None])


def _latest(folder: Path) -> Path | None:
    ptr = folder / "latest.json"
    if not ptr.is_file():
        return None
    return folder / json.loads(ptr.read_text())["step_dir"]


def train_sae(store: ActivationStore, d_sae: int, architecture: str = "standard", *,
              k: int | None = None, l1_coefficient: float = 1.0, l1_warm_up_steps: int = 0,
              lr: float = 3e-4, lr_warm_up_steps: int = 0, lr_decay_steps: int = 0,
              lr_scheduler_name: str = "constant", lr_end: float | None = None,
              adam_betas: tuple[float, float] = (0.9, 0.999), steps: int = 1000,
              normalize_activations: str = "none", n_norm_batches: int = 10,
              dead_feature_window: int = 1000, feature_sampling_window: int = 2000,
              checkpoint: str | Path | None = None, checkpoint_every: int = 1000,
              eval_store: ActivationStore | Iterable[Any] | None = None, seed: int = 0,
              device: Any = None, progress: bool = True,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train an SAE of ``d_sae`` features on ``store``'s activations for ``steps`` steps (one
    out-batch each) with SAELens's objective (see the module doc). ``eval_store``: held-out
    activations (other examples) for ``evaluate``'s metrics at the end. ``on_step(step,
    losses)`` is called after each step. Returns a ``TrainResult``; with ``checkpoint``, also
    writes the final SAE (SAELens's folder format) to ``<checkpoint>/sae`` and the metrics to
    ``<checkpoint>/metrics.json``."""
    if architecture not in ("standard", "topk"):
        raise InputError(f"train_sae trains 'standard' and 'topk' SAEs, not {architecture!r}")
    if architecture == "topk" and k is None:
        raise InputError("a topk SAE needs k (features active per token)")
    if normalize_activations not in ("none", "expected_average_only_in"):
        raise InputError("normalize_activations: 'none' or 'expected_average_only_in'")
    t0 = time.perf_counter()
    run = {"d_sae": d_sae, "architecture": architecture, "k": k, "l1": l1_coefficient,
           "l1_warm_up_steps": l1_warm_up_steps, "lr": lr, "lr_warm_up_steps": lr_warm_up_steps,
           "lr_decay_steps": lr_decay_steps, "lr_scheduler": lr_scheduler_name,
           "steps": steps, "normalize": normalize_activations, "seed": seed,
           "store": store.run}
    folder = Path(checkpoint) if checkpoint is not None else None
    saved = _latest(folder) if folder is not None else None
    state = torch.load(saved / STATE_FILE, weights_only=False) if saved else None
    if state is not None and state["run"] != run:
        raise ValueError(f"{folder} holds a checkpoint of another run ({state['run']}; this "
                         f"run: {run}): use a new folder")

    if folder is not None and state is None:  # the store's position when this run began
        start = folder / "store_start.json"
        if start.is_file():
            store.load_state_dict(json.loads(start.read_text()))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            start.write_text(json.dumps(store.state_dict()))
    data = iter(store)
    head: list[Tensor] = []  # batches read to estimate the scale, trained on first
    scale: float | None = None
    if state is not None:
        sae = SAE.load(saved / "sae", device=device or "cpu")
        scale = state["scale"]
        store.load_state_dict(state["store"])
        data = iter(store)
    else:
        first = next(data, None)
        if first is None:
            raise InputError("the store holds no activations (already consumed? give it a "
                             "fresh partial path, or epochs=None)")
        head.append(first.acts)
        sae = _new_sae(first.acts.shape[-1], d_sae, architecture, k, store, seed, device)
        if normalize_activations == "expected_average_only_in":
            head += [b.acts for _, b in zip(range(n_norm_batches - 1), data)]
            norms = [float(h.norm(dim=-1).mean()) for h in head]
            scale = sae.cfg.d_in ** 0.5 / (sum(norms) / len(norms))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=adam_betas)
    sched = lr_scheduler(opt, steps, lr, lr_warm_up_steps, lr_decay_steps,
                         lr / 10 if lr_end is None else lr_end, lr_scheduler_name)
    d_sae_dev = sae.device
    freq = torch.zeros(d_sae, device=d_sae_dev)
    since_fired = torch.zeros(d_sae, device=d_sae_dev)
    n_freq, step = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        freq, since_fired = state["act_freq"].to(d_sae_dev), state["since_fired"].to(d_sae_dev)
        n_freq, step = state["n_freq"], state["step"]

    def save_checkpoint() -> None:
        assert folder is not None
        step_dir = folder / f"step_{step}"
        if step_dir.exists():
            shutil.rmtree(step_dir)
        sae.save(step_dir / "sae")
        torch.save({"run": run, "step": step, "scale": scale, "optimizer": opt.state_dict(),
                    "lr_scheduler": sched.state_dict(), "act_freq": freq.cpu(),
                    "since_fired": since_fired.cpu(), "n_freq": n_freq,
                    "store": store.state_dict()}, step_dir / STATE_FILE)
        old = _latest(folder)
        tmp = folder / "latest.json.tmp"
        tmp.write_text(json.dumps({"step_dir": step_dir.name, "step": step}))
        os.replace(tmp, folder / "latest.json")  # the checkpoint counts once this is written
        if old is not None and old != step_dir and old.exists():
            shutil.rmtree(old)

    losses: list[float] = []
    bar = tqdm(total=steps, initial=step, desc=f"train {architecture} SAE", unit="step",
               disable=not progress)
    try:
        while step < steps:
            if head:
                x = head.pop(0)
            else:
                item = next(data, None)
                if item is None:
                    raise InputError(f"the store ran out after {step} steps: give it "
                                     "epochs=None (cycle) or more examples")
                x = item.acts
            x = x.to(sae.device, sae.dtype) * (scale or 1.0)
            if (step + 1) % feature_sampling_window == 0:
                freq.zero_()
                n_freq = 0
            sae.train()
            feats, pre, out = forward(sae, x)
            mse = (out - x).pow(2).sum(-1).mean()
            if architecture == "standard":
                c = coefficient(l1_coefficient, l1_warm_up_steps, step)
                aux = c * (feats * sae.W_dec.norm(dim=1)).norm(p=1, dim=-1).mean()
            else:
                aux = topk_aux_loss(sae, x, out, pre, since_fired > dead_feature_window)
            loss = mse + aux
            with torch.no_grad():
                fired = feats != 0
                since_fired += 1
                since_fired[fired.any(0)] = 0
                freq += fired.sum(0)
                n_freq += len(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            logs = {"loss": losses[-1], "mse": float(mse.detach()), "aux": float(aux.detach()),
                    "l0": float(fired.sum(-1).float().mean())}
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", l0=f"{logs['l0']:.1f}")
            if folder is not None and (step % checkpoint_every == 0 or step == steps):
                save_checkpoint()
            if on_step is not None:
                on_step(step, logs)
    finally:
        bar.close()
    final = sae
    _fold(final, scale)
    metrics: dict[str, float] = {}
    if eval_store is not None:
        metrics = evaluate(final, eval_store)
    metrics["dead_fraction_train"] = float((since_fired > dead_feature_window).float().mean())
    if folder is not None:
        final.save(folder / "sae")
        (folder / "metrics.json").write_text(json.dumps({"steps": step, **metrics}, indent=2))
    return TrainResult(final, step, losses, metrics, time.perf_counter() - t0)
