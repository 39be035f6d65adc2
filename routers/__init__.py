"""WHO ANSWERS: the Router protocol and its implementations (query-level and token-level)."""
