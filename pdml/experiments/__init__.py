"""The HU-shift experiment: does patch-wise metric learning keep CT numbers where an
unsupervised GAN shifts them? ``python -m pdml.experiments.hu_shift`` (docs/hu-shift.md).

One job per module, top to bottom:

- :mod:`~pdml.experiments.hu_shift`: the command line (arguments only);
- :mod:`~pdml.experiments.ablation`: the phases (λ sweep, choice, confirmation), the
  tables and the result file, written as runs finish;
- :mod:`~pdml.experiments.report`: ``ablation.md`` and the figures;
- :mod:`~pdml.experiments.verdicts`: the declared rules applied (validity, choice of λ,
  the verdict per part);
- :mod:`~pdml.experiments.tables`: an arm's runs summarised over seeds, the LD and
  classical rows;
- :mod:`~pdml.experiments.runner`: training runs several at a time, reused or resumed,
  with their provenance;
- :mod:`~pdml.experiments.endpoints`: a run's evaluations, endpoint and plateau;
- :mod:`~pdml.experiments.statistics`: means, confidence intervals, paired differences;
- :mod:`~pdml.experiments.provenance`: commit, machine, versions;
- :mod:`~pdml.experiments.design`: the design and the rules, fixed before the runs.

The classical baselines live below the trainer (:mod:`pdml.classical`).
"""
