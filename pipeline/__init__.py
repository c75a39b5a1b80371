"""The stage plan, stage runtime and token-pipelined greedy schedule."""
