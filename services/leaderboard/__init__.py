"""The multi-expert leaderboard: every expert alone and every strategy on a suite's splits, work
grouped by expert, results in the registry DB, shown as a CLI table, a single-file HTML report and
the gateway's ``GET /leaderboard`` / ``GET /v1/leaderboard`` (docs/leaderboard.md)."""
