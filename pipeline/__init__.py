"""The stage plan, the stage runtime, the token-pipelined greedy schedule, and the runner
that ties them together for one rank."""
