"""WHERE IT RUNS: engines, the zoo and its skill suite, strategies, the gateway, Ray Serve, the leaderboard, the CLI."""
