"""Evaluation protocol (docs/METHOD.md "Evaluation"): prompt sets, judges, metrics, attacks, ``sage-dist evaluate``.

Modules: ``prompts`` (loader + shipped sets), ``detectors`` (NudeNet, classifier protocol), ``metrics``
(RER, ASR, FID, CLIP score; pure), ``attacks`` (UnlearnDiffAtk prefix attack, external-attack hook),
``fid`` (offline clean-fid Inception), ``clip_score``, ``generate`` (resumable original-vs-erased images),
``commands`` (the CLI).
"""
