"""One training step, as lean as plain PyTorch: the ELBO and its gradients, then a single fused
``torch.optim.Adam`` over every parameter at once.

    loss = the ELBO of the Pyro model (minus it, summed over the batch), by default computed directly from
           the model's and guide's distributions (:mod:`pyro_vae.inference.direct`; the same estimator as
           Pyro's on the same noise), compiled with torch.compile for runs long enough to repay its
           compilation; with --elbo pyro, Pyro's ELBO (Trace_ELBO, ...; compiled with torch.jit where
           :func:`~pyro_vae.inference.objectives.why_not_compiled` allows)
    with --optimizer adam-normgrad: each gradient divided by its L2 norm (the VampPrior code's AdamNormGrad)
    clamp every gradient element to [-clip_norm, clip_norm]  (one fused pass; as Pyro's ClippedAdam)
    Adam step over all parameters (fused: one kernel for every tensor), gradients set to None
    after each epoch: the learning-rate schedule (constant, reduce-on-plateau, cosine)

This is Pyro's ELBO-as-a-loss idiom (``Trace_ELBO()(model, guide)`` with one torch optimizer) rather than
``SVI`` with a ``PyroOptim``, which keeps one optimizer per parameter and steps them one by one.
"""

from __future__ import annotations

import warnings

import pyro
import torch

from ..config import Config
from ..errors import PyroVAEError
from ..seeding import seeded
from .direct import DirectELBO, why_not_direct
from .objectives import KLWeight, kl_weighted, make_elbo, why_not_compiled

SCHEDULES = ("constant", "plateau", "cosine")
"""The learning-rate schedules ``--lr-schedule`` names."""

COMPILE_MIN_STEPS = 30_000
"""Training steps from which torch.compile of the direct ELBO repays its compilation: on this project's
2-core CPU it compiled in 25-45 s and then saved 1.3-3.8 ms a step (benchmarks/README.md)."""


def make_schedule(config: Config, optim: torch.optim.Optimizer):
    """The learning-rate schedule of ``config`` on ``optim`` (None for a constant rate):

    ``plateau``  multiply the rate by ``lr_factor`` after ``lr_patience`` epochs without a better
                 validation score (``torch.optim.lr_scheduler.ReduceLROnPlateau``, mode max), down to ``lr_min``
    ``cosine``   anneal from ``lr`` to ``lr_min`` over ``epochs`` epochs (``CosineAnnealingLR``)"""
    if config.lr_schedule == "constant":
        return None
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode="max", factor=config.lr_factor,
                                                          patience=config.lr_patience, min_lr=config.lr_min)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=config.epochs, eta_min=config.lr_min)
    raise PyroVAEError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")


class TrainingStep:
    """The training step of a VAE under ``config``: ``step(x)`` is one mini-batch, ``end_epoch(score)``
    moves the learning-rate schedule, ``state_dict()`` is what a checkpoint keeps.

    Which ELBO computes the loss: ``direct`` (a :class:`~pyro_vae.inference.direct.DirectELBO`) unless
    ``config.elbo == "pyro"`` or :func:`~pyro_vae.inference.direct.why_not_direct` says it does not apply
    (``not_direct`` says why), else Pyro's (``elbo``). ``elbo_name`` names the one that runs, ``compiler``
    what compiles it (torch.compile, torch.jit or None) and ``not_compiled`` why nothing does.

    Compiling: ``jit=None`` follows ``config.jit``: the direct ELBO is compiled when the run has ``steps`` >=
    :data:`COMPILE_MIN_STEPS` training steps, either where the prior is ``traceable``; ``jit=False`` never
    compiles; ``jit=True`` compiles whatever applies (for tests). ``extra``: the arguments Pyro's model
    takes after x, (beta,) as a tensor that KL warm-up moves in place, or () when beta is constantly 1."""

    def __init__(self, vae, config: Config, weight: KLWeight, jit: bool | None = None, steps: int | None = None):
        self.weight = weight
        self._beta = 1.0 if weight.constant_one else weight.tensor  # (beta = 1 throughout: no multiplication)
        probe = torch.zeros(1, vae.data_dim, device=vae.device)  # the guide's family, at any input
        self.not_direct = "--elbo pyro" if config.elbo == "pyro" else why_not_direct(vae, probe)
        self.direct = DirectELBO(vae, config.objective, config.num_particles) if self.not_direct is None else None
        self.elbo = None
        self._compiled, self.compile_batch = None, config.batch_size
        if self.direct is not None:
            self.elbo_name = "DirectELBO"
            self.not_compiled = (_why_not_torch_compiled(config, steps, vae.prior) if jit is None
                                 else (None if jit else "--no-jit"))
            self.compiler = None if self.not_compiled else "torch.compile"
            if self.compiler:
                self._compiled = torch.compile(self.direct, dynamic=False, options={"fallback_random": True})
        else:
            model = vae.enumerated_model if vae.enumerated else vae.model
            guide = vae.guide
            self.extra: tuple = ()
            if not weight.constant_one:
                model, guide, self.extra = kl_weighted(model), kl_weighted(guide), (weight.tensor,)
            self.model, self.guide = model, guide
            self.not_compiled = why_not_compiled(config, vae.prior) if jit is None else (None if jit else "--no-jit")
            self.compiler = None if self.not_compiled else "torch.jit"
            self.elbo = make_elbo(config.objective, config.num_particles, vae.enumerated, self.not_compiled is None)
            self.elbo_name = type(self.elbo).__name__
        self.params = [p for p in vae.parameters() if p.requires_grad]
        self.optim = torch.optim.Adam(self.params, lr=config.lr, fused=True)
        self.clip = config.clip_norm
        self.normalise = config.optimizer == "adam-normgrad"
        self.schedule = make_schedule(config, self.optim)
        self.epochs = config.epochs

    def loss_and_grads(self, x: torch.Tensor) -> float:
        """The loss (minus the ELBO, summed over the batch) with its gradients accumulated into .grad."""
        if self.direct is None:
            return self.elbo.loss_and_grads(self.model, self.guide, x, *self.extra)
        compiled = self._compiled is not None and x.shape[0] == self.compile_batch  # a smaller last batch: eager
        with pyro.validation_enabled(False):  # the distributions' argument checks cost a tenth of a small step and
            loss = (self._compiled if compiled else self.direct)(x, self._beta)  # break a compiled graph;
        loss.backward()  # a NaN shows in the loss, which the training loop checks after every step
        return loss.item()

    def step(self, x: torch.Tensor) -> float:
        """One optimisation step on the mini-batch x; the loss before it."""
        loss = self.loss_and_grads(x)
        if self.normalise:  # AdamNormGrad: grad / (||grad||_2 + 1e-7), per parameter tensor
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_div_(grads, torch._foreach_add(torch._foreach_norm(grads), 1e-7))
        if self.clip:
            torch.nn.utils.clip_grad_value_(self.params, self.clip, foreach=True)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return loss

    def end_epoch(self, score: float) -> None:
        """After an epoch: move the schedule (reduce-on-plateau reads the validation ``score``)."""
        if isinstance(self.schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.schedule.step(score)
        elif self.schedule is not None:
            self.schedule.step()

    @property
    def lr(self) -> float:
        return self.optim.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optim": self.optim.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "optim" not in state or "param_groups" not in state["optim"]:
            raise PyroVAEError("the checkpoint holds the optimizer of an older pyro-vae (one ClippedAdam per "
                               "parameter), which this version cannot continue: train the run again")
        self.optim.load_state_dict(state["optim"])
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
            if isinstance(self.schedule, torch.optim.lr_scheduler.CosineAnnealingLR):
                self.schedule.T_max = self.epochs  # a run given more epochs anneals over its new length

    def compile(self, batches: list[torch.Tensor], seed: int, binarize: bool = False) -> None:
        """Run a compiled ELBO on each batch shape of an epoch before training (the direct ELBO compiles for
        the full batch only): it is compiled (and torch.jit's profiling executor settles) on a private random
        stream, and the gradients are dropped. A run started here and one resumed here then draw the same
        training stream, step for step."""
        if self.compiler is None:
            return
        if self.compiler == "torch.compile":
            batches = [b for b in batches if b.shape[0] == self.compile_batch]
            self.direct.vae.train()  # the mode the loop trains in (torch.compile guards on it)
        with seeded(seed, batches[0].device), warnings.catch_warnings():
            # torch 2.14 deprecates torch.jit.trace, which Pyro's Jit*_ELBO use; the direct ELBO avoids it
            warnings.filterwarnings("ignore", message="`torch.jit.trace` is deprecated", category=FutureWarning)
            for xb in batches:
                xb = torch.bernoulli(xb) if binarize else xb
                for _ in range(2):
                    self.loss_and_grads(xb)
        self.optim.zero_grad(set_to_none=True)


def _why_not_torch_compiled(config: Config, steps: int | None, prior) -> str | None:
    if not config.jit:
        return "--no-jit"
    if not prior.traceable:  # the spline flow's masked assignments fail in a compiled backward pass
        return (f"the prior {config.prior!r} is not one the compilers are known to get right (compiled: the "
                "built-in priors other than flow and vmf, and priors that declare traceable = True)")
    if steps is None or steps < COMPILE_MIN_STEPS:
        return (f"the run has {steps if steps is not None else 'an unknown number of'} training steps, fewer than the "
                f"{COMPILE_MIN_STEPS:,} that repay torch.compile's compilation")
    return None


__all__ = ["TrainingStep", "make_schedule", "SCHEDULES", "COMPILE_MIN_STEPS"]
