"""The keys under which a study keeps what the leaderboard, export and report read back.

A small module of its own so that the cheap verbs (`leaderboard`, `export`) import no torch.

Study user attrs:
- MERGE_ATTR, EVAL_ATTR: the merge and eval setups (checked on resume);
- EXAMPLES_ATTR: {"search"|"test": {objective: [example keys]}}, the fixed order of every
  per-example list;
- SELECT_ATTR: the selection policy; BOOTSTRAP_ATTR: resamples per interval;
- f"{TEST_ATTR}{n}": trial n's held-out re-score {"split", "score", "objectives": {name:
  {"score", "tasks", "examples"}}}.
Trial user attrs: label (baselines), BASELINE_METHOD (a parameter-free method's row: its name;
such a row has no cells and its weights are for display), cells, weights, merge_config, dev ({objective: {"score",
"tasks"}}), dev_score (their mean), examples ({objective: [primary metric per example]}), seen
(pruned: the share of examples scored), timing, constraints.
"""

TEST_ATTR = "test/"
MERGE_ATTR = "merge"
EVAL_ATTR = "eval"
EXAMPLES_ATTR = "example_keys"
SELECT_ATTR = "select"
BOOTSTRAP_ATTR = "bootstrap"
SCORE = "score"  # the objective's name in a single-objective study
BASELINE_METHOD = "baseline_method"
SOURCES_ATTR = "sources"  # per model (and base): Checkpoint.fingerprint(), checked on resume
