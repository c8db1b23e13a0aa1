"""Training and evaluation: objectives, the SVI loop, estimators."""

from .metrics import elbo_per_datapoint, iw_log_likelihood, log_weights, mean_and_stderr
from .objectives import KLWeight, check_analytic_kl, check_objective, kl_weighted, make_elbo, why_not_compiled
from .step import TrainingStep
from .train import evaluate_elbo, resume, train

__all__ = ["train", "resume", "TrainingStep", "evaluate_elbo", "make_elbo", "why_not_compiled", "KLWeight", "kl_weighted",
           "check_analytic_kl", "check_objective", "elbo_per_datapoint", "iw_log_likelihood", "log_weights",
           "mean_and_stderr"]
