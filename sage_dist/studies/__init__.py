"""Open-question studies (spec §5): grid experiments over variants x seeds on Ray Tune, and their report.

* :mod:`~sage_dist.studies.grid`: ``GridStudy`` / ``Variant`` and one trial without Ray (``execute_trial``);
* :mod:`~sage_dist.tune.grid_runner` (under `tune/`, with the other Ray code): every study one Tune
  experiment, several at once on one Ray cluster;
* :mod:`~sage_dist.studies.evaluation`: edited-vs-original evaluation (world metrics, multi-concept retention);
* :mod:`~sage_dist.studies.interference`: per-concept erase-gradient cosine;
* :mod:`~sage_dist.studies.report`: Markdown tables (mean ± std over seeds) and matplotlib plots;
* :mod:`~sage_dist.studies.templates`: the COCO-mined template library (template-bias study);
* :mod:`~sage_dist.studies.cli`: the command line of ``studies/*.py``.
"""
