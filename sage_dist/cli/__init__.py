"""Command line: ``sage-dist`` (:mod:`sage_dist.cli.main`) and :func:`run`, the entry point of study files."""


def run(config, search_space, argv=None, **kwargs):
    """Run a study file's search (STYLE.md "Thin studies"): ``config()`` -> StudyConfig, ``search_space(trial)``.

    The same as :func:`sage_dist.tune.study.run_study` (imported lazily: Ray loads only when a study runs).
    """
    from sage_dist.tune.study import run_study

    return run_study(config, search_space, argv, **kwargs)
