"""The study: the same VAE under several priors, or several KL weights beta, measured and reported.

    settings.py one Setting per run: compare (priors) and sweep-beta (betas)
    runner.py   training and evaluating each (skipping finished runs, resuming interrupted ones)
    report.py   tables, paired differences, report.md and report.html
    figures.py  the figures that compare runs
"""

from .report import table, write_report
from .runner import check_settings, run_study
from .settings import Setting, beta_settings, compare_settings

__all__ = ["Setting", "compare_settings", "beta_settings", "run_study", "check_settings", "write_report", "table"]
