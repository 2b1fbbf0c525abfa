"""The modules of the speed benchmark (``bench/speed.py`` is its command line).

* ``config``: the issue's anchors and goals, the profiles, the configurations (levers);
* ``common``: shared timing helpers (synchronise, quantiles, per-entry time limit, cuDNN/TF32
  switches, compiler and memory resets, strict JSON) and the ``Job`` record;
* ``state``: ``Bench``, the inputs, weights, references and files the sections share;
* one module per section: ``flops``, ``inference``, ``training``, ``pseudolabels``, ``mpl``,
  ``loader``, ``lut``, ``trace``; each has a ``*_jobs(bench, recorder)`` that lists its entries;
* ``recorder``: budget, time limits, errors, the JSON and Markdown rewritten after every entry;
* ``summary`` and ``markdown``: the summary table and the Markdown report.
"""
