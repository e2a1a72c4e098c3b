"""Metrics, baselines and reports (DESIGN.md: metrics/).

* classification: `accuracy`, `precision_recall_f1` (micro / macro), `roc_auc`, `gauc`, `log_loss`,
  `roc_curve`, `pr_curve`, `best_f1_threshold`;
* ranking: `full_ranking_metrics` (HR@K, NDCG@K, MRR against every item, optional seen-item exclusion),
  `sampled_ranking_metrics` (the sampled-negatives protocol, labelled as such);
* baselines: `MostPopular`, `PersonalFrequency`, `ItemKNN`;
* `evaluate_scorer`: the one protocol applied to models and baselines;
* report: `write_report` (metrics.json, report.md, PNG plots).
"""
from .baselines import Baseline, ItemKNN, MostPopular, PersonalFrequency, default_baselines  # noqa: F401
from .classification import (  # noqa: F401
    accuracy, best_f1_threshold, gauc, log_loss, pr_curve, precision_recall_f1, roc_auc, roc_curve,
)
from .evaluate import evaluate_scorer, interest_arrays  # noqa: F401
from .ranking import (  # noqa: F401
    RankAccumulator, full_ranking_metrics, metrics_from_ranks, sample_negatives, sampled_ranking_metrics, target_ranks,
)
from .report import HEADLINE, metrics_table, write_json_atomic, write_report  # noqa: F401
