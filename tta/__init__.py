"""tta: compare test-time adaptation methods on ARC under identical compute budgets."""


def load_runs(paths):
    """One row per task x run from run directories (see tta.reporting.report.load_runs)."""
    from tta.reporting.report import load_runs as _load_runs
    return _load_runs(paths)
