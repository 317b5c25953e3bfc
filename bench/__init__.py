"""ringattn microbenchmarks: `python -m bench {suite} [--quick] [--out DIR]` from the repository root."""
