"""WHERE IT RUNS: engines, the zoo and its skill suite, the CLI, and (later) Ray Serve and the gateway."""
