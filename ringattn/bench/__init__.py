"""ringattn microbenchmarks: ``ringattn-bench {suite} [--quick] [--out DIR]`` (or ``python -m ringattn.bench``).

Installed with the package; the ``bench`` extra (``pip install "ringattn[bench]"``) adds the peers'
and plots' dependencies (transformers, matplotlib). In the repository, ``python -m bench`` is an alias.

Layout: ``common.py`` (environment record, timing, ``Results`` and plots), one module per suite
(``kernels``, ``rope``, ``ring``, ``gpu_check``), and ``suites.py``, the registry the command line reads.
``cuda_aot`` is no suite: ``python -m ringattn.bench.cuda_aot --mix`` prints the CUDA kernels' static
SASS issue model on sm_89 (MODELED; ``docs/cuda_kernels.md``).

Adding rows to a suite: in the suite's module, call ``results.add(column=value, ...)`` once per
measurement (the environment is added to every row), and if the row brings a new column, add it to
that module's ``COLUMNS`` with its one-line meaning (``Results.save`` refuses a column without one;
a column left out of ``COLUMNS`` is still in the JSON). Ratios are computed from times measured in
the same run, never typed in. Adding a suite: a module with ``run(quick, out_dir) -> Results`` that
saves ``<name>.json``/``<name>.md`` into ``out_dir``, and one ``Suite(...)`` line in ``suites.py``.
"""
