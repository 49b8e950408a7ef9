"""What the workflow runs, one module per stage and CLI subcommand: plan, profile, ppl, accuracy, latency, load_balance."""
